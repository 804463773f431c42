"""Sampling speed: ours vs the official taming-transformers sampler itself, side by side in one process.

    python benchmarks/sampling_speed.py [--quick] [--threads N] [--rounds R] [--warm-steps S]

1. The official `taming.modules.transformer.mingpt` GPT and its cached `sample_with_past` (installed from PyPI:
   pip install -r benchmarks/requirements.txt) against our `transformer.sample.generate` (static KV cache,
   prefill + decode steps, functional calls on the blocks' parameters) on a GPT of the same size (8L/8H/256,
   K=1024, 16x16 grid, random init), batch 16 and batch 1, fp32, plus our bf16 decoding (weights + KV cache)
   beside it. Rounds are interleaved (official, ours fp32, ours bf16; batch 16 then 1) and every round is
   printed: on a shared machine the load changes between rounds, and the per-round ratio is what to read.
2. The same, after the process ran tokenizer training steps (a VQGAN autoencoder, forward + backward + Adam):
   our decode step depends on nothing the process did before, so the ratios should not move.
3. A window model (trained on 16x16, w=8) generating 32x32 vs 16x16: the cost per token is bounded by the window.
Without the official package installed its rows are skipped with a note.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import official  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from transformer.model import GPT, GPTConfig  # noqa: E402
from transformer.sample import generate  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def tokenizer_work(steps: int, quick: bool) -> float:
    """Some other work in this process first: our tokenizer's training steps (seconds taken)."""
    from vqvae.config import VQConfig
    from vqvae.model import VQModel
    size = 32 if quick else 64
    cfg = VQConfig(image_size=size, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(size // 4,),
                   z_channels=32, embed_dim=32, codebook_size=256, perceptual_weight=0.0)
    model = VQModel(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(4, 3, size, size) * 2 - 1
    t0 = time.perf_counter()
    for _ in range(steps):
        xrec, qloss = model(x)[:2]
        loss = (x - xrec).abs().mean() + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def compare(ours: dict[str, GPT], theirs, mingpt, size: int, batches: tuple[int, ...], rounds: int,
            label: str) -> dict[int, list[float]]:
    """Interleaved rounds; prints tok/s of each sampler per round and our speed-up; returns the fp32 ratios."""
    K, steps = ours["fp32"].config.codebook_size, size * size
    print(f"\n{label}")
    print(f"  {'batch':>5} {'round':>5}{'official tok/s':>16}{'ours fp32':>11}{'ours bf16':>11}{'fp32 is':>9}{'bf16 is':>9}")
    ratios: dict[int, list[float]] = {}
    for b in batches:
        best: dict[str, float] = {}
        for r in range(rounds):
            t = {}
            if theirs is not None:
                x = torch.full((b, 1), K)  # the SOS token as the conditioning, as taming's unconditional models
                with torch.no_grad():  # as taming's sampling scripts run it
                    t["official"] = timed(lambda: mingpt.sample_with_past(x, theirs, steps=steps))
            for name, model in ours.items():
                t[name] = timed(lambda: generate(model, b, batch_size=b, seed=r))
            rate = {k: b * steps / v for k, v in t.items()}
            best = {k: min(v, best.get(k, v)) for k, v in t.items()}
            if "official" in t:
                ratios.setdefault(b, []).append(t["official"] / t["fp32"])
                off, r32, r16 = f"{rate['official']:.0f}", f"{t['official'] / t['fp32']:.2f}x", \
                    f"{t['official'] / t['bf16']:.2f}x"
            else:
                off, r32, r16 = "-", "-", "-"
            print(f"  {b:>5} {r + 1:>5}{off:>16}{rate['fp32']:>11.0f}{rate['bf16']:>11.0f}{r32:>9}{r16:>9}")
        if "official" in best:
            print(f"  {b:>5} {'best':>5}{b * steps / best['official']:>16.0f}{b * steps / best['fp32']:>11.0f}"
                  f"{b * steps / best['bf16']:>11.0f}{best['official'] / best['fp32']:>8.2f}x"
                  f"{best['official'] / best['bf16']:>8.2f}x  (fastest of the rounds, each)")
    for b, rs in ratios.items():
        print(f"  batch {b}: ours fp32 is {statistics.median(rs):.2f}x the official (median of {len(rs)} rounds; "
              f"range {min(rs):.2f}-{max(rs):.2f}x)")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per batch size")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: decoding is many small ops, and extra threads only spin)")
    ap.add_argument("--warm-steps", type=int, default=20, help="tokenizer training steps run before part 2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, layers, heads, width, K, batches = ((4, 2, 2, 32, 64, (2, 1)) if args.quick else
                                              (16, 8, 8, 256, 1024, (16, 1)))
    rounds = 1 if args.quick else args.rounds
    print(f"sampling — {machine()}, {time.strftime('%Y-%m-%d')}, GPT {layers}L {heads}H {width}d K={K}, "
          f"{size}x{size} grid, random init, no top-k (both sides), one run per round")
    mingpt = official.mingpt()
    theirs = None
    if mingpt is not None:  # vocabulary: the K codes + an SOS token; block: SOS + the grid
        theirs = mingpt.GPT(K + 1, 1 + size * size, n_layer=layers, n_head=heads, n_embd=width).eval()
    ours32 = GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=0)).eval()
    ours16 = GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=0)).eval()
    ours16.load_state_dict(ours32.state_dict())
    ours = {"fp32": ours32, "bf16": ours16.to(torch.bfloat16)}
    for model in ours.values():
        generate(model, 2, batch_size=2)  # warm-up: masks, allocator
    if theirs is not None:
        with torch.no_grad():
            mingpt.sample_with_past(torch.full((2, 1), K), theirs, steps=4)

    # correctness beside the speed: one seed, the same samples twice; bf16 draws mostly the fp32 codes
    a, b = generate(ours32, batches[0], seed=3)[0], generate(ours32, batches[0], seed=3)[0]
    c = generate(ours["bf16"], batches[0], seed=3)[0]
    print(f"same seed, same samples: {int((a == b).flatten(1).all(1).sum())}/{batches[0]}; "
          f"bf16 draws the fp32 code at {float((a == c).float().mean()):.0%} of positions (one seed)")

    alone = compare(ours, theirs, mingpt, size, batches, rounds, "1. in a fresh process")
    took = tokenizer_work(2 if args.quick else args.warm_steps, args.quick)
    after = compare(ours, theirs, mingpt, size, batches, rounds,
                    f"2. after {2 if args.quick else args.warm_steps} tokenizer training steps in this process "
                    f"({took:.1f} s)")
    for bsz in alone:
        print(f"  batch {bsz}: median ratio alone {statistics.median(alone[bsz]):.2f}x, after other work "
              f"{statistics.median(after[bsz]):.2f}x")

    # 3. window model: per-token cost bounded by the window
    w = size // 2
    win = GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=w)).eval()
    big = (2 * size, 2 * size)
    n = batches[0]
    generate(win, 2, big, batch_size=2)  # warm-up
    t_big, t_small = [], []
    for _ in range(rounds):
        t_big.append(timed(lambda: generate(win, n, big, batch_size=n)))
        t_small.append(timed(lambda: generate(win, n, batch_size=n)))
    r_big, r_small = n * big[0] * big[1] / min(t_big), n * size * size / min(t_small)
    print(f"\n3. window w={w}, trained on {size}x{size}, batch {n}: {r_small:.0f} tok/s at {size}x{size}, "
          f"{r_big:.0f} tok/s at {big[0]}x{big[1]} ({r_big / r_small:.2f}x the rate on 4x the tokens; fastest of "
          f"{rounds})")


if __name__ == "__main__":
    main()
