"""Step bookkeeping both trainers share: progress bar, schedules, NaN policy, checkpoints, Ctrl-C and OOM."""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.checkpoint import CheckpointWriter, load_checkpoint, load_checkpoint_slot, resolve_resume_config
from core.errors import UserError
from core.runtime import Runtime, adopt_config, broadcast_from_main, setup_runtime, teardown
from core.tracking import connect, get_run


C = TypeVar("C")


@contextlib.contextmanager
def training_session(cfg: C, stage: str, resume_run_id: str | None, overrides: dict | None,
                     tracking_uri: str | None, experiment: str | None
                     ) -> Iterator[tuple[Runtime, C, dict | None, str | None]]:
    """Runtime (joining torchrun if launched by it) and, when resuming, the checkpoint and its merged config.

    Yields (runtime, config, resume state or None, checkpoint slot); only rank 0 writes to MLflow; the others
    receive the config it resolved and read the checkpoint it chose themselves.
    """
    rt = setup_runtime(cfg.device, cfg.precision, cfg.seed)
    try:
        state, slot = None, None
        connect(tracking_uri, experiment, read_only=not rt.is_main)
        if rt.is_main and resume_run_id:
            resume_run_id = get_run(resume_run_id, stage).info.run_id  # a models:/ URI names its source run
            state, slot = load_checkpoint(resume_run_id)
            cfg = resolve_resume_config(state, overrides or {}, type(cfg), resume_run_id)
        # only the config and the checkpoint's name travel: each rank loads the checkpoint itself (onto the CPU),
        # so nothing checkpoint-sized is pickled or staged in GPU memory by broadcast_object_list
        cfg, resume_run_id, slot = broadcast_from_main(rt, cfg, resume_run_id, slot)
        if slot is not None and not rt.is_main:
            state = load_checkpoint_slot(resume_run_id, slot)
        rt = adopt_config(rt, cfg.device, cfg.precision)  # a resumed run keeps its own unless given again
        yield rt, cfg, state, slot
    finally:
        teardown(rt)


def raise_if_out_of_memory(exc: BaseException, batch_size: int) -> None:
    """Turn an allocation failure (GPU, CPU, or a DataLoader worker killed by the OOM killer) into advice."""
    text = str(exc)
    if (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "not enough memory" in text
            or "out of memory" in text or ("DataLoader worker" in text and "killed by signal" in text)):
        raise UserError(f"out of memory at --batch-size {batch_size}; lower --batch-size or use --grad-accum "
                        f"({text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__})") from None


class StepInterrupt:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM (Slurm, Kubernetes and torchrun stop jobs with it) ends training
    at the end of the step in progress, so the checkpoint then saved matches the weights and the logged metrics;
    a second signal stops at once and keeps the last checkpoint. In the main thread only (Python's rule for
    signal handlers); elsewhere the signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.at_boundary = False  # the KeyboardInterrupt came from `TrainLoop.begin_step`, between two steps
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS} if in_main else {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Slurm's SIGTERM (or Ctrl-C) reaches every process of the job, workers
    included; a worker killed by it would end training with "worker exited unexpectedly" before the step could
    finish and checkpoint. `TrainLoop.running` ends the workers itself when training stops."""
    for sig in StepInterrupt.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ok: torch.Tensor | None = None,
                   clip: float = 0.0) -> None:
    """``optimizer.step()`` through ``scaler`` (optionally clipping the gradient norm), skipped on the device
    where ``ok`` is False, then the gradients dropped.

    A fused optimizer (`fused_adam`) takes the skip as the ``found_inf`` flag that GradScaler also uses, in the
    same kernel; under fp16 the flag poisons one gradient so the scaler's own inf check (on the device, which
    also backs off the scale) skips the step. Other optimizers need a host read of ``ok``.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if ok is not None and scaler.is_enabled() and params:
        grad = params[0].grad
        grad.mul_(torch.where(ok.to(grad.device), 1.0, float("nan")).to(grad.dtype))
    if clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif ok is None:
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        # the attribute GradScaler sets for fused optimizers: the kernel leaves weights, moments and step count
        optimizer.found_inf = (~ok).float().to(params[0].device if params else ok.device)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cosine_lr(step: int, lr: float, min_lr: float | None, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps`` (``min_lr`` None: constant).
    The transformer's schedule, and the tokenizer's with --lr-schedule cosine (docs/defaults.md, fifth round)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if min_lr is None:
        return lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainLoop:
    """Counts steps and does what happens between them, identically for every training stage.

    ``snapshot()`` returns the full training state (it reads ``loop.step``); the loop saves it every
    ``cfg.ckpt_every`` steps, at the end, and after a Ctrl-C/SIGTERM that arrives between steps. Uploads run
    in the background (`CheckpointWriter`): only the local write holds up training.
    """

    def __init__(self, cfg: Any, rt: Runtime, run: Any, snapshot: Callable[[], dict], step: int,
                 previous_slot: str | None, desc: str) -> None:
        self.cfg, self.rt, self.run, self.snapshot, self.desc = cfg, rt, run, snapshot, desc
        self.step = self.last_saved = step
        self.writer = (CheckpointWriter(run.info.run_id, previous_slot=previous_slot, keep=cfg.ckpt_keep)
                       if rt.is_main else None)
        self.bar: tqdm | None = None
        self.interrupt: StepInterrupt | None = None
        self._items, self._t0 = 0, time.perf_counter()
        self._stop = False  # every rank agreed (in `end_step`) that some rank got a signal
        # device counters of non-finite steps since the last synchronisation point (`step_ok`), and the last flag
        self._skipped: torch.Tensor | None = None
        self._first_skipped: torch.Tensor | None = None
        self._ok: torch.Tensor | None = None

    def begin_step(self) -> None:
        """Between steps: a signal during the previous step stops training here (one process), or at the next
        synchronisation point, where the ranks agree on it (`end_step`); then every RNG is seeded for this step and
        rank (`Runtime.seed_step`)."""
        if self._stop or (self.interrupt.requested and not self.rt.distributed):
            self.interrupt.at_boundary = True
            raise KeyboardInterrupt
        self.rt.seed_step(self.cfg.seed, self.step)

    def due(self, every: int) -> bool:
        """Whether something scheduled every ``every`` steps (0: only at the end) happens after this step."""
        return self.step == self.cfg.max_steps or (every > 0 and self.step % every == 0)

    def step_ok(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether this step's loss was finite on every rank, as a device bool: never read here.

        The optimizer steps (`step_optimizer`) and the EMA skip a non-finite step on the device; the loop reads the
        count of such steps only at its next synchronisation point (`end_step`), where ``--nan-policy`` applies.
        """
        ok = torch.as_tensor(finite, device=self.rt.device).reshape(()).to(torch.int32)
        if self.rt.distributed:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)  # queued: no host wait
        ok = ok.bool()
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int32, device=self.rt.device)
            self._first_skipped = torch.full((), -1, dtype=torch.int64, device=self.rt.device)
        self._first_skipped = torch.where(~ok & (self._skipped == 0), self.step, self._first_skipped)
        self._skipped += (~ok).to(torch.int32)
        self._ok = ok
        return ok

    def _sync_due(self) -> bool:
        """Steps after which the loop reads the device: logs, validation, samples, checkpoints and the end."""
        return any(self.due(getattr(self.cfg, k)) for k in ("log_every", "val_every", "ckpt_every", "sample_every")
                   if hasattr(self.cfg, k))

    def end_step(self, items: int) -> bool:
        """Count the step; at a synchronisation point also apply ``--nan-policy`` to the steps skipped since the
        last one and agree on a stop signal across ranks. Returns whether the step just ended was applied (read
        from the device only at a synchronisation point; True elsewhere: the value is then unused)."""
        self.step += 1
        self._items += items
        self.bar.update(1)
        if not self._sync_due():
            return True
        stop = torch.tensor(int(self.interrupt.requested), device=self.rt.device)
        if self.rt.distributed:
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if self._skipped is None:
            self._stop = bool(stop.item())
            return True
        ok, skipped, first, stop = torch.stack([self._ok.long(), self._skipped.long(), self._first_skipped,
                                                stop.long()]).tolist()  # the one host read
        self._stop = bool(stop)
        self._skipped.zero_()
        if skipped:
            self._on_nonfinite(first, skipped)
        return bool(ok)

    def _on_nonfinite(self, first: int, count: int) -> None:
        if self.cfg.nan_policy == "stop":
            run_id = self.run.info.run_id if self.run else "<run id>"
            if self.writer is not None:
                self.writer.wait()  # the upload in flight decides which checkpoint is the last good one
            good = self.writer.last_step if self.writer is not None and self.writer.last_step is not None \
                else self.last_saved
            kept = (f"the last good checkpoint (step {good}) is kept: resume with --resume {run_id} "
                    "and a lower --lr" if self.writer is None or self.writer.last_slot else
                    "no checkpoint was written yet: start again with a lower --lr")
            raise UserError(f"loss became NaN/inf at step {first}; stopped. {kept}, or use --nan-policy skip")
        if self.rt.is_main:
            import mlflow

            # the number of steps skipped since the previous log, at the first of them
            mlflow.log_metric("train/skipped_nonfinite", count, step=first)

    def throughput(self) -> float:
        """Items per second (all ranks) since the last call."""
        now = time.perf_counter()
        rate = self._items * self.rt.world_size / max(now - self._t0, 1e-9)
        self._items, self._t0 = 0, now
        return rate

    def checkpoint_if_due(self) -> None:
        """Rank 0 writes the checkpoint locally and uploads it in the background; the other ranks go on (the
        next collective call lines them up again)."""
        if self.due(self.cfg.ckpt_every):
            if self.rt.is_main:
                self.writer.save(self.snapshot())
            self.last_saved = self.step

    @contextlib.contextmanager
    def running(self, *loaders: DataLoader) -> Iterator[None]:
        """Progress bar and signal handling for the training loop; OOM becomes advice. Training ends when the
        last checkpoint is in the run (a failed final upload is an error) and the ``loaders``' persistent
        workers, which ignore stop signals, have been ended."""
        self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.desc, disable=not self.rt.is_main,
                        dynamic_ncols=True)
        self.interrupt = StepInterrupt()
        try:
            yield
            if self.writer is not None:
                self.writer.wait(final=True)
        except KeyboardInterrupt:
            if self.rt.is_main and self.step > self.last_saved and self.interrupt.at_boundary:
                self.writer.save(self.snapshot())  # a stop keeps the progress made since the last checkpoint
            raise
        except (RuntimeError, MemoryError) as exc:
            raise_if_out_of_memory(exc, self.cfg.batch_size)
            raise
        finally:
            self.interrupt.close()
            self.bar.close()
            if self.writer is not None:
                self.writer.wait()
                self.writer.close()
            for loader in loaders:  # no public API; without it exit would wait for workers that ignore SIGTERM
                workers = getattr(loader, "_iterator", None)
                if workers is not None and hasattr(workers, "_shutdown_workers"):
                    workers._shutdown_workers()
