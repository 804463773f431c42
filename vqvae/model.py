"""Taming-style VQGAN autoencoder: convolutional encoder -> quantizer -> decoder (Esser et al. 2021)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqvae.config import VQModelConfig
from vqvae.quantizer import QuantOut, build_quantizer


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ch below that (small test models)."""
    groups = max(g for g in range(1, 33) if ch % g == 0)
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the residual added in place into conv2's output, which its backward does not read: one buffer fewer
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.skip(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the feature map, with a residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)  # (b, 1, hw, c)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w)).add_(x)  # proj's backward does not read its output


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding: exact halving


# Nearest 2x upsampling then a 3x3 conv: along each axis, output phase a (even/odd) of pixel i sees input pixels
# i-1, i (a=0) or i, i+1 (a=1) with the 3 taps folded into 2: _FOLD[a] maps the 3 taps to those 2.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv (taming's), computed as one 2x2 conv with 4x the output
    channels on the input resolution, interleaved: the same result up to float rounding, 2.25x fewer FLOPs."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        fold = _FOLD.to(self.conv.weight)
        # phase kernels (a, b, out, in, 2, 2), stacked as 4 x out channels
        weight = torch.einsum("auy,bvx,oiyx->aboiuv", fold, fold, self.conv.weight).flatten(0, 2)
        y = F.conv2d(x, weight, self.conv.bias.repeat(4), padding=1)  # (B, 4C, h+1, w+1)
        # phase (a, b) of output pixel (i, j) is y's phase-(a, b) channels at (i + a, j + b)
        y = y.view(b, 2, 2, c, h + 1, w + 1)
        # (b, c, h, 2, w, 2): row 2i + a, column 2j + e
        phases = torch.stack([torch.stack([y[:, a, e, :, a:a + h, e:e + w] for e in (0, 1)], -1) for a in (0, 1)], 3)
        return phases.reshape(b, c, 2 * h, 2 * w)


class Encoder(nn.Module):
    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        blocks: list[nn.Module] = []
        ch, res = cfg.ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, cfg.ch * mult, cfg.dropout))
                ch = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResnetBlock(ch, ch, cfg.dropout), AttnBlock(ch), ResnetBlock(ch, ch, cfg.dropout))
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        ch, res = cfg.ch * cfg.ch_mult[-1], cfg.image_size // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(ch, ch, cfg.dropout), AttnBlock(ch), ResnetBlock(ch, ch, cfg.dropout))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, cfg.ch * cfg.ch_mult[level], cfg.dropout))
                ch = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != 0:
                blocks.append(Upsample(ch))
                res *= 2
        self.up = nn.Sequential(*blocks)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] <-> latent grid (B, embed_dim, H/f, W/f) <-> code indices (B, H/f, W/f)."""

    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantizer = build_quantizer(cfg)
        self.downsample_factor = cfg.downsample_factor
        self.codebook_size = self.quantizer.codebook_size

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latent (B, embed_dim, h, w), e.g. for codebook initialisation."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> QuantOut:
        return self.quantizer(self.encode_latents(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/f, W/f) long. Call in eval mode: training mode updates codebook statistics."""
        return self.encode(x).indices

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, 3, h*f, w*f)."""
        return self.decode(self.quantizer.indices_to_z(idx))

    def forward(self, x: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor, QuantOut]:
        """(reconstruction, quantizer loss, QuantOut). quantize=False (autoencoder warm-up) skips the quantizer."""
        z = self.encode_latents(x)
        if quantize:
            q = self.quantizer(z)
        else:
            q = QuantOut(z_q=z, loss=z.new_zeros((), dtype=torch.float32), indices=None, perplexity=None)
        return self.decode(q.z_q), q.loss, q
