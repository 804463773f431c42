"""The decode step's matrix products, x @ W.T + b for a few rows: through whichever of torch's BLAS, numpy's
BLAS or oneDNN's prepacked kernels runs this model's weights fastest here, timed once per batch size.

Why several: a decode step multiplies every weight matrix by only `batch` rows, a shape the BLAS libraries treat
very differently. On the AMD EPYC this was written on, torch's MKL streams the weights of a batch-1 step at
about half the speed of numpy's OpenBLAS, and at batch 16 oneDNN with weights reordered for the batch
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing uses) runs the linear layers of an
8-layer, 256-wide GPT in 3.0 ms against MKL's 4.3 (README, Benchmarks). "numpy-rows" is numpy's with the
weights of narrowing layers (more inputs than outputs, the MLP's second one) kept as (out, in) rows at batch 1,
so the product is one dot product per output: with the weights out of cache, as in the decode loop, that runs
the 1024 -> 256 layer in ~70 us against ~85 for x @ W. All compute the same products; they differ in summation
order only.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import Tensor

Linear = Callable[[Tensor], Tensor]
NUMPY = ("numpy", "numpy-rows")  # the backends that run on numpy's BLAS
BACKENDS = ("torch", *NUMPY, "onednn")
_BLAS_THREADS = None  # threadpoolctl controller of the BLAS libraries numpy loaded, made on first use


def backends(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The backends that can run on `device` in `dtype`: numpy and oneDNN are CPU-only; numpy has no half
    types and oneDNN's reordered weights are used in float32 only."""
    if device.type != "cpu":
        return ("torch",)
    found = ["torch"]
    if dtype in (torch.float32, torch.float64):
        found += NUMPY
    if (dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        found.append("onednn")
    return tuple(found)


def linear(backend: str, weight: Tensor, bias: Tensor | None, batch: int, out: Tensor | None = None) -> Linear:
    """x (batch, in) -> x @ weight.T + bias through `backend`, with the weight laid out for it once, here.

    out: a (batch, out_features) buffer that the numpy backends write every result into and return (so each
    result holds only until the next call): a decode step then allocates and wraps no array per product, ≈5% of
    a batch-1 token here. The other backends ignore it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown matmul backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if backend == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    b_np = None if bias is None or backend == "torch" else bias.numpy()
    out_np = None if out is None or backend not in NUMPY else out.numpy()
    if backend == "numpy-rows" and batch == 1 and weight.shape[1] > weight.shape[0]:
        w_rows = weight.contiguous().numpy()

        def rows_linear(x: Tensor) -> Tensor:  # W @ x: a gemv of contiguous dot products
            y = np.matmul(w_rows, x.detach().numpy()[0], out=None if out_np is None else out_np[0])
            if b_np is not None:
                np.add(y, b_np, out=y)
            return torch.from_numpy(y)[None] if out is None else out
        return rows_linear
    # (batch, in) @ (in, out) is faster than F.linear's (batch, in) @ (out, in).T for both BLAS libraries here
    w_t = weight.t().contiguous()
    if backend == "torch":
        return (lambda x: x @ w_t) if bias is None else (lambda x: torch.addmm(bias, x, w_t))
    w_np = w_t.numpy()

    def numpy_linear(x: Tensor) -> Tensor:
        y = np.matmul(x.detach().numpy(), w_np, out=out_np)
        if b_np is not None:
            np.add(y, b_np, out=y)
        return torch.from_numpy(y) if out is None else out
    return numpy_linear


def blas_threads(n: int) -> AbstractContextManager:
    """Limit numpy's BLAS to n threads (torch's count) while decoding with it."""
    global _BLAS_THREADS
    if _BLAS_THREADS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS_THREADS = ThreadpoolController()
    return _BLAS_THREADS.limit(limits=n, user_api="blas")


def fastest(weights: Sequence[tuple[Tensor, Tensor | None]], batch: int) -> str:
    """The backend that runs x @ W.T + b for all `weights` fastest with `batch` rows (fastest of 2 timed rounds
    after a warm-up). The inputs are constants: timing draws nothing from the global RNG."""
    w0 = weights[0][0]
    found = backends(w0.device, w0.dtype)
    if len(found) == 1:
        return found[0]
    x = {n: torch.full((batch, n), 0.5, dtype=w0.dtype) for n in {w.shape[1] for w, _ in weights}}
    ways = {name: [(linear(name, w, b, batch), x[w.shape[1]]) for w, b in weights] for name in found}
    best = dict.fromkeys(ways, math.inf)
    with torch.inference_mode(), blas_threads(torch.get_num_threads()):
        for r in range(3):
            for name, calls in ways.items():
                t0 = time.perf_counter()
                for f, xi in calls:
                    f(xi)
                if r:
                    best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.get)
