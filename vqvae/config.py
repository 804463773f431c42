"""The tokenizer stage's one config: CLI options, MLflow params and the checkpoint all come from it."""
from __future__ import annotations

from dataclasses import dataclass

from core.loop import LoopOptions
from core.options import opt


@dataclass
class VQConfig(LoopOptions):
    # data
    manifest: str = opt(None, "CSV manifest with an image_path column (label, split optional).")
    image_size: int = opt(32, "Training resolution; must be divisible by the downsampling factor 2**(len(ch_mult)-1).")
    val_fraction: float = opt(0.1, "Validation share when the manifest has no split column (hash of the path).")
    skip_bad_images: bool = opt(False, "Skip missing/unreadable images (with a count) instead of failing.")
    num_workers: int = opt(0, "DataLoader worker processes.")
    flip: bool = opt(True, "Random horizontal flips for training images.")
    # model (taming-style encoder/decoder; the published f16 model is ch 128, ch_mult 1,1,2,2,4, attn 16)
    ch: int = opt(64, "Base channel count.")
    ch_mult: tuple[int, ...] = opt((1, 2, 2), "Channel multiplier per resolution level.")
    num_res_blocks: int = opt(1, "ResNet blocks per level (decoder uses one more).")
    attn_resolutions: tuple[int, ...] = opt((), "Feature-map sizes with self-attention.")
    z_channels: int = opt(64, "Encoder output channels.")
    embed_dim: int = opt(64, "Channels entering the quantizer.")
    dropout: float = opt(0.0, "Dropout in ResNet blocks.")
    # quantizer
    quantizer: str = opt("vq", "Vector quantizer or finite scalar quantization.", choices=["vq", "fsq"])
    codebook_size: int = opt(256, "Number of codes (vq).")
    code_dim: int = opt(0, "Low-dimensional code lookup with in/out projections (0: embed_dim).")
    beta: float = opt(0.25, "Commitment weight: beta * ||z_e - sg[e]||^2.")
    l2_norm: bool = opt(False, "l2-normalise latents and codes (cosine-similarity lookup).")
    ema: bool = opt(False, "Update the codebook by exponential moving averages instead of the codebook loss.")
    ema_decay: float = opt(0.99, "EMA decay.")
    codebook_init: str = opt("none", "Initialise codes from encoder outputs after the AE warm-up.",
                            choices=["none", "kmeans", "random"])
    warmup_steps: int = opt(0, "Autoencoder warm-up steps without quantization.")
    restart_after: int = opt(0, "Restart codes unused for this many steps with recent encoder outputs (0: off).")
    usage_window: int = opt(100, "Steps over which codebook usage is measured.")
    fsq_levels: tuple[int, ...] = opt((8, 5, 5, 5), "FSQ levels per dimension (codebook size = product).")
    # losses
    rec_loss: str = opt("l1", "Pixel reconstruction loss.", choices=["l1", "l2"])
    perceptual_weight: float = opt(1.0, "LPIPS (VGG16) weight; 0 disables it (no pretrained weights needed).")
    perceptual_backbone: str = opt("pretrained", "LPIPS backbone: torchvision VGG16 weights, or random init (tests).",
                                  choices=["pretrained", "random"])
    codebook_weight: float = opt(1.0, "Weight of the quantizer loss.")
    disc_weight: float = opt(0.8, "Weight of the adaptive GAN term.")
    disc_start: int = opt(10_000, "Step at which the discriminator and GAN loss switch on.")
    disc_layers: int = opt(3, "PatchGAN layers.")
    disc_ch: int = opt(64, "PatchGAN base channels.")
    # optimisation
    batch_size: int = opt(16, "Images per micro-batch (per process).")
    lr: float = opt(2e-4, "Adam learning rate (autoencoder and discriminator).")
    lr_warmup_steps: int = opt(0, "Linear learning-rate warm-up steps.")
    val_every: int = opt(250, "Steps between validations (metrics + reconstruction grid).")
    val_batches: int = opt(4, "Validation batches per validation.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)
