"""VectorQuantizer / FSQ: loss placement, EMA, restarts, init, usage, FSQ round trips, multi-process sync."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqvae.config import VQConfig
from vqvae.quantizer import FSQ, VectorQuantizer, build_quantizer, entropy_loss


def make_vq(**kw) -> VectorQuantizer:
    """A plain VQ (no default remedies) unless the test asks for them."""
    return VectorQuantizer(VQConfig(**{"codebook_size": 16, "embed_dim": 4, "code_dim": 0, "l2_norm": False, "ema": False,
                                       "restart_after": 0, **kw}))


def test_shapes_and_build():
    for kw in [{}, {"code_dim": 2}, {"l2_norm": True}, {"ema": True, "code_dim": 3, "l2_norm": True}]:
        q = make_vq(**kw)
        out = q(torch.randn(2, 4, 3, 5))
        assert out.z_q.shape == (2, 4, 3, 5) and out.indices.shape == (2, 3, 5)
        assert out.indices.dtype == torch.long and out.loss.dim() == 0 and out.perplexity.dim() == 0
        q.eval()  # (a training forward may move EMA codes after the lookup)
        out = q(torch.randn(2, 4, 3, 5))
        assert torch.allclose(q.indices_to_z(out.indices), out.z_q, atol=1e-6)
    assert isinstance(build_quantizer(VQConfig(quantizer="fsq")), FSQ)
    assert build_quantizer(VQConfig(quantizer="vq", codebook_size=32)).codebook_size == 32


def test_beta_scales_only_the_commitment_term():
    beta = 0.25
    q = make_vq(codebook_size=2, embed_dim=2, beta=beta)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([[[[0.2, 0.9]], [[-0.1, 1.2]]]], requires_grad=True)  # (1, 2, 1, 2): vectors (.2,-.1), (.9,1.2)
    out = q(z)
    assert out.indices.flatten().tolist() == [0, 1]
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    ze = torch.tensor([[0.2, -0.1], [0.9, 1.2]])
    n = ze.numel()  # mse is a mean over all elements
    assert torch.allclose(out.loss, (1 + beta) * ((ze - e) ** 2).mean())
    out.loss.backward()
    z_grad = z.grad[0].permute(1, 2, 0).reshape(2, 2)  # back to (position, channel)
    assert torch.allclose(z_grad, 2 * beta * (ze - e) / n)  # encoder side: beta
    assert torch.allclose(q.codebook.grad, 2 * (e - ze) / n)  # codebook side: weight 1


@pytest.mark.parametrize("seed", range(5))
def test_entropy_loss_matches_its_definition_and_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    n, k, d = (int(v) for v in torch.randint(2, 40, (3,), generator=g))
    t = float(torch.rand((), generator=g)) * 2 + 0.05
    x, codes = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    p = torch.softmax(-torch.cdist(x.double(), codes.double()) ** 2 / t, 1)  # written out independently
    want = -torch.special.xlogy(p, p).sum(1).mean() + torch.special.xlogy(p.mean(0), p.mean(0)).sum() + math.log(k)
    got = entropy_loss(x, codes, t)
    assert torch.allclose(got.double(), want, atol=1e-4) and -1e-4 <= float(got) <= 2 * math.log(k) + 1e-4
    # its extremes: latents on their codes, the codes used evenly (0) or all latents on one code (log K)
    codes = torch.eye(k, d) * 10 if d >= k else torch.randn(k, d, generator=g) * 100
    assert float(entropy_loss(codes.repeat(3, 1), codes, 0.01)) == pytest.approx(0.0, abs=1e-3)
    assert float(entropy_loss(codes[:1].repeat(3, 1), codes, 0.01)) == pytest.approx(math.log(k), abs=1e-3)


def _codes_used_after_training_latents(seed: int, entropy_weight: float) -> tuple[int, int]:
    """Latents bunched near one code, moved by SGD on the quantizer loss alone (EMA codebook): codes used before
    and after."""
    torch.manual_seed(seed)
    q = make_vq(codebook_size=16, embed_dim=4, beta=0.0, ema=True, entropy_weight=entropy_weight,
                entropy_temperature=1.0)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4))
    z = (torch.randn(1, 4, 8, 8) * 0.5 + q.codebook[0].view(1, 4, 1, 1)).requires_grad_()
    opt = torch.optim.SGD([z], lr=50)
    before = q(z).indices.unique().numel()
    for _ in range(100):
        opt.zero_grad()
        loss = q(z).loss
        if loss.requires_grad:  # (weight 0, beta 0: no loss term at all)
            loss.backward()  # the EMA step rewrites the codebook in place after the loss: backward still works
            opt.step()
    q.eval()
    return before, q(z).indices.unique().numel()


@pytest.mark.parametrize("seed", range(3))
def test_entropy_weight_spreads_latents_over_the_codebook(seed):
    before, off = _codes_used_after_training_latents(seed, 0.0)
    same_before, on = _codes_used_after_training_latents(seed, 1.0)
    assert before == same_before <= 5 and off <= before and on >= 7, (before, off, on)


def test_entropy_loss_moves_latents_not_codes():
    x, codes = torch.randn(6, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    entropy_loss(x, codes, 0.5).backward()
    assert codes.grad is None and x.grad.abs().sum() > 0


def test_straight_through_passes_gradient():
    q = make_vq()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q(z).z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))


def test_rotation_trick_same_codes_rotated_and_scaled_gradients():
    torch.manual_seed(0)
    plain, rot = make_vq(), make_vq(rotation_trick=True)
    rot.load_state_dict(plain.state_dict())
    z = torch.randn(2, 4, 3, 3)
    g = torch.randn(2, 4, 3, 3)
    outs, grads = [], []
    for q in (plain, rot):
        zz = z.clone().requires_grad_()
        out = q(zz)
        (out.z_q * g).sum().backward()
        outs.append(out)
        grads.append(zz.grad)
    assert torch.equal(outs[0].indices, outs[1].indices)
    assert torch.allclose(outs[0].z_q, outs[1].z_q, atol=1e-5) and torch.allclose(outs[0].loss, outs[1].loss)
    assert torch.allclose(grads[0], g)  # straight-through copies the gradient
    # the rotation trick rotates it (norm kept) and scales it by ||e|| / ||z|| per position
    e = plain.indices_to_z(outs[0].indices)
    scale = e.norm(dim=1) / z.norm(dim=1)
    assert torch.allclose(grads[1].norm(dim=1), scale * g.norm(dim=1), atol=1e-5)
    assert not torch.allclose(grads[1], grads[0], atol=1e-3)


def test_rotate_onto_parallel_vectors_only_scales():
    from vqvae.quantizer import rotate_onto

    z = torch.tensor([[1.0, 2.0, 2.0]], requires_grad=True)
    q = 2 * z.detach()
    out = rotate_onto(z, q)
    assert torch.allclose(out, q)
    out.backward(torch.tensor([[1.0, -1.0, 0.5]]))
    assert torch.allclose(z.grad, torch.tensor([[2.0, -2.0, 1.0]]))


def test_ema_updates_codebook_without_gradients():
    q = make_vq(codebook_size=4, embed_dim=2, ema=True, ema_decay=0.0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]]))
    z = torch.tensor([[0.5, 0.1], [-0.3, 0.3], [4.0, 6.0], [6.0, 5.0]]).T.reshape(1, 2, 1, 4).requires_grad_()
    before = q.codebook.detach().clone()
    out = q(z)
    (out.loss + out.z_q.sum()).backward()
    assert q.codebook.grad is None
    assert not torch.equal(q.codebook, before)
    # decay 0: used codes become the mean of their assigned latents
    assert torch.allclose(q.codebook[0], torch.tensor([0.1, 0.2]), atol=1e-4)
    assert torch.allclose(q.codebook[1], torch.tensor([5.0, 5.5]), atol=1e-4)
    assert torch.allclose(out.loss, 0.25 * ((z.detach() - before[out.indices.flatten()].T.reshape(1, 2, 1, 4)) ** 2).mean())
    # eval mode leaves the codebook alone
    q.eval()
    after = q.codebook.detach().clone()
    q(z)
    assert torch.equal(q.codebook, after) and q.step.item() == 1


def test_ema_keeps_unused_codes_in_place():
    q = make_vq(codebook_size=8, embed_dim=2, ema=True)
    before = q.codebook.detach().clone()
    for _ in range(5):
        out = q(torch.full((1, 2, 2, 2), 0.5))
    unused = torch.ones(8, dtype=torch.bool)
    unused[out.indices.flatten()] = False
    assert torch.allclose(q.codebook[unused], before[unused], rtol=1e-3)


def test_usage_window_and_step_counter():
    q = make_vq(codebook_size=4, embed_dim=1, usage_window=2)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    assert q.usage() == 0.0
    for value, expected in [(0.0, 0.25), (10.0, 0.5), (20.0, 0.5)]:  # window 2: the last two codes count
        q(torch.full((1, 1, 8, 8), value))  # 64 tokens a step: enough that the window is not scaled up
        assert q.usage() == expected
    assert q.step.item() == 3
    q.eval()
    q(torch.full((1, 1, 8, 8), 30.0))  # eval forwards are not training steps
    assert q.step.item() == 3 and q.usage() == 0.5


def test_dead_code_restart_revives_codes():
    torch.manual_seed(0)
    q = make_vq(codebook_size=16, embed_dim=4, restart_after=2, usage_window=3)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4) + 100.0)  # every code far from the data...
        q.codebook[0] = 0.0  # ...except one
    for _ in range(2):  # 256 tokens a step for 16 codes: thresholds are not scaled up
        q(torch.randn(16, 4, 4, 4))
    assert q.usage() == 1 / 16
    for _ in range(3):
        q(torch.randn(16, 4, 4, 4))
    assert q.usage() > 0.5
    assert q.codebook.abs().max() < 50  # the far codes were replaced by encoder outputs
    assert (q.last_reset == 2).sum() == 15  # restarted once, at step 2, and not again while in use


def test_restart_threshold_and_usage_window_scale_with_codebook_and_tokens():
    """A large codebook seen through few tokens a step: its rare codes are not dead, and usage counts them."""
    from vqvae.quantizer import RARE_FACTOR, scaled_steps

    assert scaled_steps(20, 256, 16 * 8 * 8) == 20  # the defaults: the option as given
    assert scaled_steps(20, 16384, 16 * 8 * 8) == RARE_FACTOR * 16  # 16384 codes, 1024 tokens: 16 steps a use
    assert scaled_steps(100, 16384, 4 * 16 * 16 * 16) == 100  # enough tokens: the option again
    assert scaled_steps(20, 16384, 32) == RARE_FACTOR * 512
    torch.manual_seed(0)
    for tokens, restarts in ((16, False), (4096, True)):  # per step, 256 codes
        q = make_vq(codebook_size=256, embed_dim=4, restart_after=2, usage_window=3)
        for _ in range(4):
            q(torch.randn(tokens // 16, 4, 4, 4))
        assert q.tokens_per_step == tokens
        assert bool((q.last_reset > 0).any()) == restarts  # 16 tokens: 256 idle steps before a code is dead
        assert q.window_steps == (RARE_FACTOR * 256 // 16 if not restarts else 3)
    # gradient accumulation: the tokens of every micro-batch of the step count
    q = make_vq(codebook_size=256, embed_dim=4, restart_after=2)
    q.forwards_per_step = 4
    q(torch.randn(1, 4, 4, 4))
    assert q.tokens_per_step == 64


def _sse(x: torch.Tensor, codes: torch.Tensor) -> float:
    return torch.cdist(x, codes).min(1).values.pow(2).sum().item()


def test_kmeans_and_random_init():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, -5.0]])
    latents = (centres[:, None] + 0.5 * torch.randn(4, 200, 3)).reshape(-1, 3)
    q = make_vq(codebook_size=16, embed_dim=3, ema=True)
    # (B, C, h, w) input, random init: codes are latents
    q.init_codebook(latents.T.reshape(1, 3, 20, 40), "random")
    assert torch.isclose(q.codebook[:, None], latents[None]).all(-1).any(1).all()
    random_sse = _sse(latents, q.codebook.detach())
    q.init_codebook(latents, "kmeans")
    to_centre = torch.cdist(q.codebook.detach(), centres)
    assert to_centre.argmin(1).unique().numel() == 4  # every cluster got codes...
    assert to_centre.min(1).values.max() < 1.5  # ...and none sits between clusters
    assert _sse(latents, q.codebook.detach()) < random_sse
    assert torch.equal(q.ema_sum, q.codebook.detach()) and torch.all(q.ema_count == 1)
    # with projections and cosine codes the codebook lives in the projected, normalised space
    qp = make_vq(codebook_size=4, embed_dim=3, code_dim=2, l2_norm=True)
    qp.init_codebook(latents, "kmeans")
    assert torch.allclose(qp.codebook.norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError):
        qp.init_codebook(latents, "bogus")


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 4, 3, 2), (2, 6)])
def test_fsq_round_trip(levels):
    q = FSQ(VQConfig(embed_dim=len(levels), fsq_levels=levels))
    k = q.codebook_size
    assert k == int(torch.tensor(levels).prod())
    idx = torch.arange(k)
    codes = q.indices_to_codes(idx)
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert codes.abs().max() <= 1.0
    # the bounded rounding reaches both ends of every dimension (even levels included)
    with torch.no_grad():
        q.proj_in.weight.copy_(torch.eye(len(levels))[:, :, None, None])
        q.proj_in.bias.zero_()
    lo, hi = q(torch.full((1, len(levels), 1, 1), -50.0)), q(torch.full((1, len(levels), 1, 1), 50.0))
    assert lo.indices.item() == 0 and hi.indices.item() == k - 1
    # forward indices decode to the forward z_q, and the quantizer's gradient is straight-through
    z = torch.randn(2, len(levels), 3, 3, requires_grad=True)
    out = q(z)
    assert out.indices.shape == (2, 3, 3) and out.loss.item() == 0.0
    assert torch.allclose(q.indices_to_z(out.indices), out.z_q, atol=1e-6)
    out.z_q.sum().backward()
    assert z.grad.abs().sum() > 0


def test_fsq_usage():
    q = FSQ(VQConfig(embed_dim=2, fsq_levels=(3, 3), usage_window=10))
    q(torch.randn(4, 2, 8, 8) * 3)
    assert 0.0 < q.usage() <= 1.0 and q.step.item() == 1


# --- multi-process: every rank must end with the same codebook -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, kw in {"ema": {"ema": True}, "grad_l2": {"l2_norm": True, "code_dim": 4, "ema": False}}.items():
            torch.manual_seed(0)  # same initial weights everywhere
            q = VectorQuantizer(VQConfig(codebook_size=32, embed_dim=8, restart_after=2, **kw))
            torch.manual_seed(100 + rank)  # different data per rank
            q.init_codebook(torch.randn(128, 8) * 3 + rank, "kmeans")
            for _ in range(5):  # concentrated data: most codes idle, so restarts happen (512 tokens a step over
                q(torch.randn(16, 8, 4, 4) * 0.3 + rank)  # both ranks: the threshold stays 2 steps)
            results[name] = {k: v.detach().clone() for k, v in [("codebook", q.codebook), *q.named_buffers()]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_codebooks_stay_identical(tmp_path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in r0:
        assert (r0[name]["last_reset"] > 0).any(), "a restart should have happened"
        for key, value in r0[name].items():
            assert torch.equal(value, r1[name][key]), f"{name}.{key} differs across ranks"
