"""The tokenizer's configs: `VQModelConfig` (the architecture: all a model file needs) and `VQConfig`, the
train-vqvae stage's one config (architecture + data, losses, optimisation), which feeds the CLI options, the
MLflow params and the checkpoint. Importing this module does not import the training stack."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.errors import UserError
from core.options import WORKERS_HELP, Config, LoopOptions, check_decay, opt


def _vq(cfg: "VQModelConfig") -> bool:
    return cfg.quantizer == "vq"


# when an option means anything (`core.options.opt`: not logged otherwise, and a note if the user set it)
VQ = {"applies": _vq, "needs": "--quantizer vq"}
GAN = {"applies": lambda c: c.gan_used, "needs": "the GAN: --disc-start below --max-steps"}


@dataclass
class VQModelConfig(Config):
    """Encoder/decoder and quantizer architecture (taming-style; the published f16 model is ch 128,
    ch_mult 1,1,2,2,4, attn 16, z/embed 256)."""
    image_size: int = opt(32, "Training resolution; must be divisible by the downsampling factor 2**(len(ch_mult)-1).",
                          ge=8)
    ch: int = opt(64, "Base channel count.", ge=1)
    ch_mult: tuple[int, ...] = opt((1, 2, 2), "Channel multiplier per resolution level.", ge=1)
    num_res_blocks: int = opt(1, "ResNet blocks per level (decoder uses one more).", ge=1)
    attn_resolutions: tuple[int, ...] = opt((), "Feature-map sizes with self-attention.", ge=1)
    z_channels: int = opt(64, "Encoder output channels.", ge=1)
    embed_dim: int = opt(64, "Channels entering the quantizer.", ge=1)
    dropout: float = opt(0.0, "Dropout in ResNet blocks.", ge=0, lt=1)
    # quantizer. Defaults (benchmarks/quality.py, docs/defaults.md): embed_dim-wide codes updated by moving averages,
    # with dead-code restarts. On the tuning photo patches they match l2-normalised 8-dim codes (LlamaGen's recipe)
    # in PSNR and use more of the codebook on unseen patches; without restarts wide codes collapse.
    quantizer: str = opt("vq", "Vector quantizer or finite scalar quantization.", choices=["vq", "fsq"])
    codebook_size: int = opt(256, "Number of codes (vq).", ge=2, **VQ)
    code_dim: int = opt(0, "Low-dimensional code lookup with in/out projections (0: embed_dim).", ge=0, **VQ)
    beta: float = opt(0.25, "Commitment weight: beta * ||z_e - sg[e]||^2.", ge=0, **VQ)
    l2_norm: bool = opt(False, "l2-normalise latents and codes (cosine-similarity lookup).", **VQ)
    ema: bool = opt(True, "Update the codebook by exponential moving averages instead of the codebook loss.",
                    **VQ)
    ema_decay: float = opt(0.99, "EMA decay.", ge=0, lt=1, applies=lambda c: _vq(c) and c.ema,
                            needs="--quantizer vq with --ema")
    # off by default: +0.2 dB but a lower perplexity at 150 steps on photo patches (benchmarks/quality.py)
    rotation_trick: bool = opt(False, "Pass gradients through the quantizer by rotating the encoder output onto its "
                                      "code (Fifty et al. 2024) instead of copying them (straight-through).",
                               **VQ)
    restart_after: int = opt(20, "Restart codes unused for this many steps with recent encoder outputs (0: off); "
                                 "raised to 16x the steps between uses of a code under uniform use (codebook size / "
                                 "tokens per step), so that large codebooks keep their rare codes.", ge=0, **VQ)
    entropy_weight: float = opt(0.0, "Weight of the codebook-entropy loss (MaskGIT, LlamaGen): each latent's soft "
                                     "assignment to the codes made confident, the batch's mean assignment spread over "
                                     "the whole codebook; raises the share of codes in use (0: off).", ge=0,
                                **VQ)
    entropy_temperature: float = opt(0.1, "Temperature T of that loss's soft assignment, softmax(-||z - e||^2 / T) in "
                                          "code space.", gt=0, applies=lambda c: _vq(c) and c.entropy_weight > 0,
                                      needs="--quantizer vq with --entropy-weight above 0")
    usage_window: int = opt(100, "Steps over which codebook usage is measured (raised like --restart-after).", ge=1)
    fsq_levels: tuple[int, ...] = opt((8, 5, 5, 5), "FSQ levels per dimension (codebook size = product).", ge=2,
                                      applies=lambda c: c.quantizer == "fsq", needs="--quantizer fsq")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def check(self) -> None:
        if not self.ch_mult:
            raise UserError("--ch-mult needs at least one level, e.g. 1,2,2")
        if self.image_size % self.downsample_factor:
            raise UserError(f"--image-size {self.image_size} is not divisible by the downsampling factor "
                            f"{self.downsample_factor} (2**(len(ch_mult)-1)); use a multiple of it")

    def model_config(self) -> "VQModelConfig":
        """Just the architecture (what a weights-only model file needs)."""
        return VQModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VQModelConfig)})


@dataclass
class VQConfig(LoopOptions, VQModelConfig):
    # data
    manifest: str = opt(None, "CSV manifest with an image_path column (label, split optional).")
    val_fraction: float = opt(0.1, "Validation share when the manifest has no split column (hash of the path).",
                              ge=0, lt=1)
    skip_bad_images: bool = opt(False, "Skip missing/unreadable images (with a count) instead of failing.")
    num_workers: int = opt(None, WORKERS_HELP, ge=0)
    flip: bool = opt(True, "Random horizontal flips for training images.")
    init_from: str = opt(None, "Start from the weights of this vqvae run (trained or imported): its architecture, "
                               "fresh optimizers, step 0.")
    # codebook initialisation
    codebook_init: str = opt("none", "Initialise codes from encoder outputs after the AE warm-up (or at step 0 "
                                     "with --init-from).",
                             choices=["none", "kmeans", "random"], **VQ)
    warmup_steps: int = opt(0, "Autoencoder warm-up steps without quantization.", ge=0)
    # losses
    rec_loss: str = opt("l1", "Pixel reconstruction loss.", choices=["l1", "l2"])
    perceptual_weight: float = opt(1.0, "LPIPS (VGG16) weight; 0 disables it (no pretrained weights needed).", ge=0)
    perceptual_backbone: str = opt("pretrained", "LPIPS backbone: torchvision VGG16 weights, or random init (tests).",
                                   choices=["pretrained", "random"], applies=lambda c: c.perceptual_weight > 0,
                                   needs="--perceptual-weight above 0")
    codebook_weight: float = opt(1.0, "Weight of the quantizer loss.", ge=0, **VQ)
    disc_weight: float = opt(0.8, "Weight of the adaptive GAN term.", ge=0, **GAN)
    disc_start: int = opt(10_000, "Step at which the discriminator and GAN loss switch on.", ge=0)
    disc_layers: int = opt(3, "PatchGAN layers.", ge=1, **GAN)
    disc_ch: int = opt(64, "PatchGAN base channels.", ge=1, **GAN)
    # optimisation
    batch_size: int = opt(16, "Images per micro-batch (per process).", ge=1)
    # measured with benchmarks/quality.py (32-px photo patches, batch 16, 400 steps, 20 warm-up steps): val PSNR
    # 24.2 dB at 3e-4, 22.0 at 5e-4, 22.2 at 1e-3; on the shapes set higher rates were worse still
    lr: float = opt(3e-4, "Adam learning rate (autoencoder and discriminator).", gt=0)
    lr_warmup_steps: int = opt(20, "Linear learning-rate warm-up steps.", ge=0)
    # constant by default (docs/defaults.md, fifth round): the decay gains 1-4 dB on photo patches at 400 steps, but
    # its shapes codes read as the right class less often, reconstructed and sampled, and glyphs lose 1.2 dB
    lr_schedule: str = opt("constant", "After the warm-up: a constant --lr (the official recipe), or cosine decay "
                                       "to --min-lr at --max-steps (sharper reconstructions in a short run).",
                           choices=["constant", "cosine"])
    min_lr: float = opt(0.0, "Learning rate at the end of the cosine decay.", ge=0,
                        applies=lambda c: c.lr_schedule == "cosine",
                        needs="--lr-schedule cosine")
    adam_betas: tuple[float, ...] = opt((0.5, 0.9), "Adam betas (beta1,beta2) of the autoencoder and the "
                                                    "discriminator (the official taming recipe: 0.5,0.9).",
                                        ge=0, lt=1, legacy=(0.5, 0.9))
    # on by default for the tokenizer (docs/defaults.md, tenth round): on the tuning families +2.5-4.9 dB on the
    # digits, +0.1-1.2 dB and 5-6 points more codes used on photo patches, the class-conditional samples level
    # within their noise, textures -0.2 / -1.0 dB
    ema_weights: float = opt(0.99, "Decay of an exponential moving average of the weights (bias-corrected), used "
                                   "for validation, quantize and the exported model; the codebook stays live "
                                   "(0: off).", ge=0, lt=1, legacy=0.0)
    val_every: int = opt(250, "Steps between validations (metrics + reconstruction grid).", ge=1)
    val_batches: int = opt(4, "Validation batches per validation.", ge=1)

    @property
    def end_lr(self) -> float | None:
        """Where the schedule ends (None: constant), for `core.loop.cosine_lr`."""
        return self.min_lr if self.lr_schedule == "cosine" else None

    @property
    def gan_used(self) -> bool:
        """Whether the discriminator switches on within this run."""
        return self.disc_start < self.max_steps

    def check(self) -> None:
        super().check()
        if self.lr_schedule == "constant" and self.min_lr:
            raise UserError(f"--min-lr {self.min_lr} applies to --lr-schedule cosine only (a constant rate stays at "
                            "--lr); add --lr-schedule cosine or drop --min-lr")
        if self.lr_schedule == "cosine":
            check_decay(self.lr, self.min_lr)
        if len(self.adam_betas) != 2:
            raise UserError(f"--adam-betas takes two numbers, beta1,beta2 (e.g. 0.9,0.99), got "
                            f"{','.join(map(str, self.adam_betas))}")
        if self.quantizer == "fsq" and self.codebook_init != "none":
            raise UserError("--codebook-init applies to --quantizer vq only (FSQ has no codebook to initialise); "
                            "drop --codebook-init or use --quantizer vq")
        if self.codebook_init != "none" and self.warmup_steps == 0 and not self.init_from:
            raise UserError(f"--codebook-init {self.codebook_init} initialises the codebook from encoder outputs "
                            "after the autoencoder warm-up; pass --warmup-steps N (N > 0), or --init-from RUN_ID "
                            "(a trained encoder)")
        if self.gan_used and self.image_size < 2 ** (self.disc_layers + 2):
            raise UserError(f"--image-size {self.image_size} is too small for a {self.disc_layers}-layer PatchGAN "
                            f"(needs at least {2 ** (self.disc_layers + 2)}); lower --disc-layers")
