"""Official tokenizer files <-> our weights: taming-transformers' Lightning ``.ckpt`` and LlamaGen's ``.pt``.

Reading never runs pickled code: ``torch.load(weights_only=True)`` with the two globals real files name allowed as
inert placeholders. Our encoder/decoder is the same network as both after renaming (attention q/k/v 1x1 convs are
our one ``qkv`` conv); the architecture is inferred from tensor shapes, or checked against taming's ``model.yaml``.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import safe_load
from core.errors import UserError
from vqvae.config import VQModelConfig
from vqvae.model import AttnBlock, ResnetBlock, Upsample, VQModel

FORMATS = ("taming", "llamagen")
# A taming level is ``down.{i}.block.{j}`` / ``up.{i}.block.{j}``; a LlamaGen level ``conv_blocks.{i}.res.{j}``
_LEVELS = {"taming": ("down", "up", "block"), "llamagen": ("conv_blocks", "conv_blocks", "res")}
_MID = {"taming": ("block_1", "attn_1", "block_2"), "llamagen": ("0", "1", "2")}
# our leaf names that differ from the official ones (the same in both formats)
_LEAF = {"qkv.weight": ("q.weight", "k.weight", "v.weight"), "qkv.bias": ("q.bias", "k.bias", "v.bias"),
         "proj.weight": ("proj_out.weight",), "proj.bias": ("proj_out.bias",),
         "skip.weight": ("nin_shortcut.weight",), "skip.bias": ("nin_shortcut.bias",)}
# quantizer bookkeeping of ours with no official counterpart: restarted on import and on --init-from
STAT_BUFFERS = ("quantizer.step", "quantizer.last_used", "quantizer.last_reset", "quantizer.ema_count",
                "quantizer.ema_sum")
LLAMAGEN_USAGE_BUFFER = "quantize.codebook_used"  # LlamaGen's ring of recent indices: training-only
LLAMAGEN_USAGE_LEN = 65536


class _Inert:
    """Stands in for a class that real official files name: Lightning's ``ModelCheckpoint`` (a dict key of
    ``callbacks``) and LlamaGen's ``argparse.Namespace`` (its training ``args``). Creating it keeps the pickled
    attributes as plain data; calling it (what a malicious pickle would do) is refused."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        if args or kwargs:
            raise pickle.UnpicklingError(f"refusing to construct {cls.__name__} with arguments")
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError("refusing to call a class named in the file")


class LightningModelCheckpoint(_Inert):
    pass


class Namespace(_Inert):
    pass


INERT_GLOBALS = [(LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
                 (Namespace, "argparse.Namespace")]


@dataclasses.dataclass
class OfficialWeights:
    """The tensors of an official file under their official names (training-only entries dropped)."""
    format: str
    state: dict[str, torch.Tensor]
    image_size: int | None = None  # training resolution, when the file records it (LlamaGen's args)
    l2_norm: bool | None = None  # l2-normalised lookup, when the file records it (LlamaGen's args)


def read_official(path: str | Path, fmt: str = "auto") -> OfficialWeights:
    """Load a taming ``.ckpt`` / LlamaGen ``.pt`` (any device it was saved on) or a ``.safetensors`` with official
    names, without Lightning and without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None
    else:
        with torch.serialization.safe_globals(INERT_GLOBALS):
            obj = safe_load(path, str(path))
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    args = None
    if isinstance(obj.get("state_dict"), dict):  # taming: a Lightning checkpoint
        state = obj["state_dict"]
    elif isinstance(obj.get("ema"), dict) or isinstance(obj.get("model"), dict):  # LlamaGen (prefer EMA weights)
        state = obj["ema"] if isinstance(obj.get("ema"), dict) else obj["model"]
        args = obj.get("args")
    else:  # a bare state dict
        state = obj
    state = {k: v for k, v in state.items() if not k.startswith("loss.") and k != LLAMAGEN_USAGE_BUFFER}
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{path}: entry {bad!r} of its state dict is not a tensor")
    found = detect_format(state, path)
    if fmt not in ("auto", found):
        raise UserError(f"--format {fmt} given, but {path} holds {found} weights; use --format {found} or auto")
    image_size, l2_norm = getattr(args, "image_size", None), getattr(args, "codebook_l2_norm", None)
    return OfficialWeights(found, state, int(image_size) if image_size else None,
                           bool(l2_norm) if l2_norm is not None else None)


def detect_format(state: dict[str, torch.Tensor], path: Path) -> str:
    if any(k.startswith("quantize.embed.") for k in state):  # before the encoder test: its encoder is taming's
        raise UserError(f"{path} is a Gumbel-softmax VQGAN (taming's GumbelQuantize, e.g. vqgan_gumbel_f8), which "
                        "is not supported: only nearest-neighbour codebooks (taming VectorQuantizer, LlamaGen VQ, "
                        "latent-diffusion VQ) can be imported")
    if any(k.startswith("encoder.down.") for k in state):
        return "taming"
    if any(k.startswith("encoder.conv_blocks.") for k in state):
        return "llamagen"
    raise UserError(f"{path} is not a taming-transformers or LlamaGen VQ tokenizer: it has no encoder.down.* or "
                    "encoder.conv_blocks.* weights")


def _shape(state: dict[str, torch.Tensor], key: str, fmt: str) -> torch.Size:
    if key not in state:
        raise UserError(f"the {fmt} checkpoint has no tensor {key}; it is not a complete VQ tokenizer")
    return state[key].shape


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many consecutive indices i have keys ``{prefix}{i}.*``."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


@dataclasses.dataclass
class Architecture:
    """What the tensors fix: channels, levels, blocks, attention levels (0 = full resolution), codebook."""
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]
    z_channels: int
    embed_dim: int
    codebook_size: int

    def config(self, image_size: int, l2_norm: bool) -> VQModelConfig:
        # every architectural field is set from the file, none left to a training default (which may change:
        # the default --code-dim puts codes between projections the official models do not have)
        return VQModelConfig(image_size=image_size, ch=self.ch, ch_mult=self.ch_mult,
                             num_res_blocks=self.num_res_blocks,
                             attn_resolutions=tuple(image_size // 2**i for i in self.attn_levels),
                             z_channels=self.z_channels, embed_dim=self.embed_dim, quantizer="vq",
                             codebook_size=self.codebook_size, code_dim=self.embed_dim, l2_norm=l2_norm,
                             dropout=0.0)


def infer_architecture(weights: OfficialWeights) -> Architecture:
    """The architecture fixed by the tensor shapes of an official state dict."""
    state, fmt = weights.state, weights.format
    enc, _, res = _LEVELS[fmt]
    levels = _count(state, f"encoder.{enc}.")
    ch = _shape(state, "encoder.conv_in.weight", fmt)[0]
    mults = []
    for i in range(levels):
        out = _shape(state, f"encoder.{enc}.{i}.{res}.0.conv1.weight", fmt)[0]
        if out % ch:
            raise UserError(f"encoder level {i} has {out} channels, not a multiple of the base {ch}")
        mults.append(out // ch)
    embed_dim = _shape(state, "quant_conv.weight", fmt)[0]
    codebook_size, code_dim = _shape(state, "quantize.embedding.weight", fmt)
    if code_dim != embed_dim:
        raise UserError(f"the codebook has {code_dim}-dim codes but quant_conv gives {embed_dim} channels")
    return Architecture(ch=ch, ch_mult=tuple(mults), num_res_blocks=_count(state, f"encoder.{enc}.0.{res}."),
                        attn_levels=tuple(i for i in range(levels) if f"encoder.{enc}.{i}.attn.0.q.weight" in state),
                        z_channels=_shape(state, "encoder.conv_out.weight", fmt)[0], embed_dim=embed_dim,
                        codebook_size=codebook_size)


def default_image_size(arch: Architecture) -> int:
    """Every official tokenizer attends at 16x16 feature maps (f16 models at 256 px): the image size that puts
    the deepest attention level (else the latent grid) at 16x16."""
    return 16 * 2 ** max(arch.attn_levels, default=len(arch.ch_mult) - 1)


def read_taming_yaml(path: str | Path) -> tuple[Architecture, int]:
    """(architecture, resolution) of taming's ``model.yaml`` (``model.params`` with ``ddconfig``)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
        params = data.get("model", data).get("params", data)
        dd = params["ddconfig"]
        resolution, mult = int(dd["resolution"]), tuple(int(m) for m in dd["ch_mult"])
        if dd.get("double_z") or int(dd.get("in_channels", 3)) != 3 or int(dd.get("out_ch", 3)) != 3:
            raise UserError(f"--config {path}: only double_z false and 3 input/output channels are supported")
        attn = {int(r) for r in dd.get("attn_resolutions", [])}
        arch = Architecture(ch=int(dd["ch"]), ch_mult=mult, num_res_blocks=int(dd["num_res_blocks"]),
                            attn_levels=tuple(i for i in range(len(mult)) if resolution // 2**i in attn),
                            z_channels=int(dd["z_channels"]), embed_dim=int(params["embed_dim"]),
                            codebook_size=int(params["n_embed"]))
    except OSError as exc:
        raise UserError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise UserError(f"--config {path} is not a taming model.yaml (model.params.ddconfig, embed_dim, "
                        f"n_embed): {type(exc).__name__} {detail}") from None
    return arch, resolution


def check_same(given: Architecture, found: Architecture, source: str) -> None:
    """A config that contradicts the tensors: one-line error naming the first mismatch."""
    for f in dataclasses.fields(Architecture):
        a, b = getattr(given, f.name), getattr(found, f.name)
        if a != b:
            fmt = (lambda v: ",".join(map(str, v)) or "none") if isinstance(a, tuple) else str
            raise UserError(f"{source} says {f.name} {fmt(a)}, but the checkpoint's tensors have {fmt(b)}")


def official_names(model: VQModel, fmt: str) -> dict[str, tuple[str, ...]]:
    """Our state-dict key -> the official key(s) it is made of (three for a fused qkv); bookkeeping buffers of
    ours that the official models lack are left out."""
    enc, dec, res = _LEVELS[fmt]
    modules = {m: m for m in ("encoder.conv_in", "encoder.norm_out", "encoder.conv_out", "decoder.conv_in",
                              "decoder.norm_out", "decoder.conv_out", "quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        for n, name in enumerate(_MID[fmt]):
            modules[f"{part}.mid.{n}"] = f"{part}.mid.{name}"
    levels = 1 + sum(isinstance(b, Upsample) for b in model.decoder.up)
    for part, ours, seq, official in (("encoder", "down", model.encoder.down, enc),
                                      ("decoder", "up", model.decoder.up, dec)):
        level, j_res, j_attn = 0, 0, 0  # level in forward order; taming indexes decoder levels by resolution
        for n, block in enumerate(seq):
            at = f"{part}.{official}.{levels - 1 - level if part == 'decoder' and fmt == 'taming' else level}"
            if isinstance(block, ResnetBlock):
                modules[f"{part}.{ours}.{n}"], j_res = f"{at}.{res}.{j_res}", j_res + 1
            elif isinstance(block, AttnBlock):
                modules[f"{part}.{ours}.{n}"], j_attn = f"{at}.attn.{j_attn}", j_attn + 1
            else:
                modules[f"{part}.{ours}.{n}"] = f"{at}.{'downsample' if part == 'encoder' else 'upsample'}"
                level, j_res, j_attn = level + 1, 0, 0
    names: dict[str, tuple[str, ...]] = {"quantizer.codebook": ("quantize.embedding.weight",)}
    for key in model.state_dict():
        if key in names or key in STAT_BUFFERS:
            continue
        prefix = max((m for m in modules if key.startswith(m + ".")), key=len, default=None)
        if prefix is None:
            raise UserError(f"parameter {key} has no {fmt} counterpart; this model cannot be converted")
        leaf = key[len(prefix) + 1:]
        names[key] = tuple(f"{modules[prefix]}.{x}" for x in _LEAF.get(leaf, (leaf,)))
    return names


def fresh_statistics(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the quantizer's bookkeeping restarted (as in a new model; EMA sums = the codebook): what an
    imported or fine-tuned tokenizer starts from."""
    out = {k: v for k, v in state.items() if k not in STAT_BUFFERS}
    out.update({k: fresh[k] for k in STAT_BUFFERS if k in fresh})
    if "quantizer.ema_sum" in fresh:
        out["quantizer.ema_sum"] = state["quantizer.codebook"].detach().clone()
    return out


def to_ours(weights: OfficialWeights, cfg: VQModelConfig) -> dict[str, torch.Tensor]:
    """Our float32 state dict from the official tensors; a missing, misshapen or unexpected tensor is an error."""
    model = VQModel(cfg)
    expected = model.state_dict()
    state, used, out = weights.state, set(), {}
    for ours, official in official_names(model, weights.format).items():
        missing = next((k for k in official if k not in state), None)
        if missing is not None:
            raise UserError(f"the {weights.format} checkpoint has no tensor {missing}, which the architecture "
                            "inferred from it needs; the file is incomplete or not a VQ tokenizer")
        tensor = torch.cat([state[k] for k in official]) if len(official) > 1 else state[official[0]]
        if tensor.shape != expected[ours].shape:
            raise UserError(f"tensor {official[0]} has shape {tuple(state[official[0]].shape)}, which does not fit "
                            f"the architecture inferred from the file (expected {tuple(expected[ours].shape)})")
        out[ours] = tensor.float()
        used.update(official)
    extra = sorted(set(state) - used)
    if extra:
        raise UserError(f"the {weights.format} checkpoint has a tensor this architecture does not use: {extra[0]} "
                        f"({len(extra)} in all)")
    return fresh_statistics(out, expected)


def check_exportable(cfg: VQModelConfig, fmt: str) -> None:
    """The official code can only build GroupNorm(32)-divisible, projection-free VQ models (and LlamaGen only
    with attention at the lowest resolution, taming only without l2-normalisation)."""
    if cfg.quantizer != "vq":
        raise UserError(f"an FSQ tokenizer has no {fmt} equivalent (both official formats use a VQ codebook)")
    if cfg.code_dim not in (0, cfg.embed_dim):
        raise UserError(f"--code-dim {cfg.code_dim} (codes between projections) has no {fmt} equivalent; "
                        "the official models look codes up at embed_dim")
    bad = next((c for c in (cfg.ch, *(cfg.ch * m for m in cfg.ch_mult)) if c % 32), None)
    if bad is not None:
        raise UserError(f"a {bad}-channel layer cannot be exported: the official code always uses GroupNorm with "
                        "32 groups, so every channel count (ch * ch_mult) must be a multiple of 32")
    levels = [i for i in range(len(cfg.ch_mult)) if cfg.image_size // 2**i in cfg.attn_resolutions]
    if fmt == "taming" and cfg.l2_norm:
        raise UserError("an l2-normalised codebook has no taming equivalent (its VectorQuantizer does not "
                        "normalise); use --format llamagen")
    if fmt == "llamagen" and levels != [len(cfg.ch_mult) - 1]:
        raise UserError("LlamaGen's VQ attends at the lowest resolution only; this model's attention "
                        f"resolutions are {','.join(map(str, cfg.attn_resolutions)) or 'none'} "
                        f"(export it with --format taming)")


def to_official(state: dict[str, torch.Tensor], cfg: VQModelConfig, fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict under the official names (float32), as the official model's ``load_state_dict`` expects."""
    check_exportable(cfg, fmt)
    with torch.device("meta"):  # only the structure is needed
        model = VQModel(cfg)
    out = {}
    for ours, official in official_names(model, fmt).items():
        for key, part in zip(official, state[ours].float().chunk(len(official))):
            out[key] = part.contiguous().clone()
    if fmt == "llamagen":  # a registered buffer of LlamaGen's quantizer: its strict load wants it
        out[LLAMAGEN_USAGE_BUFFER] = torch.zeros(LLAMAGEN_USAGE_LEN)
    return out


def taming_yaml(cfg: VQModelConfig) -> str:
    """taming's ``model.yaml`` for this architecture (the loss is not part of the export)."""
    import yaml

    ddconfig = {"double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.image_size, "in_channels": 3,
                "out_ch": 3, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
                "attn_resolutions": list(cfg.attn_resolutions), "dropout": 0.0}
    return yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.codebook_size, "ddconfig": ddconfig,
        "lossconfig": {"target": "torch.nn.Identity"}}}}, sort_keys=False)


def llamagen_args(cfg: VQModelConfig) -> dict[str, Any]:
    """LlamaGen ``ModelArgs`` (and the Encoder/Decoder defaults it hard-codes) for this architecture."""
    return {"codebook_size": cfg.codebook_size, "codebook_embed_dim": cfg.embed_dim, "codebook_l2_norm": cfg.l2_norm,
            "encoder_ch_mult": list(cfg.ch_mult), "decoder_ch_mult": list(cfg.ch_mult), "z_channels": cfg.z_channels,
            "ch": cfg.ch, "num_res_blocks": cfg.num_res_blocks}
