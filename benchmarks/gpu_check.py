"""GPU check: the CUDA-marked tests, then our speed on a GPU beside the official taming-transformers code, in one run.

    pip install -r benchmarks/requirements.txt   # the official package, for the baselines
    python benchmarks/gpu_check.py               # on a CUDA machine: under 8 minutes
    python benchmarks/gpu_check.py --dry-run     # tiny sizes on the CPU: proves the script runs (CI smoke test)

Prints, each beside the official code where it has a counterpart (`benchmarks/official.py`):
  tokenizer   training step img/s at 256 px, the released f16 geometry, GAN on: ours fp32, bf16 and compiled
              bf16; the official VQModel.training_step (fp32, as Lightning runs it with two optimizers)
  gpt train   tokens/s of a training step (bf16 autocast): ours dense (relative bias), plain causal (the flash
              kernel), windowed; the official mingpt GPT
  decode      tokens/s sampling whole 16x16 grids at batch 1 and 16: ours eager and compiled; the official
              sample_with_past
and the peak GPU memory of each. Every measurement runs on its own: an error is printed and the next one runs.
A time budget (--budget seconds) skips what no longer fits, with a note.
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import official  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.tokenizer_step_speed import F16_256, official_full_step, our_config, our_full_step  # noqa: E402
from core.runtime import Runtime, fused_adam  # noqa: E402
from transformer.model import GPT, GPTConfig  # noqa: E402

DRY_TOKENIZER = (32, 2, 32, (1, 2), 1, (16,), 32, 64)  # size, batch, ch, ch_mult, res blocks, attn, z, K
GPT_SIZES = {"full": dict(K=1024, grid=16, layers=8, heads=8, width=512, batch=32, window=8),
             "dry": dict(K=64, grid=4, layers=1, heads=2, width=32, batch=2, window=2)}


def decode_api(model: GPT, batch: int, compile: bool) -> Callable[[], torch.Tensor]:
    """Adapter to the sampler: one call draws ``batch`` whole grids (prefill + cached decode). The one place that
    names the sampling API, so a new decode API plugs in here."""
    from transformer.sample import generate

    return lambda: generate(model, batch, batch_size=batch, compile=compile, seed=0)[0]


class Check:
    """Runs measurements within a time budget; each one's failure is printed, not raised."""

    def __init__(self, device: torch.device, budget: float, rounds: int) -> None:
        self.device, self.rounds, self.deadline = device, rounds, time.perf_counter() + budget
        self.rows: list[tuple[str, str, str, str, str]] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> tuple[float, str]:
        """Fastest of ``rounds`` calls after one warm-up call (compilation, autotuning), and the peak GPU memory."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        best = float("inf")
        for _ in range(self.rounds):
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if self.device.type == "cuda" else "-"
        return best, peak

    def measure(self, section: str, name: str, items: float, unit: str, build: Callable[[], Callable],
                baseline: float | None = None) -> float | None:
        """Build and time one step; print its rate (items per second) and its ratio to ``baseline``."""
        if time.perf_counter() > self.deadline:
            print(f"  {section:<11}{name:<34}skipped: out of the time budget", flush=True)
            return None
        try:
            seconds, peak = self.time(build())
        except Exception as exc:  # noqa: BLE001 - report and go on to the next measurement
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            print(f"  {section:<11}{name:<34}error: {type(exc).__name__}: {line}", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
            return None
        rate = items / seconds
        ratio = f"{rate / baseline:.2f}x" if baseline else "-"
        print(f"  {section:<11}{name:<34}{rate:>12.1f} {unit:<9}{ratio:>8}{peak:>12}", flush=True)
        return rate


def run_cuda_tests(timeout: float) -> None:
    """``pytest -m cuda`` (skipped, not failed, without a GPU); its summary line. In one process (``-n 0``, not
    pytest.ini's worker per core): the tests share the one GPU, and workers would compete for its memory."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "-p", "no:randomly", str(ROOT / "tests")]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = res.stdout.strip().splitlines()
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        print(f"cuda tests: {lines[-1] if lines else 'no output'} (exit {res.returncode})")
        for ln in failed:
            print(f"  {ln}")
    except subprocess.TimeoutExpired:
        print(f"cuda tests: timed out after {timeout:.0f} s")


def tokenizer_rows(check: Check, dry: bool, vqgan) -> None:
    geometry = DRY_TOKENIZER if dry else F16_256
    size, batch, ch, mult, res, attn, zdim, K = geometry
    x = torch.rand(batch, 3, size, size, device=check.device) * 2 - 1
    cfg = our_config(size, ch, mult, res, attn, zdim, K, gan=True)
    ref = None
    if vqgan is not None:
        ref = check.measure("tokenizer", "official fp32", batch, "img/s",
                            lambda: official_full_step(vqgan, geometry, x, gan=True))
    for name, precision, compiled in (("ours fp32", "fp32", False), ("ours bf16", "bf16", False),
                                      ("ours bf16 compiled", "bf16", True)):
        check.measure("tokenizer", name, batch, "img/s",
                      functools.partial(our_full_step, cfg, x, precision, compiled), ref)


def gpt_train_step(model: torch.nn.Module, seq: torch.Tensor, official_model: bool) -> Callable[[], None]:
    rt = Runtime(seq.device, "bf16")
    opt = fused_adam(model.parameters(), 3e-4, (0.9, 0.95), torch.optim.AdamW)

    def step() -> None:
        with rt.autocast():
            if official_model:
                loss = model(seq[:, :-1], targets=seq[:, 1:].contiguous())[1]  # mingpt views the targets
            else:
                logits = model(seq[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def gpt_rows(check: Check, dry: bool, mingpt) -> None:
    s = GPT_SIZES["dry" if dry else "full"]
    K, g = s["K"], s["grid"]
    seq = torch.randint(K, (s["batch"], 1 + g * g), device=check.device)
    tokens = s["batch"] * g * g
    ref = None
    if mingpt is not None:
        ref = check.measure("gpt train", "official mingpt", tokens, "tok/s", lambda: gpt_train_step(
            mingpt.GPT(K + 1, 1 + g * g, n_layer=s["layers"], n_head=s["heads"], n_embd=s["width"]).to(check.device),
            seq, True))
    variants = (("ours dense (relative bias)", dict()), ("ours plain causal (flash)", dict(rel_bias=False)),
                ("ours window " + str(s["window"]), dict(window_size=s["window"])))
    for name, extra in variants:
        def build(extra=extra):
            cfg = GPTConfig(K, 0, (g, g), s["layers"], s["heads"], s["width"], **{"window_size": 0, **extra})
            return gpt_train_step(GPT(cfg).to(check.device).train(), seq, False)
        check.measure("gpt train", name, tokens, "tok/s", build, ref)


def decode_rows(check: Check, dry: bool, mingpt) -> None:
    s = GPT_SIZES["dry" if dry else "full"]
    K, g = s["K"], s["grid"]
    for batch in (1, 16):
        ref = None
        if mingpt is not None:
            def official_decode(batch=batch):
                theirs = mingpt.GPT(K + 1, 1 + g * g, n_layer=s["layers"], n_head=s["heads"],
                                    n_embd=s["width"]).to(check.device).eval()
                start = torch.full((batch, 1), K, device=check.device)
                return lambda: mingpt.sample_with_past(start, theirs, steps=g * g)
            ref = check.measure("decode", f"official sample_with_past b{batch}", batch * g * g, "tok/s",
                                official_decode)
        for compiled in (False, True):
            def ours(batch=batch, compiled=compiled):
                model = GPT(GPTConfig(K, 0, (g, g), s["layers"], s["heads"], s["width"], window_size=0))
                return decode_api(model.to(check.device).eval(), batch, compiled)
            check.measure("decode", f"ours {'compiled' if compiled else 'eager'} b{batch}", batch * g * g, "tok/s",
                          ours, ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (compile: aot_eager backend)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the measurements (after the tests)")
    ap.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for pytest -m cuda")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rounds = 1 if args.dry_run else args.rounds
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        sys.exit("no CUDA GPU here: run on a GPU machine, or pass --dry-run for the tiny CPU smoke run")
    if args.dry_run:  # no C++ toolchain needed: the same graph capture without inductor's code generation
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"gpu check — {machine()}, {device}{' (dry run: tiny sizes)' if args.dry_run else ''}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, fastest of {rounds} after a warm-up call")
    if not args.no_tests:
        run_cuda_tests(args.tests_timeout)
    vqgan, mingpt = official.taming_vqgan(), official.mingpt()
    check = Check(device, args.budget, rounds)
    print(f"  {'':<11}{'':<34}{'rate':>12} {'':<9}{'vs off.':>8}{'peak mem':>12}")
    for rows in (tokenizer_rows, gpt_rows, decode_rows):
        try:
            rows(check, args.dry_run, vqgan if rows is tokenizer_rows else mingpt)
        except Exception as exc:  # noqa: BLE001 - a section that cannot even be set up
            print(f"  {rows.__name__}: error: {type(exc).__name__}: {exc}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
