"""Training-step speed of a window GPT: block-sparse windowed attention vs the dense masked attention.

    python benchmarks/gpt_train_speed.py [--quick] [--threads N] [--rounds R]

1. A w=8 model on a 32x32 code grid (T = 1025), forward + backward + AdamW step on random codes, both paths on
   the same weights and batch, timed in alternation (fastest of R). Also checks that both give the same logits.
   A third step, with attention replaced by each position's own value, times everything else a step does (the
   linear layers, norms, head, loss, optimizer): dense / that step is the most any attention kernel could give.
2. A full-attention model on the same grid with the relative bias (SDPA with a float mask) vs --no-rel-bias
   (SDPA with is_causal: the fused flash/efficient kernels on GPU).
3. The official taming `mingpt.GPT` training step itself (installed from PyPI: pip install -r
   benchmarks/requirements.txt; skipped with a note otherwise) beside ours, full attention, same sizes, same batch.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import official  # noqa: E402
from benchmarks.common import fastest, machine  # noqa: E402
import transformer.attention as attention  # noqa: E402
from transformer.attention import attention_index, window_rows_index, windowed_attention  # noqa: E402
from transformer.model import GPT, GPTConfig  # noqa: E402


def attention_only(model: GPT, batch: int, rounds: int) -> dict[bool, float]:
    """Seconds for one layer's attention, forward + backward, on the whole grid: dense vs windowed (fastest of R)."""
    cfg, attn = model.config, model.blocks[0].attn
    grid, T, hd = cfg.grid_shape, 1 + cfg.grid_shape[0] * cfg.grid_shape[1], cfg.n_embd // cfg.n_head
    qkv = torch.randn(batch, T, 3, cfg.n_head, hd, requires_grad=True)  # as the fused projection lays them out
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    grad = torch.randn(batch, T, cfg.n_embd)  # a real gradient: .sum()'s stride-0 one sends bmm down a slow path
    index, w_index = attention_index(grid, cfg.window, q.device), window_rows_index(grid, cfg.window, q.device)

    def dense() -> torch.Tensor:  # and the transpose back to (B, T, C) that Attention.forward does after it
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.bias(index, q.dtype)[None])
        return y.transpose(1, 2).flatten(2)
    sparse = lambda: windowed_attention(qkv, attn.bias(w_index, q.dtype), grid, cfg.window, 0.0)  # noqa: E731
    return fastest({False: lambda: dense().backward(grad), True: lambda: sparse().backward(grad)}, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine extra threads mostly wait)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grid", type=int, default=32, help="code grid side")
    ap.add_argument("--window", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, w, layers, heads, width, K = (8, 2, 2, 2, 32, 64) if args.quick else (args.grid, args.window, 4, 4, 128, 1024)
    model = GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=w)).train()
    seq = torch.randint(K, (args.batch_size, 1 + size * size))
    seq[:, 0] = model.config.sos_id
    sparse_step = train_step(model, seq)

    def dense_step() -> None:
        model.block_sparse = False
        sparse_step()
        model.block_sparse = True

    def attention_free_step() -> None:
        attention.windowed_attention = values_only
        try:
            sparse_step()
        finally:
            attention.windowed_attention = windowed_attention

    with torch.no_grad():
        sparse_logits = model(seq[:, :-1])
        model.block_sparse = False
        diff = (sparse_logits - model(seq[:, :-1])).abs().max().item()
        model.block_sparse = True
    best = fastest({False: dense_step, True: sparse_step, None: attention_free_step}, args.rounds)
    print(f"GPT training step — {machine()}, fp32, {time.strftime('%Y-%m-%d')}")
    print(f"1. model {layers}L {heads}H {width}d K={K}, window w={w}, grid {size}x{size} (T={1 + size * size}), "
          f"batch {args.batch_size}, fastest of {args.rounds}; max |logit sparse - dense| = {diff:.1e}")
    att = attention_only(model, args.batch_size, args.rounds)
    kernel = {False: kernel_share(dense_step), True: kernel_share(sparse_step), None: kernel_share(attention_free_step)}
    print(f"  {'attention':<28}{'s/step':>9}{'seq/s':>9}{'speed-up':>10}{'attention only, s':>19}{'speed-up':>10}"
          f"{'in the kernel':>15}")
    for sparse, name in ((False, "dense masked (SDPA)"), (True, "block-sparse windowed")):
        print(f"  {name:<28}{best[sparse]:>9.3f}{args.batch_size / best[sparse]:>9.2f}"
              f"{best[False] / best[sparse]:>9.2f}x{att[sparse]:>19.3f}{att[False] / att[sparse]:>9.2f}x"
              f"{kernel[sparse]:>14.0%}")
    print(f"  {'attention costing nothing':<28}{best[None]:>9.3f}{args.batch_size / best[None]:>9.2f}"
          f"{best[False] / best[None]:>9.2f}x{'-':>19}{'-':>10}{kernel[None]:>14.0%}")
    print("  (attention costing nothing: the same step with each position's output its own value, so the linear\n"
          "  layers, norms, head, loss and optimizer only: its speed-up bounds what any attention kernel can give)")
    print("  (in the kernel: share of a step's CPU time spent in the OS, mostly page faults: glibc hands allocations\n"
          "  over 32 MB, like the dense path's T x T scores, back to the OS when freed, and every step faults them in\n"
          "  again; MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 in the environment avoids\n"
          "  that: setting either variable turns off glibc's adaptive thresholds, so set both)")

    # 2. full attention: the relative bias (a float mask) vs --no-rel-bias (SDPA's causal kernel, flash on GPU)
    models = {bias: GPT(GPTConfig(K, 0, (size, size), layers, heads, width, window_size=0, rel_bias=bias)).train()
              for bias in (True, False)}
    models[False].load_state_dict(models[True].state_dict(), strict=False)
    best = fastest({bias: train_step(m, seq) for bias, m in models.items()}, args.rounds)
    print("\n2. full attention, same model and grid: relative bias vs --no-rel-bias")
    print(f"  {'attention':<38}{'s/step':>9}{'speed-up':>10}")
    for bias, name in ((True, "relative bias: float mask (SDPA)"), (False, "--no-rel-bias: is_causal (SDPA)")):
        print(f"  {name:<38}{best[bias]:>9.3f}{best[True] / best[bias]:>9.2f}x")

    # 3. the official model's training step, the same sizes and batch
    mingpt = official.mingpt()
    if mingpt is None:
        return
    theirs = mingpt.GPT(K + 1, 1 + size * size, n_layer=layers, n_head=heads, n_embd=width).train()
    opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)

    def official_step() -> None:
        _, loss = theirs(seq[:, :-1], targets=seq[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    steps = {"official": official_step, **{bias: train_step(m, seq) for bias, m in models.items()}}
    best = fastest(steps, args.rounds)
    print("\n3. full attention, the official taming mingpt.GPT training step vs ours (same sizes, batch, AdamW)")
    print(f"  {'model':<38}{'s/step':>9}{'ours is':>10}")
    for key, name in (("official", "official mingpt.GPT"), (True, "ours, relative bias"), (False, "ours, --no-rel-bias")):
        print(f"  {name:<38}{best[key]:>9.3f}{best['official'] / best[key]:>9.2f}x")


def values_only(qkv: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A stand-in for windowed_attention that costs nothing: each position's output is its own value."""
    return qkv[:, :, 2].flatten(2)


def kernel_share(step) -> float:
    """Share of one call's CPU time spent in the kernel (system time)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return system / max(system + after.ru_utime - before.ru_utime, 1e-9)


def train_step(model: GPT, seq: torch.Tensor):
    """One AdamW step of `model` on `seq`, as a function."""
    opt = model.configure_optimizers(weight_decay=0.01, lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


if __name__ == "__main__":
    main()
