"""Logits filters and the samplers: cached decoding == recomputation, determinism, guidance, best-of, grids."""
from __future__ import annotations

import math

import pytest
import torch

from transformer.model import GPT, GPTConfig
from transformer.sample import generate, top_k_filter, top_p_filter

INF = float("-inf")


def tiny(window: int = 0, grid=(4, 5), classes: int = 3, K: int = 11, seed: int = 0) -> GPT:
    """float64 so the cached and recomputed logits agree to ~1e-15 and draw the same tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(K, classes, grid, n_layer=2, n_head=2, n_embd=16, window_size=window)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


# ---- filters ----

def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 4.0, 1.0, 4.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[INF, 3.0, 2.0, INF], [4.0, 4.0, INF, 4.0]]))  # ties kept
    assert torch.equal(top_k_filter(logits, 1)[0], torch.tensor([INF, 3.0, INF, INF]))
    assert torch.equal(top_k_filter(logits, 4), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)  # k >= V: unchanged
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            top_k_filter(logits, bad)


def test_top_p_filter():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.equal(top_p_filter(logits, 0.5).isfinite(), torch.tensor([[True, False, False, False]]))
    assert torch.equal(top_p_filter(logits, 0.6).isfinite(), torch.tensor([[True, True, False, False]]))
    assert torch.equal(top_p_filter(logits, 0.9).isfinite(), torch.tensor([[True, True, True, False]]))
    assert torch.equal(top_p_filter(logits, 1.0), logits)  # p = 1: unchanged
    assert top_p_filter(logits, 1e-9).isfinite().sum() == 1  # always at least one token
    kept = top_p_filter(logits, 0.6)
    assert torch.equal(kept[kept.isfinite()], logits[0, :2])  # kept logits are untouched
    ties = torch.tensor([[0.4, 0.3, 0.3]]).log()
    assert top_p_filter(ties, 0.5).isfinite().all()  # the tie with the last kept token is kept
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.equal(top_p_filter(shuffled, 0.6).isfinite(), torch.tensor([[False, True, False, True]]))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            top_p_filter(logits, bad)


# ---- cached decoding == the recompute-everything reference ----

CASES = {
    "full": dict(window=0, kwargs={}),
    "window_row_major": dict(window=3, kwargs={}),
    "window_column_major": dict(window=2, kwargs={}),
    "classes": dict(window=2, kwargs=dict(labels=torch.tensor([0, 2, 1, 0]))),
    "context": dict(window=0, kwargs=dict(context=torch.randint(11, (4, 2, 5)))),
    "guidance": dict(window=2, kwargs=dict(labels=torch.tensor([1, 1, 2, 0]), cfg_scale=2.5)),
    "best_of": dict(window=0, kwargs=dict(labels=torch.tensor([2, 1, 0, 0]), best_of=3)),
    "filters": dict(window=2, kwargs=dict(temperature=0.7, top_k=5, top_p=0.9)),
    "larger_grid": dict(window=2, kwargs=dict(grid_shape=(7, 9), context=torch.randint(11, (1, 3, 9)))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cache_equals_recompute(case):
    model = tiny(CASES[case]["window"])
    kwargs = dict(CASES[case]["kwargs"], seed=3, batch_size=3)  # batch_size splits the candidates into chunks
    codes, logp = generate(model, 4, **kwargs)
    ref_codes, ref_logp = generate(model, 4, use_cache=False, **kwargs)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-9, atol=1e-9)
    assert codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < model.config.codebook_size
    if "context" in kwargs:
        r = kwargs["context"].shape[1]
        assert torch.equal(codes[:, :r], kwargs["context"].expand(4, -1, -1))


@pytest.mark.parametrize("window,batch", [(0, 5), (0, 1), (3, 4)])
def test_float32_cache_draws_the_recomputed_tokens(window, batch):
    """In float32 (what generate runs) the decode step's rounding differs from the full forward's, but
    not by enough to change a draw."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(64, 0, (6, 6), n_layer=2, n_head=4, n_embd=32, window_size=window)).eval()
    codes, _ = generate(model, batch, seed=5, batch_size=batch)
    assert torch.equal(codes, generate(model, batch, seed=5, batch_size=batch, use_cache=False)[0])


def test_seed_determinism_and_batch_independence():
    model = tiny(window=2)
    a = generate(model, 5, seed=7)
    assert torch.equal(a[0], generate(model, 5, seed=7)[0])
    assert torch.equal(a[0], generate(model, 5, seed=7, batch_size=2)[0])  # chunking does not change samples
    assert not torch.equal(a[0], generate(model, 5, seed=8)[0])


SAMPLE_IN_A_PROCESS = """
import hashlib, sys, torch
sys.path.insert(0, {root!r})
from transformer.model import GPT, GPTConfig
from transformer.sample import generate
torch.manual_seed(1)  # the weights
model = GPT(GPTConfig(64, 3, (6, 7), n_layer=2, n_head=4, n_embd=32, window_size={window})).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.3)
torch.manual_seed(12345 + {run})  # a different global RNG state in each process: the seed alone decides
codes, logp = generate(model, 3, labels=torch.tensor([0, 1, 2]), cfg_scale=2.0, top_k=20, seed=11, batch_size=2)
print(hashlib.sha256(codes.numpy().tobytes() + logp.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("window", [0, 2])
def test_same_seed_same_samples_in_two_processes(window):
    """--seed promises the same samples: two separate processes draw bit-identical codes and log-probabilities
    in float32 (nothing in the decode step depends on timing or on what the process did before)."""
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    out = [subprocess.run([sys.executable, "-c", SAMPLE_IN_A_PROCESS.format(root=root, window=window, run=run)],
                          capture_output=True, text=True, timeout=120, check=True).stdout.strip() for run in (0, 1)]
    assert len(out[0]) == 64 and out[0] == out[1], out


def test_log_prob_is_that_of_the_drawn_tokens():
    model = tiny(window=0)
    labels = torch.tensor([0, 2])
    codes, logp = generate(model, 2, labels=labels)
    seq = torch.cat([model.config.class_token(labels)[:, None], codes.flatten(1)], 1)
    with torch.no_grad():
        expected = model(seq[:, :-1]).log_softmax(-1).gather(2, seq[:, 1:, None]).sum((1, 2))
    torch.testing.assert_close(logp, expected)


def test_best_of_keeps_the_most_likely_candidate():
    model = tiny(window=2)
    best, best_logp = generate(model, 2, best_of=3, seed=5)
    every, every_logp = generate(model, 6, seed=5)  # the same candidates: same uniforms, same order
    pick = every_logp.view(2, 3).argmax(1) + torch.tensor([0, 3])
    assert torch.equal(best, every[pick])
    assert torch.equal(best_logp, every_logp.view(2, 3).max(1).values)


def test_guidance():
    model = tiny(window=2)
    labels = torch.tensor([1, 2])
    plain = generate(model, 2, labels=labels)
    assert torch.equal(plain[0], generate(model, 2, labels=labels, cfg_scale=1.0)[0])
    guided = generate(model, 2, labels=labels, cfg_scale=4.0)
    assert not torch.equal(plain[0], guided[0])
    with pytest.raises(ValueError, match="labels"):
        generate(model, 2, cfg_scale=2.0)


def test_top_k_one_is_greedy():
    model = tiny(window=0)
    codes, _ = generate(model, 2, top_k=1)
    seq = torch.cat([torch.full((2, 1), model.config.sos_id), codes.flatten(1)], 1)
    with torch.no_grad():
        assert torch.equal(model(seq[:, :-1]).argmax(-1), seq[:, 1:])


def test_larger_grid_window_only():
    codes, logp = generate(tiny(window=2, grid=(4, 4)), 2, grid_shape=(8, 8))
    assert codes.shape == (2, 8, 8) and logp.isfinite().all()
    with pytest.raises(ValueError, match="full-attention"):
        generate(tiny(window=0, grid=(4, 4)), 2, grid_shape=(8, 8))


def test_argument_validation():
    model = tiny(window=0, classes=0)
    for kwargs in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5), dict(labels=torch.tensor([0, 0])),
                   dict(context=torch.zeros(2, 1, 3, dtype=torch.long)), dict(best_of=0)):
        with pytest.raises(ValueError):
            generate(model, 2, **kwargs)
    with pytest.raises(ValueError):
        generate(tiny(window=0), 2, labels=torch.tensor([0, 3]))  # class out of range


def test_model_mode_restored():
    model = tiny(window=2).train()
    generate(model, 1)
    assert model.training
    assert math.isfinite(generate(model, 1, temperature=0.5)[1].item())


def test_default_top_k_is_a_share_of_the_codebook():
    """2% of the codebook, never below 5 (the measured default at 128-256 codes, and never greedy decoding);
    0 means no filter; an explicit k is kept."""
    from transformer.sample import top_k_for

    assert [top_k_for(None, k) for k in (2, 32, 128, 256, 1024, 8192, 16384)] == [5, 5, 5, 5, 20, 164, 328]
    assert top_k_for(0, 1024) is None and top_k_for(7, 16384) == 7
