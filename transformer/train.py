"""train: a GPT over a quantize run's code grids, as one MLflow run (tag stage=transformer)."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F

from core.checkpoint import load_weights
from core.data import ResumableSampler
from core.errors import UserError
from core.health import check_val_loss, note_no_val_split
from core.images import grid_image
from core.loop import TrainLoop, cosine_lr, step_optimizer, training_session
from core.ema import WeightEMA
from core.options import build_config, config_options, explicit_options
from core.runtime import Runtime
from core.artifacts import damaged, read_codes, read_table
from core.tracking import download, get_run, log_step_image, run_name_option, stage_run, with_tracking_options
from core.weights import LAST_MODEL_DIR, log_model_weights
from transformer.config import GPTTrainConfig
from transformer.model import GPT, GPTConfig
from transformer.sample import generate
from transformer.vocab import Vocab


@dataclasses.dataclass
class CodeData:
    """A quantize run's artifacts: code grids per split (memory-mapped, read a batch at a time), with --flip the
    flipped training images' grids, class ids per row (-1: none) and the vocabulary."""
    vocab: Vocab
    codes: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    flipped: np.ndarray | None = None

    @classmethod
    def from_run(cls, run_id: str) -> "CodeData":
        """Each rank calls it itself: the files are memory-mapped, so a million grids cost a few pages of RSS."""
        import mlflow

        get_run(run_id, "quantize")
        vocab = Vocab.load(download(run_id, "vocab.json"), run_id)
        index = read_table(download(run_id, "index.csv"), run_id, "index.csv", ("split", "row", "label_id"))
        codes, labels = {}, {}
        for split in ("train", "val"):
            name = f"codes/{split}.npy"
            codes[split] = arr = read_codes(download(run_id, name), run_id, name, mmap=True)
            if arr.shape[1:] != vocab.grid_shape:
                raise damaged(run_id, name, f"holds grids of shape {arr.shape[1:]}, but vocab.json says "
                              f"{vocab.grid_shape}")
            part = index[index.split == split].sort_values("row")
            ids = part.label_id.to_numpy()
            if ids.dtype.kind not in "iu" or len(ids) != len(arr):
                raise damaged(run_id, "index.csv", f"has {len(part)} {split} rows (with integer label_id), but "
                              f"{name} has {len(arr)} grids")
            labels[split] = ids.astype(np.int32)
        if len(codes["train"]) == 0:
            raise UserError(f"quantize run {run_id} has no training code grids")
        flipped = None
        names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, "codes")}
        if "train_flip.npy" in names:
            flipped = read_codes(download(run_id, "codes/train_flip.npy"), run_id, "codes/train_flip.npy", mmap=True)
            if flipped.shape != codes["train"].shape:
                raise damaged(run_id, "codes/train_flip.npy", f"holds {flipped.shape} grids, but codes/train.npy "
                              f"holds {codes['train'].shape}")
        return cls(vocab, codes, labels, flipped)

    def sequences(self, split: str, rows: np.ndarray, label_dropout: float = 0.0,
                  rng: np.random.Generator | None = None, flip: bool = False) -> torch.Tensor:
        """Token sequences [prefix, codes...] of the grids at ``rows``; the prefix is the class token, or SOS
        (unconditional / dropped). ``flip``: each training sample is taken from the flipped images' grids with
        probability 1/2. Built on the host from numpy indices: no tensor is read back."""
        rows = np.asarray(rows, dtype=np.int64)
        grids = self._grids(self.codes[split], rows, f"codes/{split}.npy")
        labels = self.labels[split][rows].astype(np.int64)
        rng = rng if rng is not None else np.random.default_rng(0)
        if flip and split == "train" and self.flipped is not None:
            take = rng.random(len(rows)) < 0.5
            grids[take] = self._grids(self.flipped, rows[take], "codes/train_flip.npy")
        prefix = self.vocab.prefix(torch.from_numpy(labels))
        if label_dropout > 0:
            drop = torch.from_numpy(rng.random(len(rows)) < label_dropout)
            prefix = torch.where(drop, self.vocab.sos_id, prefix)
        return torch.cat([prefix[:, None], torch.from_numpy(grids).flatten(1)], dim=1)

    def _grids(self, codes: np.ndarray, rows: np.ndarray, name: str) -> np.ndarray:
        """The grids at ``rows`` of ``codes`` (the file ``name``), their code ids checked: per batch, as the files
        are never read whole."""
        grids = np.asarray(codes[rows], dtype=np.int64)
        if grids.size and grids.max() >= self.vocab.codebook_size:
            raise UserError(f"{name} holds code id {grids.max()}, but vocab.json says {self.vocab.codebook_size} "
                            "codes: the quantize run is damaged; re-run quantize")
        return grids


def lr_at(step: int, cfg: GPTTrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``max_steps``."""
    return cosine_lr(step, cfg.lr, cfg.min_lr, cfg.lr_warmup_steps, cfg.max_steps)


@torch.no_grad()
def validation_loss(model: GPT, data: CodeData, rt: Runtime, batch_size: int, max_batches: int = 20) -> float:
    split = "val" if len(data.codes["val"]) else "train"
    n = min(len(data.codes[split]), batch_size * max_batches)
    model.eval()
    total = 0.0
    for lo in range(0, n, batch_size):
        seq = data.sequences(split, np.arange(lo, min(lo + batch_size, n))).to(rt.device)
        with rt.autocast():
            logits = model(seq[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (n * (seq.shape[1] - 1))


def log_samples(model: GPT, data: CodeData, tokenizer, step: int, seed: int) -> None:
    """Decode a few samples (one per class for conditional models) through the upstream tokenizer."""
    n_classes = data.vocab.num_classes
    labels = torch.arange(8) % n_classes if n_classes else None
    codes, _ = generate(model, 8, labels=labels, seed=seed, top_k=None)  # in eval mode, restored after
    captions = [data.vocab.classes[i] for i in labels.tolist()] if labels is not None else None
    log_step_image(grid_image(tokenizer.decode(codes).cpu(), nrow=4, captions=captions), "samples", step)


SCORES_NOTE_BYTES = 4 * 2 ** 30  # a step's attention scores (every layer's) beyond which a run says how to shrink them


def attention_memory_note(cfg: GPTTrainConfig, grid: tuple[int, int]) -> str | None:
    """What a step's attention scores cost on these grids, when that is a lot, and the options that cut it; None
    when it is small. With the relative-position bias, attention computes a matrix of float32 scores per head and
    sequence, T x T for full attention (on CPU, and as the gradient of CUDA's bias), T x w(1 + W) for a window. A
    64x64 grid (a 256-px image at the default downsampling of 4) has 4,097 tokens: at the defaults ~8 GiB of scores
    per layer, and a CPU step peaked at 24 GB (12 GB with --window-size 8, 6 GB with --no-rel-bias;
    docs/benchmarks.md); beyond the machine's memory its out-of-memory killer ends the process without a word, so
    the run says so before it starts. The threshold counts every layer's scores: a rough bound, not a forecast."""
    H, W = grid
    T = 1 + H * W
    if not cfg.window_size and not cfg.rel_bias:
        return None  # the fused causal kernels: memory linear in the tokens
    keys = min(T, cfg.window_size * (1 + W)) if cfg.window_size else T
    b, per_sequence = cfg.batch_size, cfg.n_head * T * keys * 4  # one layer's float32 scores for one sequence
    per_layer = b * per_sequence
    if per_layer * cfg.n_layer <= SCORES_NOTE_BYTES:
        return None
    fits = SCORES_NOTE_BYTES // (cfg.n_layer * per_sequence)  # sequences a micro-batch may hold
    split = next((k for k in range(2, b + 1) if b % k == 0 and b // k <= fits), b)  # into equal micro-batches
    fixes = [f"--batch-size {b // split} --grad-accum {cfg.grad_accum * split} (the same batch, in micro-batches)"
             ] if b > 1 else []
    if not cfg.window_size:
        fixes += ["--no-rel-bias (fused attention kernels: memory linear in tokens)",
                  "--window-size 8 (a local window)"]
    fixes.append("a tokenizer that downsamples more (train-vqvae --ch-mult 1,1,2,2,4: 16x16 grids at 256 px)")
    return (f"{H}x{W} grids: {T:,} tokens a sequence; attention computes {T:,}x{keys:,} scores per head and "
            f"sequence, ~{per_layer / 2 ** 30:.1f} GiB a layer at --batch-size {b} (the defaults peaked at 24 GB on "
            f"64x64 grids on a CPU); if the machine runs out of memory: {'; '.join(fixes)}")


def train_transformer(cfg: GPTTrainConfig, resume_run_id: str | None = None, overrides: dict | None = None,
                      tracking_uri: str | None = None, experiment: str | None = None,
                      register: str | None = None) -> str:
    """Train (or resume) the transformer; returns the MLflow run ID. ``register``: Model Registry name."""
    with training_session(cfg, "transformer", resume_run_id, overrides, tracking_uri, experiment) as session:
        return _train(*session, resume_run_id, register)


def _train(rt: Runtime, cfg: GPTTrainConfig, state: dict | None, slot: str | None,
           resume_run_id: str | None, register: str | None = None) -> str:
    import mlflow

    from transformer.pyfunc_model import log_generator_model
    from vqvae.tokenizer import load_tokenizer

    # on every rank: memory maps, nothing sent between ranks; read before the run exists, so a damaged quantize
    # run leaves no run behind
    data = CodeData.from_run(cfg.quantize_run_id)
    note = attention_memory_note(cfg, tuple(data.vocab.grid_shape))
    if note and rt.is_main:
        click.echo(f"note: {note}", err=True)
    with stage_run("transformer", cfg, upstream_run_id=cfg.quantize_run_id, upstream_stage="quantize",
                   resume_run_id=resume_run_id, enabled=rt.is_main,
                   name=(f"w{cfg.window_size}" if cfg.window_size else "full", f"L{cfg.n_layer}")) as run:
        vocab = data.vocab
        mcfg = GPTConfig(codebook_size=vocab.codebook_size, num_classes=vocab.num_classes,
                         grid_shape=tuple(vocab.grid_shape), n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, window_size=cfg.window_size, dropout=cfg.dropout,
                         pos_emb=cfg.pos_emb, rel_bias=cfg.rel_bias)
        model = GPT(mcfg).to(rt.device)
        opt = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95))  # fused: skips bad steps on device
        scaler = rt.grad_scaler()
        ema = WeightEMA(model, cfg.ema_weights)
        # the weights (EMA ones when on) at the lowest validation loss so far: on a few hundred images the last
        # ones are often overfit, so these are the run's model, and the last ones are logged beside them
        best: dict[str, Any] = {"val": math.inf, "step": 0, "model": None}
        step = 0
        if state is not None:
            load_weights(model, state["model"], f"checkpoint of run {resume_run_id}")
            opt.load_state_dict(state["opt"])
            if state["scaler"]:  # empty when saved unscaled (fp32/bf16): resumed in fp16, the scaler starts afresh
                scaler.load_state_dict(state["scaler"])
            ema.load_state_dict(state.get("ema"))
            best = state.get("best") or best  # older checkpoints kept none
            step = state["step"]
        tokenizer = None
        if rt.is_main:
            if not len(data.codes["val"]):
                note_no_val_split("training grids", f"quantize run {cfg.quantize_run_id} has none: mark rows 'val' "
                                  "in the manifest's split column (or raise train-vqvae's --val-fraction) and "
                                  "quantize again; generate's best-validation weights are those of the lowest "
                                  "training loss")
            tokenizer = load_tokenizer(get_run(cfg.quantize_run_id).data.tags["upstream_run_id"], rt.device)
            if state is None:
                mlflow.log_params({"num_classes": vocab.num_classes, "codebook_size": vocab.codebook_size,
                                   "grid_shape": "x".join(map(str, vocab.grid_shape)),
                                   "num_params": sum(p.numel() for p in model.parameters())})
        ddp_model = torch.compile(rt.wrap(model)) if cfg.compile else rt.wrap(model)
        sampler = iter(ResumableSampler(len(data.codes["train"]), rt.rank, rt.world_size, cfg.seed,
                                        start=step * cfg.grad_accum * cfg.batch_size))

        def snapshot() -> dict:
            return {"config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(mcfg), "step": loop.step,
                    "model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                    "ema": ema.state_dict(), "best": best}

        loop = TrainLoop(cfg, rt, run, snapshot, step, slot, "train")
        last_train_loss = None
        with loop.running():
            # the untrained model's samples at step 0: the baseline, and what MLflow's image card shows first (its
            # step slider opens at 0); only where several grids are logged (--sample-every 0: one, at the end)
            if rt.is_main and step == 0 and 0 < cfg.sample_every < cfg.max_steps:
                log_samples(ema.module, data, tokenizer, 0, cfg.seed)
            while loop.step < cfg.max_steps:
                loop.begin_step()
                step = loop.step
                # label dropout and flips depend only on (seed, step, rank): a resumed run draws exactly the same
                rng = np.random.default_rng([cfg.seed, step, rt.rank])
                lr = lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_sum, tokens = torch.zeros((), device=rt.device), 0  # on the device until logged
                for micro in range(cfg.grad_accum):
                    rows = np.fromiter(itertools.islice(sampler, cfg.batch_size), dtype=np.int64)
                    seq = data.sequences("train", rows, cfg.label_dropout if vocab.num_classes else 0.0, rng,
                                         flip=True)
                    # pinned, the copy overlaps the previous step's work on CUDA (unpinned, non_blocking would not)
                    seq = (seq.pin_memory() if rt.pin_memory() else seq).to(rt.device, non_blocking=rt.pin_memory())
                    sync = micro == cfg.grad_accum - 1 or not rt.distributed
                    with contextlib.nullcontext() if sync else ddp_model.no_sync():
                        with rt.autocast():
                            logits = ddp_model(seq[:, :-1])
                            loss = F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())
                        scaler.scale(loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach() / cfg.grad_accum
                    tokens += seq[:, 1:].numel()
                # a non-finite step is skipped on the device; it still counts, validates and checkpoints on schedule
                ok = loop.step_ok(torch.isfinite(loss_sum))
                step_optimizer(opt, scaler, ok, clip=cfg.grad_clip)
                ema.update(ok)
                finite = loop.end_step(tokens)  # read from the device only where something below reads it too
                if rt.is_main and finite and loop.due(cfg.log_every):
                    train_loss = last_train_loss = loss_sum.item()
                    mlflow.log_metrics({"train/loss": train_loss, "train/bits_per_token": train_loss / math.log(2),
                                        "train/lr": lr, "train/tokens_per_sec": loop.throughput()}, step=loop.step)
                    loop.bar.set_postfix(loss=f"{train_loss:.4f}")
                if rt.is_main and loop.due(cfg.val_every):
                    val = validation_loss(ema.module, data, rt, cfg.batch_size)
                    mlflow.log_metrics({"val/loss": val, "val/bits_per_token": val / math.log(2)}, step=loop.step)
                    check_val_loss(cfg, loop.step, val, train_loss=last_train_loss)
                    if val < best["val"]:  # a copy on the host: device memory stays one model
                        best = {"val": val, "step": loop.step, "model": {
                            k: v.detach().to("cpu", copy=True) for k, v in ema.module.state_dict().items()}}
                if rt.is_main and loop.due(cfg.sample_every):
                    log_samples(ema.module, data, tokenizer, loop.step, cfg.seed)
                loop.checkpoint_if_due()
        if rt.is_main:
            log_model_weights(ema.module.state_dict(), "transformer", dataclasses.asdict(mcfg), loop.step,
                              artifact_path=LAST_MODEL_DIR)
            best_step = best["step"] or loop.step  # 0: no validation loss recorded, the last weights
            if best_step != loop.step:
                load_weights(ema.module, best["model"], f"best-validation weights of step {best_step}")
            mlflow.log_metrics({"val/best_loss": best["val"], "val/best_step": best_step}, step=loop.step)
            # model/ and the logged generator: the best-validation weights (generate --weights last: the others)
            log_model_weights(ema.module.state_dict(), "transformer", dataclasses.asdict(mcfg), best_step)
            log_generator_model(ema.module, vocab, tokenizer, best_step, register)
        return run.info.run_id if run else ""


@click.command("train")
@config_options(GPTTrainConfig)
@click.option("--resume", "resume_run_id", default=None, help="Continue this transformer run from its last checkpoint.")
@click.option("--register", default=None, metavar="NAME",
              help="Register the trained generator (transformer + its tokenizer) in the Model Registry as NAME.")
@run_name_option
@with_tracking_options
@click.pass_context
def train_command(ctx: click.Context, resume_run_id: str | None, register: str | None, tracking_uri: str | None,
                  experiment: str, **values: Any) -> None:
    """Train the transformer on a quantize run's code grids (prints the run ID last)."""
    cfg = build_config(GPTTrainConfig, values)
    if not resume_run_id and not cfg.quantize_run_id:
        raise UserError("--quantize-run-id is required (the run ID printed by quantize), unless --resume is given")
    train_transformer(cfg, resume_run_id, explicit_options(ctx, values), tracking_uri, experiment, register)
