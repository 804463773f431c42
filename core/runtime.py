"""Devices, precision, seeding and torchrun/DDP setup, shared by both training stages."""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core.errors import UserError

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes; a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for fp16, where small gradients underflow."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model DDP-wrapped when several processes train, else as it is.

        Buffers are not re-broadcast from rank 0 before every forward: our models' buffers are constants or
        quantizer statistics that the quantizer itself keeps identical on every rank (all-reduced counts).
        """
        if not self.distributed:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters, broadcast_buffers=False)

    def pin_memory(self) -> bool:
        """Page-locked batches (and ``non_blocking`` copies, which only overlap from pinned memory) on CUDA."""
        return self.device.type == "cuda"

    def seed_step(self, seed: int, step: int) -> None:
        """Seed every RNG from (seed, step, rank) at the start of a step.

        Ranks draw different dropout masks and restart candidates, and a resumed run draws exactly what the
        uninterrupted run drew at the same step, so no RNG state needs to travel in checkpoints.
        """
        seed_everything(int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1, np.uint64)[0] >> 1))


CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | None = None) -> float | None:
    """CPUs the container's quota allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` / period, under
    ``root``, default `CGROUP`); None where there is no quota."""
    root = root or CGROUP
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int((root / "cpu" / f"cpu.cfs_{name}_us").read_text()) for name in ("quota", "period"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity, capped by its container's CPU quota, which neither
    ``os.cpu_count()`` nor the affinity shows (a pod limited to 2 CPUs on a 64-core host sees 64 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def setup_runtime(device: str = "auto", precision: str = "fp32", seed: int = 0) -> Runtime:
    """Resolve ``--device``/``--precision``, join a torchrun process group if launched by one, seed RNGs.

    The same seed on every rank here, so models are initialised identically; training steps then reseed per
    rank (`Runtime.seed_step`). fp16 also runs on CPU (CPU autocast + a CPU GradScaler): slow, but the same code
    path as on GPUs, which is how the tests cover it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable_cores():
        # torch starts a thread per core it sees: under a CPU quota, dozens of threads share two CPUs' time
        torch.set_num_threads(usable_cores())
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    seed_everything(seed)
    return Runtime(dev, precision, rank, world_size, local_rank)


def fused_adam(params: Any, lr: float, betas: tuple[float, float], cls: type = torch.optim.Adam,
               **kwargs: Any) -> torch.optim.Optimizer:
    """Adam(W) in the fused kernel (CUDA and CPU): one kernel for all parameters, and it takes the step-skip flag
    on the device (``found_inf``), so a non-finite step is skipped without a host synchronisation
    (`TrainLoop.step_optimizer`)."""
    return cls(params, lr=lr, betas=betas, fused=True, **kwargs)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``--device`` (auto, cpu, cuda) as the device this process uses (made current, with TF32 and cuDNN
    autotuning, when it is a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes per stage: autotuned conv kernels pay off at once
    return dev


def adopt_config(rt: Runtime, device: str, precision: str) -> Runtime:
    """The runtime for a config that changed after it was built (a resumed run's saved ``--device`` and
    ``--precision``, unless given again): the precision is taken as it is; a different device only in a single
    process (a process group is bound to its device)."""
    dev = resolve_device(device, rt.local_rank)
    if dev != rt.device and rt.distributed:
        raise UserError(f"the resumed run was trained with --device {device}; pass --device {rt.device.type} "
                        "explicitly to resume it on this device with torchrun")
    return Runtime(dev, precision, rt.rank, rt.world_size, rt.local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(rt: Runtime, *objects: Any) -> tuple:
    """Rank 0 reads MLflow; the other ranks get what it read (resume state, config) from it."""
    if not rt.distributed:
        return objects
    box = list(objects)
    torch.distributed.broadcast_object_list(box, src=0)
    return tuple(box)


def gather_rows(rt: Runtime, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's `tensor` (the same shape on each: nothing is pickled) concatenated in rank order along `dim`;
    in a single process the tensor itself."""
    if not rt.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(rt.world_size)]
    torch.distributed.all_gather(parts, tensor)
    return torch.cat(parts, dim)


def average_gradients(module: torch.nn.Module, rt: Runtime) -> None:
    """All-reduce a module's gradients (the discriminator is not DDP-wrapped: it also runs in the G step).

    Call it before ``GradScaler.unscale_``/``step``: the scaler's inf check must see the averaged gradients,
    so that an inf on one rank makes every rank skip the step (else replicas diverge).
    """
    if not rt.distributed:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= rt.world_size
        torch.nn.utils.vector_to_parameters(flat, grads)


def release_free_memory() -> None:
    """Hand freed memory back to the OS: pyarrow's pool (pandas keeps its string columns in Arrow memory, and
    Arrow's allocator keeps what is freed) and the C heap (glibc's ``malloc_trim``; a no-op elsewhere). Called
    between a stage's per-image bookkeeping (manifest, verification, index) and its long loop, whose peak
    would otherwise sit on top of ~1 KB per image that nothing uses any more (benchmarks/scale.py)."""
    import ctypes
    import ctypes.util
    import sys

    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
