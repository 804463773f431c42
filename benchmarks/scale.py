"""How the stages' memory and time grow with the data: peak RSS and wall time of

- quantize: 1k vs 20k 64-px images into 16x16 grids (a tiny f=4 tokenizer: the model is not what grows);
- train start-up (``--max-steps 2``, 2 layers x 64): quantize runs of 10k / 100k / 1M random 16x16 grids;
- generate: 300 vs 3000 samples of the tiny transformer;

each in its own process (peak RSS from ``wait4``), printed side by side with the ratio to the smallest case and
the growth in bytes per stored code ((RSS - RSS of the smallest) / (codes - codes of the smallest)). The peak of
one run moves by tens of MB with where the C heap happens to place the model's activations, so quantize and
generate run ``--repeats`` times (interleaved) and the median is printed.

    nice -n 10 python benchmarks/scale.py [--quick] [--repeats N] [--stages quantize,train,generate]
                                          [--fixed-mmap-threshold]

``--quick`` (the smoke test): 100 / 300 images, 2k / 20k grids, 16 / 64 samples. The 1M-grid run writes ~0.5 GB
of codes (twice: the run's artifact and its download) to a temp folder, removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, image_set, scratch_tracking

TINY_VQ = ["--image-size", "64", "--ch", "16", "--ch-mult", "1,2,2", "--num-res-blocks", "1", "--z-channels", "8",
           "--embed-dim", "8", "--codebook-size", "1024", "--perceptual-weight", "0", "--batch-size", "4",
           "--max-steps", "1", "--disc-start", "100", "--val-every", "100", "--ckpt-every", "100", "--num-workers", "0"]
GPT = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--batch-size", "16", "--max-steps", "2",
       "--val-every", "100", "--sample-every", "0", "--ckpt-every", "100", "--log-every", "1"]


def measure(*args: str) -> tuple[float, float, str]:
    """(peak RSS in bytes, wall seconds, last stdout line) of ``cli.py ARGS`` in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.communicate()  # reaps the child; its rusage is what wait4 below would give
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cli.py {' '.join(map(str, args))} failed:\n{err[-3000:]}")
    return _last_child_maxrss(), wall, out.strip().splitlines()[-1]


def _last_child_maxrss() -> float:
    """Peak RSS of the child just reaped: RUSAGE_CHILDREN's maximum, which only grows, so each case runs in a
    fresh interpreter below (``--one``) and reports its own figure."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0


def one(args: list[str]) -> None:
    """Run one measurement in this (fresh) process and print it as JSON (RUSAGE_CHILDREN is per process)."""
    rss, wall, last = measure(*args)
    print(json.dumps({"rss": rss, "wall": wall, "last": last}))


def case(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_cases(cases: dict, repeats: int) -> dict:
    """{key: measurement} of ``cases`` ({key: cli args}), each run ``repeats`` times, interleaved: the median peak
    RSS and wall time of each (its first run's last stdout line)."""
    runs: dict = {key: [] for key in cases}
    for _ in range(repeats):
        for key, args in cases.items():
            runs[key].append(case(*args))
    return {key: {"rss": statistics.median(m["rss"] for m in ms), "wall": statistics.median(m["wall"] for m in ms),
                  "last": ms[0]["last"], "all_rss": [m["rss"] for m in ms]} for key, ms in runs.items()}


def fake_quantize_run(vqvae_run: str, n: int, grid: int = 16, codebook: int = 1024, seed: int = 0) -> str:
    """A quantize run holding ``n`` random grids (written as quantize writes them, a chunk at a time)."""
    import mlflow
    import pandas as pd

    from vqvae.codegrids import CodeGrids

    rng = np.random.default_rng(seed)
    with mlflow.start_run(run_name=f"scale-{n}", tags={"stage": "quantize", "upstream_run_id": vqvae_run}) as run:
        folder = Path(f"fake-{n}")
        (folder / "codes").mkdir(parents=True)
        n_val = max(16, n // 100)
        for split, rows in (("train", n), ("val", n_val)):
            arr = np.lib.format.open_memmap(folder / "codes" / f"{split}.npy", mode="w+", dtype=np.uint16,
                                            shape=(rows, grid, grid))
            for lo in range(0, rows, 65536):
                arr[lo:lo + 65536] = rng.integers(0, codebook, (min(65536, rows - lo), grid, grid), dtype=np.uint16)
            arr.flush()
            del arr
        pd.concat([pd.DataFrame({"split": split, "row": np.arange(rows), "image_path": "x.png", "label": "",
                                 "label_id": -1}) for split, rows in (("train", n), ("val", n_val))]
                  ).to_csv(folder / "index.csv", index=False)
        (folder / "vocab.json").write_text(CodeGrids(codebook, (grid, grid), ()).to_json())
        mlflow.log_artifacts(str(folder))
        shutil.rmtree(folder)
    return run.info.run_id


def table(title: str, rows: list[tuple[str, int, dict]]) -> None:
    """Rows (label, stored codes, measurement): RSS, wall, ratio to the first row, bytes per extra code."""
    print(f"\n{title}")
    print(f"{'case':>14} {'codes':>12} {'peak RSS MB':>12} {'x first':>8} {'B/extra code':>13} {'wall s':>8}"
          "  runs (MB)")
    base_label, base_codes, base = rows[0]
    for label, codes, m in rows:
        growth = (m["rss"] - base["rss"]) / (codes - base_codes) if codes != base_codes else 0.0
        runs = " ".join(f"{r / 2**20:.0f}" for r in m.get("all_rss", [m["rss"]]))
        print(f"{label:>14} {codes:>12,} {m['rss'] / 2**20:>12.0f} {m['rss'] / base['rss']:>8.2f} {growth:>13.2f} "
              f"{m['wall']:>8.1f}  {runs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each quantize and generate case (median)")
    parser.add_argument("--stages", default="quantize,train,generate", help="comma-separated stages to measure")
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="run the stages with glibc's mmap threshold fixed at 128 KB (MALLOC_MMAP_THRESHOLD_): "
                             "large buffers then always come from mmap, and the peak stops depending on where the heap "
                             "happened to put them, leaving the growth that the data itself causes")
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    if args.fixed_mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by every stage process (measure passes os.environ)
    images = (100, 300) if args.quick else (1000, 20000)
    grids = (2000, 20000) if args.quick else (10_000, 100_000, 1_000_000)
    samples = (16, 64) if args.quick else (300, 3000)

    work = scratch_tracking()
    os.environ["TAMING_CACHE_DIR"] = str(work / "cache")
    try:
        manifests = {n: image_set(work / f"img{n}", n, 64, seed=n) for n in images}
        first = manifests[images[0]]
        vq = case("train-vqvae", "--manifest", first, *TINY_VQ)["last"]
        import mlflow

        if "quantize" in stages:
            runs = median_cases({n: ("quantize", "--vqvae-run-id", vq, "--manifest", manifests[n], "--num-workers",
                                     "0", "--batch-size", "64") for n in images}, 1 if args.quick else args.repeats)
            shape = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=runs[images[0]]["last"],
                                                                        artifact_path="vocab.json")).read_text())
            per = shape["grid_shape"][0] * shape["grid_shape"][1]  # codes per image
            table(f"quantize ({per} codes per 64-px image, tiny tokenizer)",
                  [(f"{n} images", n * per, m) for n, m in runs.items()])

        rows, gpt = [], None
        for n in grids if "train" in stages else grids[:1] if "generate" in stages else ():
            q = fake_quantize_run(vq, n)
            m = case("train", "--quantize-run-id", q, *GPT)
            gpt = gpt or m["last"]
            rows.append((f"{n:,} grids", n * 256, m))
        if "train" in stages:
            table("train start-up (--max-steps 2, 2 layers x 64, 16x16 grids)", rows)

        if "generate" in stages:
            gen = median_cases({n: ("generate", "--transformer-run-id", gpt, "--num-samples", n, "--batch-size",
                                    "64") for n in samples}, 1 if args.quick else args.repeats)
            table("generate (tiny transformer, 16x16 grids, batch 64)",
                  [(f"{n} samples", n * 256, m) for n, m in gen.items()])
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2:])
    else:
        main()
