"""LayerDrop (Fan, Grave, Joulin, ICLR 2020) and zero gradients for skipped parameters.

Paper:
    Reducing Transformer Depth on Demand with Structured Dropout, Fan, Grave, Joulin, ICLR 2020
    (https://arxiv.org/abs/1909.11556)

Each layer ``f_l`` of a stack of residual layers ``x_{l+1} = x_l + g_l(x_l)`` is skipped for the
whole mini-batch with probability ``p`` during training::

    x_{l+1} = x_l             with probability p      (nothing of f_l is computed)
            = f_l(x_l)        otherwise

No rescaling (the paper's and fairseq's ``LayerDropModuleList``); at inference every layer runs, or
the model is pruned to a subset of its layers. One draw per layer and step: ``torch.rand(())``
compared on the host, so the decision is a graph break under ``torch.compile`` and is drawn anew
every call (a Python ``random`` roll would be traced once and replayed, pytorch#95425).

DDP without ``find_unused_parameters``: a skipped layer's parameters take no part in the step, and
DDP's reducer would wait for their gradients forever. :func:`with_zero_grads` adds
``0 * sum_k w_k[0]`` (one element of each parameter) to the output, which gives every parameter an
exact zero gradient at the cost of one tiny op per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .drop import _check_p

__all__ = ["layer_dropped", "with_zero_grads"]


def layer_dropped(p: float, training: bool = True, device: Optional[torch.device] = None,
                  generator: Optional[torch.Generator] = None) -> bool:
    """Draw whether a layer is skipped this step: ``True`` with probability ``p`` when training.

    The draw is a ``torch.rand(())`` on ``device`` (``torch.manual_seed`` reproduces it) compared
    on the host: under ``torch.compile`` it is re-drawn at every call, never baked into a graph.
    """
    _check_p(p)
    if not training or p == 0.0:
        return False
    if p == 1.0:
        return True
    if generator is None:
        r = torch.rand((), device=device)
    else:
        r = torch.rand((), device=device, generator=generator)
    return bool(r < p)


def with_zero_grads(out: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` plus an exact zero that depends on every parameter in ``params`` (those that need
    a gradient): backward gives each one a zero gradient, so DDP with the default
    ``find_unused_parameters=False`` sees every parameter used, and all ranks reduce the same set.
    Values are unchanged (``x + 0.0 == x`` for every finite ``x``); nothing is added when grad
    mode is off or no parameter needs a gradient."""
    if not torch.is_grad_enabled():
        return out
    needing = [q for q in params if q.requires_grad and q.numel() > 0]
    if not needing:
        return out
    zero = sum((q.reshape(-1)[0] * 0.0 for q in needing), torch.zeros((), device=out.device))
    return out + zero.to(out.dtype)
