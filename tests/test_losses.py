"""VQGAN losses: adaptive weight, gradient isolation between G and D, disc_start gating, LPIPS loading."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torchvision

from core.errors import UserError
from vqvae.config import VQConfig
from vqvae.losses import LPIPSLoss, NLayerDiscriminator, VQGANLoss, _frozen, adaptive_weight, vgg16_checkpoint_path
from vqvae.model import VQModel


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch.hub.get_dir() -> an empty folder."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def make_cfg(**kw) -> VQConfig:
    # ema False: the official VQGAN's codebook learns from the codebook loss, which these tests compare against
    return VQConfig(**{"ema": False, "image_size": 16, "ch": 16, "ch_mult": (1, 2), "z_channels": 8, "embed_dim": 8,
                       "codebook_size": 16, "perceptual_weight": 0.0, "disc_start": 0, "disc_ch": 8,
                       "disc_layers": 2, **kw})


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    lam = adaptive_weight(a, b)
    assert torch.allclose(lam, a.norm() / (b.norm() + 1e-4)) and not lam.requires_grad
    assert torch.allclose(adaptive_weight(a * 1024, b * 1024, loss_scale=1024.0), lam)  # the scale cancels
    assert adaptive_weight(a, b * 1e-12).item() == 1e4  # clamped
    assert adaptive_weight(a, b * float("inf")).item() == 0.0  # overflow: no GAN push


def _official_generator_grads(model, loss_fn, x):
    """The official formulation: λ from autograd.grad of nll and g_loss at the last layer, then one backward
    of the whole total through LPIPS and the discriminator again."""
    xrec, qloss, _ = model(x)
    nll = (x - xrec).abs().mean() + loss_fn.perceptual_weight * loss_fn.perceptual(x, xrec).mean()
    g_loss = -loss_fn.discriminator(xrec).mean()
    last = model.last_layer
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * loss_fn.disc_weight
    total = nll + d_weight * g_loss + loss_fn.codebook_weight * qloss
    total.backward()
    return total.detach(), d_weight, [p.grad.clone() for p in model.parameters()]


def test_generator_loss_backpropagates_lpips_and_discriminator_once_with_the_official_gradients(empty_hub):
    torch.manual_seed(0)
    cfg = make_cfg(image_size=32, perceptual_weight=1.0, perceptual_backbone="random")
    model, loss_fn = VQModel(cfg), VQGANLoss(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with _frozen(loss_fn.discriminator):
        ref_total, ref_weight, ref_grads = _official_generator_grads(model, loss_fn, x)
    model.zero_grad()
    passes = {"lpips": 0, "disc": 0}

    def counting(name, module):
        def hook(_module, _inputs, out):
            if out.requires_grad:  # LPIPS' input image x carries none
                out.register_hook(lambda g: passes.__setitem__(name, passes[name] + 1))
        return module.register_forward_hook(hook)

    counting("lpips", loss_fn.perceptual.net.net.slice1)  # the VGG trunk's first block
    counting("disc", loss_fn.discriminator)
    xrec, qloss, _ = model(x)
    total, logs = loss_fn.generator_loss(x, xrec, qloss, step=0, last_layer=model.last_layer)
    total.backward()
    assert passes == {"lpips": 1, "disc": 1}  # the official code: 2 each
    assert torch.allclose(total, ref_total) and torch.allclose(logs["d_weight"], ref_weight)
    scale = torch.cat([g.flatten() for g in ref_grads]).norm()
    for p, g in zip(model.parameters(), ref_grads):  # float32 rounding apart (some biases' gradients are ~0)
        assert (p.grad - g).norm() <= 1e-4 * g.norm() + 1e-6 * scale
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())


def test_discriminator_architecture():
    d = NLayerDiscriminator(3, ch=8, n_layers=3)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert abs(convs[3].weight.std().item() - 0.02) < 0.002  # N(0, 0.02) init


def _setup(**kw):
    torch.manual_seed(0)
    cfg = make_cfg(**kw)
    return VQModel(cfg), VQGANLoss(cfg), torch.rand(2, 3, 16, 16) * 2 - 1


def test_generator_step_gives_no_discriminator_grads():
    model, loss_fn, x = _setup()
    xrec, qloss, _ = model(x)
    total, logs = loss_fn.generator_loss(x, xrec, qloss, step=0, last_layer=model.last_layer)
    total.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # unfrozen again afterwards
    assert model.last_layer.grad.abs().sum() > 0
    assert logs["d_weight"] > 0 and logs["g_loss"] != 0
    assert set(logs) == {"rec_loss", "p_loss", "nll_loss", "g_loss", "d_weight", "q_loss", "total_loss"}
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())  # on the device until logged
    expected = logs["nll_loss"] + logs["d_weight"] * logs["g_loss"] + logs["q_loss"]
    assert abs(logs["total_loss"] - expected) < 1e-5


def test_discriminator_step_gives_no_generator_grads():
    model, loss_fn, x = _setup()
    xrec, _, _ = model(x)
    d_loss, logs = loss_fn.discriminator_loss(x, xrec, step=0)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert set(logs) == {"d_loss", "logits_real", "logits_fake"}
    hinge = 0.5 * (max(0, 1 - logs["logits_real"]) + max(0, 1 + logs["logits_fake"]))
    assert d_loss.item() >= hinge - 1e-6  # mean of relu >= relu of mean


def test_gan_off_before_disc_start():
    model, loss_fn, x = _setup(disc_start=5)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    xrec, qloss, _ = model(x)
    total, logs = loss_fn.generator_loss(x, xrec, qloss, step=4, last_layer=model.last_layer)
    d_loss, d_logs = loss_fn.discriminator_loss(x, xrec, step=4)
    assert not calls and logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs["d_loss"] == 0.0
    assert not loss_fn.disc_active(4) and loss_fn.disc_active(5)
    loss_fn.generator_loss(x, xrec, qloss, step=5, last_layer=model.last_layer)
    loss_fn.discriminator_loss(x, xrec, step=5)
    assert len(calls) == 2


def test_no_grad_validation_uses_zero_adaptive_weight():
    model, loss_fn, x = _setup(rec_loss="l2")
    model.eval()
    with torch.no_grad():
        xrec, qloss, _ = model(x)
        total, logs = loss_fn.generator_loss(x, xrec, qloss, step=10, last_layer=model.last_layer)
    assert logs["d_weight"] == 0.0
    assert abs(logs["rec_loss"] - (x - xrec).pow(2).mean().item()) < 1e-6


def test_generator_uses_bare_module_of_a_wrapped_discriminator():
    model, loss_fn, x = _setup()

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            raise AssertionError("the generator pass must bypass the wrapper")

    loss_fn.discriminator = Wrapper(loss_fn.discriminator)
    xrec, qloss, _ = model(x)
    total, _ = loss_fn.generator_loss(x, xrec, qloss, step=0, last_layer=model.last_layer)
    total.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())


def test_lpips_pretrained_without_weights_is_a_user_error(empty_hub):
    """Offline (the download fails): one line naming the file, the URL, where to put it, and the flag."""
    with pytest.raises(UserError) as err:
        LPIPSLoss("pretrained")
    message = err.value.format_message()
    assert "\n" not in message and "--perceptual-weight 0" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message and "network disabled" in message
    assert f"put it at {os.path.join(str(empty_hub), 'hub', 'checkpoints', 'vgg16-397923af.pth')}" in message
    with pytest.raises(UserError):
        VQGANLoss(make_cfg(perceptual_weight=1.0, perceptual_backbone="pretrained"))
    VQGANLoss(make_cfg(perceptual_weight=0.0, perceptual_backbone="pretrained"))  # no VGG needed


def test_lpips_random_backbone_offline(empty_hub):
    model, loss_fn, x16 = _setup(perceptual_weight=1.0, perceptual_backbone="random")
    xrec, qloss, _ = model(x16)
    _, logs = loss_fn.generator_loss(x16, xrec, qloss, step=0, last_layer=model.last_layer)
    assert logs["p_loss"] > 0
    lp = loss_fn.perceptual
    loss_fn.train()
    assert not lp.training and not lp.net.training  # stays in eval: no dropout in the heads
    assert all(not p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    d = lp(x, y)
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)
    assert torch.allclose(lp(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    d.sum().backward()
    assert y.grad.abs().sum() > 0


def test_missing_vgg16_weights_are_downloaded_into_the_hub_cache(empty_hub, monkeypatch):
    """The download goes through torch.hub (torchvision's own mechanism), with its progress bar and hash check, into
    the hub cache; the file then loads. The network is mocked: the "server" hands over a VGG16 features file."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix, progress))
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    lp = LPIPSLoss("pretrained")
    assert calls == [("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af", True)]
    assert os.path.isfile(vgg16_checkpoint_path()) and str(empty_hub) in vgg16_checkpoint_path()
    assert torch.equal(lp.net.net.slice1[0].weight, features[0].weight)
    LPIPSLoss("pretrained")  # cached now: no second download
    assert len(calls) == 1


def test_lpips_pretrained_loads_torchvision_checkpoint(empty_hub):
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # VGG16's `features`
    path = vgg16_checkpoint_path()
    os.makedirs(os.path.dirname(path))
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    lp = LPIPSLoss("pretrained")
    assert torch.equal(lp.net.net.slice1[0].weight, features[0].weight)
    assert torch.equal(getattr(lp.net.net.slice5, "28").bias, features[28].bias)


def test_overflowing_gan_gradient_drops_the_gan_term_and_keeps_the_loss_finite():
    """fp16: a scaled discriminator gradient that overflows gives λ = 0, as in the official sum, not a NaN loss."""

    class InfGradient(torch.autograd.Function):
        forward = staticmethod(lambda ctx, t: t.clone())
        backward = staticmethod(lambda ctx, g: g * float("inf"))

    class Overflowing(nn.Module):
        def __init__(self, disc: nn.Module):
            super().__init__()
            self.disc = disc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return InfGradient.apply(self.disc(x))

    model, loss_fn, x = _setup(disc_start=1)
    xrec, qloss, _ = model(x)
    loss_fn.generator_loss(x, xrec, qloss, step=0, last_layer=model.last_layer)[0].backward()  # GAN off
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_fn.discriminator = Overflowing(loss_fn.discriminator)
    xrec, qloss, _ = model(x)
    total, logs = loss_fn.generator_loss(x, xrec, qloss, step=1, last_layer=model.last_layer, loss_scale=1024.0)
    total.backward()
    assert logs["d_weight"] == 0.0 and torch.isfinite(total)
    assert all(torch.allclose(p.grad, g) for p, g in zip(model.parameters(), expected))


def test_train_vqvae_offline_without_vgg16_fails_in_one_line_before_a_run(empty_hub, dataset, tracking_dir):
    import mlflow

    from conftest import TINY_VQ, error_line, invoke

    before = len(mlflow.search_runs(search_all_experiments=True))
    i = TINY_VQ.index("--perceptual-weight")
    args = TINY_VQ[:i] + TINY_VQ[i + 2:]  # the default LPIPS weight
    res = invoke("train-vqvae", "--manifest", dataset, *args, "--max-steps", "1")
    assert res.exit_code == 1
    line = error_line(res.stderr)
    assert "vgg16-397923af.pth" in line and "--perceptual-weight 0" in line and "download.pytorch.org" in line
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
