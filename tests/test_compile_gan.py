"""--compile with the GAN on: the same gradients as the eager step, and the compiled region's backward runs once
per step (the adaptive weight's two gradients at the last layer do not go through it)."""
from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from vqvae.config import VQConfig
from vqvae.losses import VQGANLoss
from vqvae.model import VQModel
from vqvae.train import compile_autoencoder


def counting_backend(calls: Counter):
    """aot_eager (AOT autograd's capture and compiled backward, no code generation) that counts how often each
    compiled backward graph runs."""
    def forward(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def backward(gm, example_inputs):
        key = len(calls)
        calls[key] = 0

        def run(*args):
            calls[key] += 1
            return gm(*args)

        return make_boxed_func(run)

    return aot_autograd(fw_compiler=forward, bw_compiler=backward)


def generator_grads(net, model, loss_fn, x, step):
    xrec, qloss, _ = net(x)
    loss, logs = loss_fn.generator_loss(x, xrec, qloss, step, model.last_layer)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, logs


@pytest.mark.parametrize("ema", [True, False], ids=["ema-codebook", "gradient-codebook"])
def test_compiled_gan_step_equals_eager_and_runs_the_compiled_backward_once(monkeypatch, ema):
    torch.manual_seed(0)
    cfg = VQConfig(image_size=16, ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=8, codebook_size=16, ema=ema,
                   perceptual_weight=0.0, disc_start=0, disc_layers=2, disc_ch=8, restart_after=0, max_steps=10)
    model, loss_fn = VQModel(cfg), VQGANLoss(cfg)
    x = torch.rand(3, 3, 16, 16) * 2 - 1

    calls: Counter = Counter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend(calls)))
    torch._dynamo.reset()
    compiled = compile_autoencoder(model, model)
    for step in (1, 2):  # the second step runs the cached graphs
        # the eager reference starts from the compiled model's state (an EMA codebook moves in every forward)
        eager_model = VQModel(cfg)
        eager_model.load_state_dict(model.state_dict())
        want, want_logs = generator_grads(eager_model, eager_model, loss_fn, x, step=step)
        before = dict(calls)
        got, logs = generator_grads(compiled, model, loss_fn, x, step=step)
        assert calls and all(calls[k] - before.get(k, 0) == 1 for k in calls), calls
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
        assert float(logs["d_weight"]) > 0
        torch.testing.assert_close(logs["d_weight"], want_logs["d_weight"], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
