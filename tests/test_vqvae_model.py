"""VQModel: shapes for several configs, index round trips, straight-through gradients, AE warm-up path."""
from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from vqvae.config import VQConfig
from vqvae.model import AttnBlock, Upsample, VQModel


CONFIGS = {
    "two_levels_no_attn": dict(image_size=16, ch_mult=(1, 2)),
    "three_levels_attn": dict(image_size=32, ch_mult=(1, 2, 2), attn_resolutions=(16,)),
    "four_levels_lowdim_cosine": dict(image_size=32, ch_mult=(1, 1, 2, 2), attn_resolutions=(8,), code_dim=4,
                                      l2_norm=True, ema=True),
    "odd_channels_fsq": dict(image_size=16, ch=24, ch_mult=(1, 2, 2), quantizer="fsq", fsq_levels=(5, 4, 3)),
}


def make_cfg(**kw) -> VQConfig:
    return VQConfig(**{"ch": 16, "num_res_blocks": 1, "z_channels": 8, "embed_dim": 8, "codebook_size": 32, **kw})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_index_round_trip(name):
    torch.manual_seed(0)
    cfg = make_cfg(**CONFIGS[name])
    model = VQModel(cfg)
    f, s = cfg.downsample_factor, cfg.image_size
    assert model.downsample_factor == f and model.codebook_size == model.quantizer.codebook_size
    x = torch.rand(2, 3, s, s) * 2 - 1
    xrec, qloss, q = model(x)
    assert xrec.shape == x.shape and qloss.dim() == 0
    assert q.z_q.shape == (2, cfg.embed_dim, s // f, s // f) and q.indices.shape == (2, s // f, s // f)
    assert model.encode_latents(x).shape == q.z_q.shape
    assert model.last_layer is model.decoder.conv_out.weight
    # attention after each ResNet block at the configured sizes (encoder n, decoder n+1), plus the two middles
    n_attn = sum(isinstance(m, AttnBlock) for m in model.modules())
    assert n_attn == 2 + (2 * cfg.num_res_blocks + 1) * len(cfg.attn_resolutions)
    model.eval()
    with torch.no_grad():
        idx = model.encode_to_indices(x)
        assert idx.dtype == torch.long and idx.shape == (2, s // f, s // f)
        assert idx.max() < model.codebook_size
        assert torch.allclose(model.decode_indices(idx), model(x)[0], atol=1e-5)


def test_non_square_input():
    model = VQModel(make_cfg(image_size=16, ch_mult=(1, 2, 2)))
    xrec, _, q = model(torch.randn(1, 3, 16, 24))
    assert xrec.shape == (1, 3, 16, 24) and q.indices.shape == (1, 4, 6)


def test_straight_through_reaches_encoder():
    torch.manual_seed(0)
    model = VQModel(make_cfg(image_size=16, ch_mult=(1, 2, 2), attn_resolutions=(8,)))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    xrec, _, _ = model(x)
    (xrec - x).abs().mean().backward()  # reconstruction only: the encoder learns through the quantizer
    for name, p in [*model.encoder.named_parameters(), *model.quant_conv.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_autoencoder_warmup_bypasses_quantizer():
    model = VQModel(make_cfg(image_size=16, ch_mult=(1, 2)))
    x = torch.randn(2, 3, 16, 16)
    xrec, qloss, q = model(x, quantize=False)
    assert xrec.shape == x.shape and qloss.item() == 0.0 and q.indices is None and q.perplexity is None
    assert model.quantizer.step.item() == 0  # no usage bookkeeping during warm-up
    assert torch.equal(q.z_q, model.encode_latents(x))


def test_bad_image_size():
    with pytest.raises(UserError, match="divisible"):
        make_cfg(image_size=30, ch_mult=(1, 2, 2))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_upsample_equals_nearest_then_conv(memory_format):
    """The folded sub-pixel Upsample computes taming's interpolate + 3x3 conv, values and gradients, in either
    memory format."""
    torch.manual_seed(0)
    up = Upsample(5).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, *up.parameters()), g), torch.autograd.grad(ref, (x, *up.parameters()), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_step_matches_the_taming_modules(memory_format):
    """Forward, loss and every gradient equal those of the official modules (tests/taming_reference.py)
    loaded with the same weights, to fp32 rounding: guards the fused qkv, the folded Upsample and the in-place
    activations (the quantizer computes in fp32, so fp32 it is)."""
    import taming_reference as taming
    from vqvae.convert import to_official

    torch.manual_seed(0)
    cfg = VQConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
                   embed_dim=32, codebook_size=16, code_dim=0, l2_norm=False, ema=False, restart_after=0)
    ours = VQModel(cfg).train()
    ref = taming.VQModel(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.image_size,
                         cfg.z_channels, cfg.embed_dim, cfg.codebook_size).train()
    ref.load_state_dict(to_official(ours.state_dict(), cfg, "taming"))
    x = (torch.rand(2, 3, 16, 16, ) * 2 - 1).contiguous(memory_format=memory_format)
    xrec, qloss, q = ours(x)
    ref_rec, ref_qloss = ref(x)
    assert torch.equal(q.indices.flatten(), ref.quantize(ref.quant_conv(ref.encoder(x)))[2])
    torch.testing.assert_close(xrec, ref_rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qloss, ref_qloss, rtol=1e-5, atol=1e-7)
    ((x - xrec).abs().mean() + qloss).backward()
    ((x - ref_rec).abs().mean() + ref_qloss).backward()
    grads = to_official({k: p.grad for k, p in ours.named_parameters()}, cfg, "taming")
    ref_grads = dict(ref.named_parameters())
    scale = max(g.abs().max() for g in grads.values())
    for key, g in grads.items():
        torch.testing.assert_close(g, ref_grads[key].grad, rtol=1e-4, atol=1e-5 * scale, msg=key)


def test_the_test_copy_of_the_taming_modules_equals_the_installed_package():
    """tests/taming_reference.py against the official package, where it is installed (benchmarks/requirements.txt;
    not in CI): same parameter names, same outputs."""
    pytest.importorskip("einops")
    official = pytest.importorskip("taming.modules.diffusionmodules.model")
    quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    import taming_reference as taming

    torch.manual_seed(0)
    args = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=32)
    copy = taming.VQModel(*args.values(), 32, 16).eval()
    dd = dict(args, double_z=False, in_channels=3, out_ch=3, dropout=0.0)
    ref = torch.nn.ModuleDict({"encoder": official.Encoder(**dd), "decoder": official.Decoder(**dd),
                               "quantize": quantize.VectorQuantizer2(16, 32, beta=0.25),
                               "quant_conv": torch.nn.Conv2d(32, 32, 1), "post_quant_conv": torch.nn.Conv2d(32, 32, 1)})
    ref.load_state_dict(copy.state_dict())  # strict: the same names and shapes
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    quant, diff, _ = ref["quantize"](ref["quant_conv"](ref["encoder"](x)))
    want = ref["decoder"](ref["post_quant_conv"](quant))
    got, got_diff = copy(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_diff, diff)
