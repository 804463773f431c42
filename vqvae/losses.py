"""VQGAN training losses: pixel + LPIPS reconstruction, hinge PatchGAN with the adaptive weight, quantizer loss.

Images are expected in [-1, 1].
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VGG16_Weights

from core.errors import UserError
from vqvae.config import VQConfig
from vqvae.model import norm


def vgg16_checkpoint_path() -> str:
    """Where torchvision looks for the ImageNet VGG16 weights (torch hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(VGG16_Weights.IMAGENET1K_V1.url))


TRAIN_WITHOUT_LPIPS = ", or run with --perceptual-weight 0 (no LPIPS)"


def fetch_vgg16(without: str = TRAIN_WITHOUT_LPIPS) -> str:
    """The ImageNet VGG16 weights file, downloaded into the torch hub cache if missing, as torchvision itself does
    (``load_state_dict_from_url``: progress bar, and the hash in the file name checked); offline, a one-line error
    saying which file to put where, then ``without``: how the command goes on without it (training's option;
    evaluate, which skips LPIPS by itself, gives "")."""
    path, url = vgg16_checkpoint_path(), VGG16_Weights.IMAGENET1K_V1.url
    if os.path.isfile(path):
        return path
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, map_location="cpu",
                                           weights_only=True)
    except Exception as exc:  # noqa: BLE001 - urllib, socket, ssl, disk and hash-mismatch errors alike
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"LPIPS needs the torchvision VGG16 weights {os.path.basename(path)}, which are not in "
                        f"the torch hub cache and could not be downloaded from {url} ({reason}): download that "
                        f"file and put it at {path}{without}") from None
    if not os.path.isfile(path):  # the download went elsewhere (a changed hub layout): say so, do not guess
        raise UserError(f"downloaded the VGG16 weights from {url}, but they are not at {path}; put the file "
                        f"there{without}")
    return path


class LPIPSLoss(nn.Module):
    """LPIPS distance per image, (B, 1, 1, 1): VGG16 trunk + the lpips package's calibrated linear heads.

    backbone "pretrained" loads torchvision's ImageNet VGG16 from the torch hub cache (downloaded there when
    missing; offline, a UserError); "random" keeps a randomly initialised trunk (tests, smoke runs).
    Frozen and always in eval mode (the lpips heads contain dropout).
    """

    def __init__(self, backbone: str = "pretrained"):
        super().__init__()
        if backbone not in ("pretrained", "random"):
            raise ValueError(f"unknown LPIPS backbone {backbone!r}; expected 'pretrained' or 'random'")
        path = fetch_vgg16() if backbone == "pretrained" else None
        # Always build a random trunk so lpips never touches the network; lpips 0.1.4 builds it with
        # torchvision's deprecated vgg16(pretrained=False), hence the silenced warnings. The linear heads
        # ship inside the lpips package.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if backbone == "pretrained":
            self._load_vgg(path)
        self.requires_grad_(False)
        self.eval()

    def _load_vgg(self, path: str) -> None:
        """Copy torchvision's `features.{i}.*` tensors into lpips' slices, which keep the layer index i as name."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"cannot read the VGG16 weights at {path} ({exc}): replace the file or run with "
                            "--perceptual-weight 0") from exc
        trunk = self.net.net
        slices = [trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5]
        slice_of = {name: f"slice{j}" for j, s in enumerate(slices, 1) for name, _ in s.named_children()}
        renamed = {}
        for key, value in state.items():
            if key.startswith("features."):
                _, i, param = key.split(".")
                if i in slice_of:
                    renamed[f"{slice_of[i]}.{i}.{param}"] = value
        trunk.load_state_dict(renamed)  # strict: every trunk conv must be present

    def train(self, mode: bool = True) -> "LPIPSLoss":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y)


def _init_weights(m: nn.Module) -> None:
    """pix2pix init: convs N(0, 0.02), norm scales N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4x4 convs, channels ch -> 2ch -> 4ch -> 8ch (capped at 8ch) -> 1 logit per patch.

    GroupNorm instead of the published BatchNorm: it normalises each image on its own, so the output does
    not depend on the per-process batch size or on whether real and fake images share a batch, and there
    are no running-stat buffers for DDP to broadcast between the two discriminator calls of a step (a known
    source of in-place autograd errors with BatchNorm in DDP) or to differ between train and eval.
    """

    def __init__(self, in_ch: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c = ch
        for n in range(1, n_layers + 1):
            c_out = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       norm(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, delta: float = 1e-4,
                    loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """λ = ||∇nll|| / (||∇g|| + δ) from the two losses' gradients at the decoder's last layer, clamped to [0, 1e4].

    Balances the GAN term against the reconstruction term at the layer where both act on the image.
    Under fp16 autocast the gradients are those of losses scaled by the GradScaler's scale (pass it: the ratio
    is unchanged, and they do not underflow in half precision). A non-finite ratio (overflow) gives 0.
    """
    lam = nll_grad.float().norm() / (g_grad.float().norm() + delta * loss_scale)
    return lam.nan_to_num(0.0).clamp(0.0, 1e4).detach()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside the block (the recorded graph then never reaches them)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class _ImageGradient(torch.autograd.Function):
    """A zero whose gradient with respect to `image` is `grad`: starts a backward at the image with a known
    gradient, inside an ordinary `loss.backward()` (an inf/NaN gradient reaches the parameters, where the fp16
    GradScaler looks for it; the loss value stays finite)."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.dtype = image.dtype
        return grad.new_zeros(())

    @staticmethod
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return (grad * upstream).to(ctx.dtype), None


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of VQGAN; the GAN parts switch on at `disc_start`."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        if cfg.rec_loss not in ("l1", "l2"):
            raise ValueError(f"unknown rec_loss {cfg.rec_loss!r}; expected 'l1' or 'l2'")
        self.rec_loss = cfg.rec_loss
        self.perceptual_weight = cfg.perceptual_weight
        self.codebook_weight = cfg.codebook_weight
        self.disc_weight = cfg.disc_weight
        self.disc_start = cfg.disc_start
        self.perceptual = LPIPSLoss(cfg.perceptual_backbone) if cfg.perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(3, cfg.disc_ch, cfg.disc_layers)

    def disc_active(self, step: int) -> bool:
        """Whether the GAN term and the discriminator are on at this step (before: no discriminator forward)."""
        return step >= self.disc_start

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, qloss: torch.Tensor, step: int,
                       last_layer: torch.Tensor, loss_scale: float | torch.Tensor = 1.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """nll (pixel + perceptual) + adaptive·disc_weight·GAN + codebook_weight·qloss; no discriminator gradients.

        The adaptive weight needs the autograd graph at `last_layer`; where there is none (torch.no_grad(),
        e.g. validation) it is 0, so the returned total then excludes the GAN term. `loss_scale`: the fp16
        GradScaler's current scale, best as a device tensor (see `adaptive_weight`); leave 1 for fp32/bf16.
        The logs are detached 0-dim tensors on the loss's device: reading them waits for the device, so callers
        read them only when they log.
        """
        rec = (x - xrec).abs() if self.rec_loss == "l1" else (x - xrec).pow(2)
        rec_loss = rec.mean()
        p_loss = self.perceptual(x, xrec).mean() if self.perceptual is not None else rec_loss.new_zeros(())
        nll = rec_loss + self.perceptual_weight * p_loss
        g_loss = d_weight = rec_loss.new_zeros(())
        through_image = None
        if self.disc_active(step):
            # call the bare module even if the discriminator got wrapped in DDP: this pass must not
            # produce (or wait for) discriminator gradients
            disc = getattr(self.discriminator, "module", self.discriminator)
            with _frozen(disc):
                g_loss = -disc(xrec).mean()
            if torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad and last_layer.requires_grad:
                d_weight, through_image = self._gan_balance(nll, g_loss, xrec, last_layer, loss_scale)
        if through_image is None:
            total = nll + d_weight * g_loss + self.codebook_weight * qloss
        else:  # same value; its backward enters the autoencoder at the image, with the gradient already known
            total = nll.detach() + d_weight * g_loss.detach() + self.codebook_weight * qloss + through_image
        keys = ("rec_loss", "p_loss", "nll_loss", "g_loss", "d_weight", "q_loss", "total_loss")
        values = (rec_loss, p_loss, nll, g_loss, d_weight, qloss, total)
        return total, {k: v.detach().float() for k, v in zip(keys, values)}

    def _gan_balance(self, nll: torch.Tensor, g_loss: torch.Tensor, xrec: torch.Tensor, last_layer: torch.Tensor,
                     loss_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """disc_weight·λ, and a zero-valued term whose gradient at xrec is that of nll + disc_weight·λ·g_loss.

        The official code differentiates nll and g_loss down to the last layer for λ and then backpropagates their
        sum through LPIPS and the discriminator once more. Here each is differentiated once, to the image (freeing
        its graph); λ needs only the last layer's share of those image gradients, and the final backward starts
        at the image: one LPIPS and one discriminator backward fewer per step, the same gradients up to rounding.
        """
        at_image = [torch.autograd.grad(t * loss_scale, xrec)[0] for t in (nll, g_loss)]
        at_layer = [torch.autograd.grad(xrec, last_layer, g, retain_graph=True)[0] for g in at_image]
        d_weight = adaptive_weight(*at_layer, loss_scale=loss_scale) * self.disc_weight
        # a weight of 0 (an fp16 overflow) drops the GAN term, inf/NaN gradients and all, as the official sum would
        gan = (d_weight * at_image[1].float()).where(d_weight > 0, 0.0)
        return d_weight, _ImageGradient.apply(xrec, (at_image[0].float() + gan) / loss_scale)

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss on real x and detached xrec (one forward over both); a graph-less 0 before disc_start.
        Logs as in `generator_loss`: device tensors."""
        if not self.disc_active(step):
            zero = x.new_zeros((), dtype=torch.float32)
            return zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        logits = self.discriminator(torch.cat([x.detach(), xrec.detach()]))
        real, fake = logits.float().chunk(2)
        d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        values = (d_loss, real.mean(), fake.mean())
        return d_loss, {k: v.detach() for k, v in zip(("d_loss", "logits_real", "logits_fake"), values)}
