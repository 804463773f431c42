"""The tokenizer stage's one config: CLI options, MLflow params and the checkpoint all come from it."""
from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help_: str, **meta):
    return field(default=default, metadata={"help": help_, **meta})


@dataclass
class VQConfig:
    # data
    manifest: str = field(default=None, metadata={"help": "CSV manifest with an image_path column (label, split optional)."})
    image_size: int = _f(32, "Training resolution; must be divisible by the downsampling factor 2**(len(ch_mult)-1).")
    val_fraction: float = _f(0.1, "Validation share when the manifest has no split column (hash of the path).")
    skip_bad_images: bool = _f(False, "Skip missing/unreadable images (with a count) instead of failing.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    flip: bool = _f(True, "Random horizontal flips for training images.")
    # model (taming-style encoder/decoder; the published f16 model is ch 128, ch_mult 1,1,2,2,4, attn 16)
    ch: int = _f(64, "Base channel count.")
    ch_mult: tuple[int, ...] = _f((1, 2, 2), "Channel multiplier per resolution level.")
    num_res_blocks: int = _f(1, "ResNet blocks per level (decoder uses one more).")
    attn_resolutions: tuple[int, ...] = _f((), "Feature-map sizes with self-attention.")
    z_channels: int = _f(64, "Encoder output channels.")
    embed_dim: int = _f(64, "Channels entering the quantizer.")
    dropout: float = _f(0.0, "Dropout in ResNet blocks.")
    # quantizer
    quantizer: str = _f("vq", "Vector quantizer or finite scalar quantization.", choices=["vq", "fsq"])
    codebook_size: int = _f(256, "Number of codes (vq).")
    code_dim: int = _f(0, "Low-dimensional code lookup with in/out projections (0: embed_dim).")
    beta: float = _f(0.25, "Commitment weight: beta * ||z_e - sg[e]||^2.")
    l2_norm: bool = _f(False, "l2-normalise latents and codes (cosine-similarity lookup).")
    ema: bool = _f(False, "Update the codebook by exponential moving averages instead of the codebook loss.")
    ema_decay: float = _f(0.99, "EMA decay.")
    codebook_init: str = _f("none", "Initialise codes from encoder outputs after the AE warm-up.",
                            choices=["none", "kmeans", "random"])
    warmup_steps: int = _f(0, "Autoencoder warm-up steps without quantization.")
    restart_after: int = _f(0, "Restart codes unused for this many steps with recent encoder outputs (0: off).")
    usage_window: int = _f(100, "Steps over which codebook usage is measured.")
    fsq_levels: tuple[int, ...] = _f((8, 5, 5, 5), "FSQ levels per dimension (codebook size = product).")
    # losses
    rec_loss: str = _f("l1", "Pixel reconstruction loss.", choices=["l1", "l2"])
    perceptual_weight: float = _f(1.0, "LPIPS (VGG16) weight; 0 disables it (no pretrained weights needed).")
    perceptual_backbone: str = _f("pretrained", "LPIPS backbone: torchvision VGG16 weights, or random init (tests).",
                                  choices=["pretrained", "random"])
    codebook_weight: float = _f(1.0, "Weight of the quantizer loss.")
    disc_weight: float = _f(0.8, "Weight of the adaptive GAN term.")
    disc_start: int = _f(10_000, "Step at which the discriminator and GAN loss switch on.")
    disc_layers: int = _f(3, "PatchGAN layers.")
    disc_ch: int = _f(64, "PatchGAN base channels.")
    # optimisation
    max_steps: int = _f(1000, "Optimizer steps.")
    batch_size: int = _f(16, "Images per micro-batch (per process).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(2e-4, "Adam learning rate (autoencoder and discriminator).")
    lr_warmup_steps: int = _f(0, "Linear learning-rate warm-up steps.")
    seed: int = _f(0, "Random seed.")
    device: str = _f("auto", "Device.", choices=["auto", "cpu", "cuda"])
    precision: str = _f("fp32", "Autocast precision (fp16 uses a GradScaler).", choices=["fp32", "bf16", "fp16"])
    nan_policy: str = _f("stop", "On a NaN/inf loss: stop (keeping the last good checkpoint) or skip the step.",
                         choices=["stop", "skip"])
    log_every: int = _f(10, "Steps between metric logs.")
    val_every: int = _f(250, "Steps between validations (metrics + reconstruction grid).")
    ckpt_every: int = _f(500, "Steps between checkpoints.")
    val_batches: int = _f(4, "Validation batches per validation.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)
