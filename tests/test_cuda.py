"""CUDA-only checks (``pytest -m cuda``; benchmarks/gpu_check.py runs them on a GPU machine, CI skips them):
training steps that never wait for the GPU, fused Adam skipping a step on the device, the compiled GAN step."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_VQ, invoke
from core.loop import TrainLoop, step_optimizer
from core.runtime import Runtime, fused_adam

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_vqvae_steps_never_wait_for_the_gpu(tracking_dir, dataset, monkeypatch, precision):
    """torch.cuda.set_sync_debug_mode("error") between a step's start and its end: any host synchronisation in the
    step (GAN, EMA, grad accumulation, dead-code restarts, a GradScaler) raises."""
    begin, end = TrainLoop.begin_step, TrainLoop.end_step
    steps = []

    def strict_begin(self):
        begin(self)
        steps.append(self.step)
        torch.cuda.set_sync_debug_mode("error")

    def lenient_end(self, items):
        torch.cuda.set_sync_debug_mode("default")
        return end(self, items)

    monkeypatch.setattr(TrainLoop, "begin_step", strict_begin)
    monkeypatch.setattr(TrainLoop, "end_step", lenient_end)
    try:
        res = invoke("train-vqvae", "--manifest", dataset, *TINY_VQ, "--device", "cuda", "--precision", precision,
                     "--max-steps", "4", "--disc-start", "1", "--ema-weights", "0.9", "--grad-accum", "2",
                     "--restart-after", "1", "--log-every", "4", "--val-every", "4", "--ckpt-every", "4")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.exit_code == 0, res.output
    assert steps == [0, 1, 2, 3]


def test_fused_adam_skips_a_step_on_the_gpu():
    model = torch.nn.Linear(8, 4).cuda()
    opt = fused_adam(model.parameters(), 1e-2, (0.9, 0.95))
    assert opt.defaults["fused"]
    scaler = Runtime(torch.device("cuda"), "fp16").grad_scaler()
    before = copy.deepcopy(model.state_dict())
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(4, 8, device="cuda")).float().pow(2).mean()
    scaler.scale(loss).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step_optimizer(opt, scaler, torch.zeros((), dtype=torch.bool, device="cuda"), clip=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_compiled_gan_step_matches_eager_on_the_gpu():
    from vqvae.config import VQConfig
    from vqvae.losses import VQGANLoss
    from vqvae.model import VQModel
    from vqvae.train import compile_autoencoder

    torch.manual_seed(0)
    cfg = VQConfig(image_size=32, ch=32, ch_mult=(1, 2), z_channels=16, embed_dim=16, codebook_size=64,
                   perceptual_weight=0.0, disc_start=0, disc_layers=2, disc_ch=16, restart_after=0, max_steps=10)
    model, loss_fn = VQModel(cfg).cuda(), VQGANLoss(cfg).cuda()
    eager = copy.deepcopy(model)
    x = torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1
    grads = []
    for net, m in ((eager, eager), (compile_autoencoder(model, model), model)):
        xrec, qloss, _ = net(x)
        loss_fn.generator_loss(x, xrec, qloss, 1, m.last_layer)[0].backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=name)
