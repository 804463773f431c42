"""Weight EMA (``--ema-weights DECAY``): an exponential moving average of a model's weights, for evaluation.

Validation, logged samples and the exported model use the average (smoother, usually better than the last
weights); training never does. Only floating-point parameters are averaged. Buffers, and the parameters named
in ``live``, are copied from the trained model at every update instead: a VQ codebook is such a tensor — its
dead-code restarts replace a code outright, and an average would blend the new code with the dead one it
replaced for ~1/(1-decay) steps, leaving codes the encoder was never trained against. Its usage statistics
(buffers) likewise describe the trained model's codebook.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """The average of ``model`` (``decay`` > 0) or ``model`` itself (``decay`` == 0), behind one interface."""

    def __init__(self, model: torch.nn.Module, decay: float, live: tuple[str, ...] = ()) -> None:
        self.model, self.decay, self.live = model, decay, live
        self.averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
                         if decay > 0 else None)
        if self.averaged is not None:
            self.averaged.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """What evaluation uses: the averaged copy, or the trained model when the EMA is off."""
        return self.averaged.module if self.averaged is not None else self.model

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (fused per-tensor lerps on the device, no host synchronisation)."""
        if self.averaged is None:
            return
        self.averaged.update_parameters(self.model)
        ema_params = dict(self.averaged.module.named_parameters())
        for name in self.live:
            ema_params[name].copy_(self.model.get_parameter(name))
        for ema_buffer, buffer in zip(self.averaged.module.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any] | None:
        """For checkpoints (None when off)."""
        return self.averaged.state_dict() if self.averaged is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.averaged is not None and state is not None:
            self.averaged.load_state_dict(state)
