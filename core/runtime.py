"""Devices, precision, seeding and torchrun/DDP setup, shared by both training stages."""
from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
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
        """The model DDP-wrapped when several processes train, else as it is."""
        if not self.distributed:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_ranks(self, flag: bool) -> bool:
        """True only if ``flag`` holds on every rank, so that all ranks take the same branch (e.g. skip a step)."""
        if not self.distributed:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())


def setup_runtime(device: str = "auto", precision: str = "fp32", seed: int = 0) -> Runtime:
    """Resolve ``--device``/``--precision``, join a torchrun process group if launched by one, seed RNGs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "fp16" and not use_cuda:
        raise UserError("--precision fp16 needs a CUDA GPU; use --precision bf16 or fp32 on CPU")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    seed_everything(seed)
    return Runtime(dev, precision, rank, world_size, local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors/ints only, so checkpoints load with ``weights_only=True``."""
    state = {"torch": torch.get_rng_state(), "python_seed": random.getrandbits(32)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.seed(state["python_seed"])
    np.random.seed(state["python_seed"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def average_gradients(module: torch.nn.Module, rt: Runtime) -> None:
    """All-reduce a module's gradients (the discriminator is not DDP-wrapped: it also runs in the G step)."""
    if not rt.distributed:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= rt.world_size
        torch.nn.utils.vector_to_parameters(flat, grads)
