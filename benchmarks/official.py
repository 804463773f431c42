"""The official taming-transformers modules, as installed from PyPI (`taming-transformers-rom1504`, named in
benchmarks/requirements.txt), for the benchmarks to time beside ours: never a re-implementation of them.

The package's modules import `transformers` (mingpt: `top_k_top_p_filtering`) and `pytorch_lightning` at module
level; neither is used by what we time, so both are stubbed in sys.modules when they are not installed.
"""
from __future__ import annotations

import sys
import types

import torch

NOT_INSTALLED = ("official taming-transformers not installed: its rows are skipped "
                 "(pip install -r benchmarks/requirements.txt)")


def _top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                           filter_value: float = -float("inf"), min_tokens_to_keep: int = 1) -> torch.Tensor:
    """transformers' filter, for the stub (the timed sampling passes top_k=None, so it is never called there)."""
    if top_k > 0:
        kth = torch.topk(logits, min(max(top_k, min_tokens_to_keep), logits.size(-1)))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., :min_tokens_to_keep] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), filter_value)
    return logits


def _stub(name: str, **attrs) -> None:
    try:
        __import__(name)
    except ImportError:
        sys.modules[name] = types.SimpleNamespace(__name__=name, **attrs)


def mingpt():
    """taming.modules.transformer.mingpt, or None (with a printed note) when the package is not installed."""
    _stub("transformers", top_k_top_p_filtering=_top_k_top_p_filtering)
    _stub("pytorch_lightning", LightningModule=torch.nn.Module)
    try:
        from taming.modules.transformer import mingpt as module
    except ImportError:
        print(f"note: {NOT_INSTALLED}")
        return None
    return module


def image_paths():
    """taming.data.base.ImagePaths, the official training data loader (PIL decode of every pixel, then
    albumentations' SmallestMaxSize and RandomCrop), or None (with a printed note) when taming or albumentations is
    not installed."""
    try:
        from taming.data.base import ImagePaths
    except ImportError as exc:
        print(f"note: {NOT_INSTALLED} ({exc})")
        return None
    return ImagePaths


def _instantiate_from_config(config: dict):
    """taming.main's instantiate_from_config (taming.main itself imports omegaconf and the Lightning trainer)."""
    import importlib

    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


def taming_vqgan():
    """taming.models.vqgan (the official VQModel, its Encoder/Decoder/VectorQuantizer2 and, through its loss
    config, VQLPIPSWithDiscriminator), or None (with a printed note) when the package or einops is missing.

    The official LPIPS downloads VGG16 and its linear heads when built: here both stay randomly initialised
    (the same network; its time does not depend on the weights)."""
    import torchvision

    _stub("transformers", top_k_top_p_filtering=_top_k_top_p_filtering)
    _stub("pytorch_lightning", LightningModule=torch.nn.Module)
    _stub("taming.main", instantiate_from_config=_instantiate_from_config)
    try:
        from taming.models import vqgan
        from taming.modules.losses import lpips
    except ImportError as exc:
        print(f"note: {NOT_INSTALLED} ({exc})")
        return None
    lpips.models = types.SimpleNamespace(vgg16=lambda pretrained=False: torchvision.models.vgg16(weights=None))
    lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    return vqgan


def official_vqgan(vqgan, size: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                   attn_resolutions: tuple[int, ...], z_channels: int, n_embed: int, disc_start: int,
                   perceptual_weight: float = 1.0) -> torch.nn.Module:
    """The official VQModel with its VQLPIPSWithDiscriminator (hinge, PatchGAN 3 layers x 64, disc_weight 0.8), in
    training mode, with the two LightningModule methods its training_step calls made no-ops."""
    dd = dict(double_z=False, z_channels=z_channels, resolution=size, in_channels=3, out_ch=3, ch=ch,
              ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
              dropout=0.0)
    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": dict(disc_conditional=False, disc_in_channels=3, disc_start=disc_start, disc_weight=0.8,
                           codebook_weight=1.0, perceptual_weight=perceptual_weight)}
    model = vqgan.VQModel(ddconfig=dd, lossconfig=loss, n_embed=n_embed, embed_dim=z_channels).train()
    model.log = model.log_dict = lambda *args, **kwargs: None
    model.global_step = 0
    return model


def lightning_step(model: torch.nn.Module, optimizers: tuple[torch.optim.Optimizer, ...], x: torch.Tensor) -> None:
    """One batch of the official VQModel.training_step as Lightning 1.x's automatic optimisation runs it with two
    optimizers: per optimizer, requires_grad only for its parameters (toggle_optimizer), training_step (which runs
    the autoencoder again), backward, step, zero_grad."""
    batch = {"image": x.permute(0, 2, 3, 1)}  # get_input permutes back to NCHW
    everything = list(model.parameters())
    for optimizer_idx, opt in enumerate(optimizers):
        for p in everything:
            p.requires_grad = False
        for group in opt.param_groups:
            for p in group["params"]:
                p.requires_grad = True
        model.training_step(batch, 0, optimizer_idx).backward()
        opt.step()
        opt.zero_grad()
    for p in everything:
        p.requires_grad = True


def official_optimizers(model: torch.nn.Module, lr: float = 4.5e-6) -> tuple[torch.optim.Optimizer, ...]:
    """The official VQModel.configure_optimizers (Adam, betas 0.5/0.9, autoencoder and discriminator)."""
    model.learning_rate = lr
    return tuple(model.configure_optimizers()[0])
