"""The official taming-transformers modules, as installed from PyPI (`taming-transformers-rom1504`, named in
benchmarks/requirements.txt), for the benchmarks to time beside ours: never a re-implementation of them.

The package's modules import `transformers` (mingpt: `top_k_top_p_filtering`) and `pytorch_lightning` at module
level; neither is used by what we time, so both are stubbed in sys.modules when they are not installed.
"""
from __future__ import annotations

import sys
import types

import torch

NOT_INSTALLED = ("official taming-transformers not installed: its rows are skipped "
                 "(pip install -r benchmarks/requirements.txt)")


def _top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                           filter_value: float = -float("inf"), min_tokens_to_keep: int = 1) -> torch.Tensor:
    """transformers' filter, for the stub (the timed sampling passes top_k=None, so it is never called there)."""
    if top_k > 0:
        kth = torch.topk(logits, min(max(top_k, min_tokens_to_keep), logits.size(-1)))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., :min_tokens_to_keep] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), filter_value)
    return logits


def _stub(name: str, **attrs) -> None:
    try:
        __import__(name)
    except ImportError:
        sys.modules[name] = types.SimpleNamespace(__name__=name, **attrs)


def mingpt():
    """taming.modules.transformer.mingpt, or None (with a printed note) when the package is not installed."""
    _stub("transformers", top_k_top_p_filtering=_top_k_top_p_filtering)
    _stub("pytorch_lightning", LightningModule=torch.nn.Module)
    try:
        from taming.modules.transformer import mingpt as module
    except ImportError:
        print(f"note: {NOT_INSTALLED}")
        return None
    return module
