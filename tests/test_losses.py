"""VQGAN losses: adaptive weight, gradient isolation between G and D, disc_start gating, LPIPS loading."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torchvision

from core.errors import UserError
from vqvae.config import VQConfig
from vqvae.losses import LPIPSLoss, NLayerDiscriminator, VQGANLoss, adaptive_weight, vgg16_checkpoint_path
from vqvae.model import VQModel


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch.hub.get_dir() -> an empty folder."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def make_cfg(**kw) -> VQConfig:
    return VQConfig(**{"image_size": 16, "ch": 16, "ch_mult": (1, 2), "z_channels": 8, "embed_dim": 8,
                       "codebook_size": 16, "perceptual_weight": 0.0, "disc_start": 0, "disc_ch": 8,
                       "disc_layers": 2, **kw})


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    nll = (w.pow(2) * a).sum()  # d/dw = 2 w a
    g = (w * b).sum()  # d/dw = b
    lam = adaptive_weight(nll, g, w)
    expected = (2 * w * a).norm() / (b.norm() + 1e-4)
    assert torch.allclose(lam, expected.detach()) and not lam.requires_grad
    assert torch.allclose(adaptive_weight(nll, g, w, loss_scale=1024.0), lam)  # the scale cancels
    assert adaptive_weight(nll, (w * 1e-12).sum(), w).item() == 1e4  # clamped
    assert adaptive_weight(nll, g * float("inf"), w).item() == 0.0  # overflow: no GAN push
    nll.backward()  # the graph was retained for the real backward
    assert torch.allclose(w.grad, 2 * w.detach() * a)


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
    with pytest.raises(UserError) as err:
        LPIPSLoss("pretrained")
    message = err.value.format_message()
    assert "\n" not in message and "--perceptual-weight 0" in message
    assert os.path.join(str(empty_hub), "hub", "checkpoints", "vgg16-397923af.pth") in message
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


def test_lpips_pretrained_loads_torchvision_checkpoint(empty_hub):
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # VGG16's `features`
    path = vgg16_checkpoint_path()
    os.makedirs(os.path.dirname(path))
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    lp = LPIPSLoss("pretrained")
    assert torch.equal(lp.net.net.slice1[0].weight, features[0].weight)
    assert torch.equal(getattr(lp.net.net.slice5, "28").bias, features[28].bias)
