"""Element-wise dropout on hidden layers (Srivastava et al., 2014).

Paper:
    Dropout: A Simple Way to Prevent Neural Networks from Overfitting, Srivastava, Hinton,
    Krizhevsky, Sutskever, Salakhutdinov, JMLR 15, 2014 (https://jmlr.org/papers/v15/srivastava14a.html)

Each element of a hidden layer's output is kept with probability ``1 - p``::

    out_i = x_i * m_i / (1 - p),    m_i ~ Bernoulli(1 - p) independently,

so ``E[out_i] = x_i`` ("inverted" dropout: the scaling happens in training, inference is the
identity). ``p == 0`` is the identity, ``p == 1`` returns zeros (never a division by zero). The
recipe puts it on the outputs of hidden fully-connected layers, after the activation and before
the next linear layer; not on the network input and not on the logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from .drop import RegularizerModule, _check_floating, _check_p, _mask_dtype, _uniform

__all__ = ["dropout", "Dropout"]


def dropout(
    x: torch.Tensor,
    p: float,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``x * m / (1 - p)`` with one independent ``m ~ Bernoulli(1 - p)`` per element.

    Identity when not training or ``p == 0``; zeros when ``p == 1``. Gradients flow only through
    kept elements (scaled by ``1 / (1 - p)``).

    Args:
        x: a hidden activation, any shape, any floating dtype and device.
        p: drop probability in [0, 1].
        training: apply the op; when False return ``x`` unchanged.
        generator: optional ``torch.Generator`` (on ``x``'s device) for reproducible draws.
    """
    _check_p(p)
    _check_floating(x, "dropout")
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    # rand < keep (not bernoulli_(keep)): a compiled graph does not specialize on the value of p.
    mask = _uniform(tuple(x.shape), _mask_dtype(x), x.device, generator).lt_(keep)
    mask = mask.div_(max(keep, 1e-30))  # p == 1: all-zero mask, no division by zero
    return x * mask.to(x.dtype)


class Dropout(RegularizerModule):
    """Element-wise dropout on a hidden activation; see :func:`dropout`.

    Args:
        p: drop probability in [0, 1]; a plain attribute that schedules may reassign.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        _check_p(p)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"
