"""Weight EMA (``--ema-weights DECAY``): an exponential moving average of a model's weights, for evaluation.

Validation, logged samples and the exported model use the average (smoother, usually better than the last
weights); training never does. The average is bias-corrected, as Adam's moments are: the k-th applied update
weighs the new weights by (1 - decay) / (1 - decay^k), so the average is the exponentially weighted mean of the
weights trained so far, the first update copies them, and nothing of the random initialisation stays in it (an
uncorrected 0.99 average still holds 37% of the initial weights after 100 steps, 8% after 250).

Only floating-point parameters are averaged. Buffers, and the parameters named in ``live``, are copied from the
trained model at every update instead: a VQ codebook is such a tensor — its dead-code restarts replace a code
outright, and an average would blend the new code with the dead one it replaced for ~1/(1-decay) steps, leaving
codes the encoder was never trained against. Its usage statistics (buffers) likewise describe the trained
model's codebook.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel


class WeightEMA:
    """The average of ``model`` (``decay`` > 0) or ``model`` itself (``decay`` == 0), behind one interface."""

    def __init__(self, model: torch.nn.Module, decay: float, live: tuple[str, ...] = ()) -> None:
        self.model, self.decay, self.live = model, decay, live
        self.averaged = (AveragedModel(model, use_buffers=False)
                         if decay > 0 else None)
        if self.averaged is not None:
            self.averaged.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """What evaluation uses: the averaged copy, or the trained model when the EMA is off."""
        return self.averaged.module if self.averaged is not None else self.model

    @torch.no_grad()
    def update(self, ok: torch.Tensor | bool = True) -> None:
        """After an optimizer step: per-tensor lerps on the device, no host synchronisation. ``ok`` (a device
        bool): whether the step was applied; a skipped step leaves the average as it is."""
        if self.averaged is None:
            return
        count = self.averaged.n_averaged  # applied updates so far, on the device
        weight = (1 - self.decay) / (1 - self.decay ** (count + 1).double()).float()
        weight = weight * torch.as_tensor(ok, device=count.device).float()
        ema_params = dict(self.averaged.module.named_parameters())
        # AveragedModel.update_parameters would read n_averaged on the host every step; here the count stays on
        # the device, and the first update's weight of 1 makes the copy it makes
        for name, param in self.model.named_parameters():
            if name in self.live:
                ema_params[name].copy_(param)
            elif param.is_floating_point():
                ema_params[name].lerp_(param.detach(), weight.to(param.device))
        self.averaged.n_averaged += weight.gt(0).long()
        for ema_buffer, buffer in zip(self.averaged.module.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any] | None:
        """For checkpoints (None when off)."""
        return self.averaged.state_dict() if self.averaged is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.averaged is not None and state is not None:
            self.averaged.load_state_dict(state)


def evaluated_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a training checkpoint's run evaluates and exports: its average when it kept one (the
    ``WeightEMA.state_dict`` saved as "ema"), else its trained weights. For runs that logged no weights-only model."""
    averaged = checkpoint.get("ema")
    if not isinstance(averaged, dict) or not averaged:  # off, or a malformed entry: load_weights checks the rest
        return checkpoint["model"]
    return {k.removeprefix("module."): v for k, v in averaged.items() if k != "n_averaged"}
