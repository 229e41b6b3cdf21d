"""Stochastic depth that skips the dropped branches instead of multiplying them by zero.

Paper: Deep Networks with Stochastic Depth, Huang et al., ECCV 2016
(https://arxiv.org/abs/1603.09382). A residual site computes ``out = s + f(x)``; stochastic
depth trains it as::

    out = s + m * f(x) / (1 - p),    m ~ Bernoulli(1 - p)

Masking (timm, torchvision, :class:`regsurgery.DropPath`) computes ``f(x)`` for every sample and
multiplies the dropped ones by zero: it saves nothing. The paper skipped a dropped block for the
whole mini-batch and trained about 25% faster at ``p_L = 0.5`` with linear decay (expected depth
``3L/4``). DINOv2 runs its residual branches on the kept rows only. Here the fx rewrite does this
for any model:

* the branch subgraph of each site (the nodes on the paths from the value the branch is computed
  from, its *source*, to the add) is cut out of the block's train-mode graph and compiled into
  its own function ``branch(block, source, *extras)``;
* the add becomes one call ``SkipDropPath(shortcut, source, *extras)``;
* ``mode="batch"``: one draw per step; dropped -> ``s`` (the branch does not run), kept ->
  ``s + f(x) / (1 - p)``;
* ``mode="row"``: one draw per sample; ``idx`` = kept rows;
  ``out = s.index_add(0, idx, f(x[idx]) * m[idx] / (1 - p))`` (gather, branch, scatter-add).
  This equals masking only when ``f`` treats samples independently: a branch with train-mode
  BatchNorm or another cross-sample op keeps masking at that site (:func:`skip_blocker` says why).

The keep mask is drawn exactly as :func:`regsurgery.ops.drop_path` draws it (same RNG call, same
number of values, same dtype), so with the same seed masking and skipping make the same decisions
and, for per-sample-independent branches without random ops of their own, give the same outputs
and gradients (up to the summation order of a smaller batch). ``E[out] = s + f(x)`` either way.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Any, Callable, Optional, Sequence

import torch

from .drop import DropPath, _check_mode, _check_p, _mask_dtype
from .layerdrop import with_zero_grads

__all__ = ["skip_drop_path", "SkipDropPath", "code_copy"]


# ----------------------------------------------------------------------------------------------
# functional op
# ----------------------------------------------------------------------------------------------
def _draw(shortcut: torch.Tensor, p: float, mode: str, scale_by_keep: bool,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    """The keep mask of :func:`regsurgery.ops.drop_path`: same call, shape, dtype and scaling."""
    keep = 1.0 - p
    shape = (shortcut.shape[0],) + (1,) * (shortcut.dim() - 1) if mode == "row" else (1,) * shortcut.dim()
    mask = torch.rand(shape, dtype=_mask_dtype(shortcut), device=shortcut.device, generator=generator).lt_(keep)
    if scale_by_keep and keep > 0.0:
        mask = mask.div_(keep)
    return mask


def _scatter_add(shortcut: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``shortcut`` with ``rows`` added at batch positions ``idx``, out of place; dtype and shape
    as ``shortcut + full_branch`` would have (type promotion, broadcasting)."""
    dtype = torch.promote_types(shortcut.dtype, rows.dtype)
    shape = torch.broadcast_shapes(shortcut.shape, (shortcut.shape[0],) + tuple(rows.shape[1:]))
    base = shortcut.to(dtype)
    if tuple(base.shape) != tuple(shape):
        base = base.expand(shape)
    rows = rows.to(dtype)
    if tuple(rows.shape[1:]) != tuple(shape[1:]):
        rows = rows.expand((rows.shape[0],) + tuple(shape[1:]))
    return base.index_add(0, idx, rows)


def skip_drop_path(
    shortcut: torch.Tensor,
    source: torch.Tensor,
    branch: Callable[..., torch.Tensor],
    p: float,
    training: bool = True,
    mode: str = "row",
    scale_by_keep: bool = True,
    extras: Sequence[Any] = (),
    generator: Optional[torch.Generator] = None,
    row_safe: bool = True,
    params: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """``shortcut + m * branch(source, *extras) / (1 - p)``, running ``branch`` only where ``m = 1``.

    ``m ~ Bernoulli(1 - p)`` is drawn as :func:`regsurgery.ops.drop_path` draws it: one per
    sample (``mode="row"``) or one per batch (``mode="batch"``, the paper). Batch mode runs the
    branch on the whole batch or not at all; row mode runs it on ``source[idx]`` for the kept rows
    ``idx`` and scatter-adds the result into ``shortcut``, which is correct only if ``branch``
    treats the rows of ``source`` (dim 0) independently. ``row_safe=False`` computes the full
    branch and masks it instead (same draws, same result, no saving). Not training or ``p == 0``:
    ``shortcut + branch(source)``. ``p == 1``: ``shortcut`` (a copy: callers may modify it in place).

    Under ``torch.compile`` the host decision (``nonzero`` / ``item``) is a graph break. Dynamo
    caches the code after it per code object, so one call site per distinct ``branch`` is best:
    :class:`SkipDropPath` gives every site its own copy of this function.

    Args:
        shortcut: the other operand of the residual add, batch first.
        source: the value the branch is computed from (batch first, same batch size).
        branch: callable ``branch(source, *extras) -> tensor`` broadcastable to ``shortcut``.
        p: drop probability in [0, 1].
        training: apply stochastic depth; when False the plain residual sum is returned.
        mode: ``"row"`` or ``"batch"``.
        scale_by_keep: divide survivors by ``1 - p`` so the expectation is kept.
        extras: further (batch-independent in row mode) arguments of ``branch``.
        generator: optional ``torch.Generator`` (on ``shortcut``'s device) for the draws.
        row_safe: row mode may gather (the branch is per-sample independent).
        params: the branch's parameters. When the whole branch is skipped they get an exact zero
            gradient (:func:`regsurgery.ops.layerdrop.with_zero_grads`), so DDP works with its
            default ``find_unused_parameters=False``.
    """
    _check_p(p)
    _check_mode(mode)
    if not training or p == 0.0:
        return shortcut + branch(source, *extras)
    mask = _draw(shortcut, p, mode, scale_by_keep, generator)
    if mode == "batch":
        # One host decision per step: the point is not to launch the branch at all.
        if mask.item() == 0.0:
            return with_zero_grads(shortcut.clone(), params)
        y = branch(source, *extras)
        return shortcut + y * mask.to(y.dtype)
    batch = shortcut.shape[0]
    if not row_safe or source.dim() == 0 or source.shape[0] != batch:
        y = branch(source, *extras)
        return shortcut + y * mask.to(y.dtype)
    idx = mask.view(-1).nonzero().view(-1)  # data-dependent size: a graph break under torch.compile
    kept = idx.numel()
    if kept == 0:
        return with_zero_grads(shortcut.clone(), params)
    if kept == batch:  # nothing to save: skip the gather / scatter
        y = branch(source, *extras)
        return shortcut + y * mask.to(y.dtype)
    y = branch(source.index_select(0, idx), *extras)
    y = y * mask.index_select(0, idx).to(y.dtype)
    return _scatter_add(shortcut, idx, y)


def code_copy(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own. torch.compile (dynamo) caches compiled frames, and the
    resume functions after a graph break, per code object: one copy per site keeps each site's
    guards (its branch) from evicting the others' (recompile_limit is 8)."""
    code = fn.__code__
    name = f"{code.co_name}__{label}"
    changes: dict[str, Any] = {"co_name": name}
    if hasattr(code, "co_qualname"):
        changes["co_qualname"] = f"{code.co_qualname}__{label}"
    new = types.FunctionType(code.replace(**changes), fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__ = fn.__doc__
    return new


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
class SkipDropPath(DropPath):
    """Stochastic depth that skips dropped residual branches; see :func:`skip_drop_path`.

    Replaces a residual add ``shortcut + branch(source)`` in a patched block's train-mode graph:
    ``forward(shortcut, source, *extras)``. The branch is the block's own subgraph compiled into a
    function of ``(block, source, *extras)`` (:func:`bind_skip_module`); the owning block is held
    as a plain attribute (not a submodule: ``state_dict`` and ``named_modules`` stay unchanged, and
    ``copy.deepcopy`` of the model maps it to the copied block).

    Args:
        p: drop probability in [0, 1]; a plain attribute that schedules may reassign.
        mode: ``"row"`` (branch on the kept samples only) or ``"batch"`` (skip for the whole batch).
        scale_by_keep: divide survivors by ``1 - p``.
    """

    def __init__(self, p: float = 0.1, mode: str = "row", scale_by_keep: bool = True) -> None:
        super().__init__(p, mode, scale_by_keep)
        self._branch_fn: Optional[Callable[..., torch.Tensor]] = None
        self._checked_extras: tuple[int, ...] = ()
        self.branch_nodes: tuple[str, ...] = ()
        self.branch_code = ""
        self.branch_params: tuple[str, ...] = ()  # the branch's parameters, named in the owning block
        self._impl: Callable[..., torch.Tensor] = skip_drop_path  # a per-site copy once bound
        object.__setattr__(self, "_owner", None)  # never a registered submodule

    # bind_skip_module installs a per-site copy of this method as the instance's ``forward``.
    def forward(self, shortcut: torch.Tensor, source: torch.Tensor, *extras: Any) -> torch.Tensor:  # type: ignore[override]
        fn = self._branch_fn
        owner = self._owner
        if fn is None or owner is None:
            raise RuntimeError(
                "SkipDropPath has no branch: it is created by apply_stochastic_depth(..., "
                "skip_dropped=True) and bound to its block; re-apply the plan instead of building one"
            )
        branch = functools.partial(fn, owner)
        # An optional input (default None) given a tensor at run time may be per-sample: mask.
        row_safe = not any(isinstance(extras[i], torch.Tensor) for i in self._checked_extras)
        params = [owner.get_parameter(name) for name in self.branch_params]  # type: ignore[union-attr]
        return self._impl(shortcut, source, branch, self.p, self.training, self.mode,
                          self.scale_by_keep, extras, None, row_safe, params)

    def __getstate__(self) -> dict[str, Any]:
        # The compiled branch and the per-site forward are generated code (they do not pickle);
        # the owning block re-binds them when it regenerates its train forward after unpickling.
        state = super().__getstate__()
        for key in ("forward", "_branch_fn", "_impl"):
            state.pop(key, None)
        state["_branch_fn"], state["_impl"] = None, skip_drop_path
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> SkipDropPath:
        # Deepcopy keeps the bound branch (the copy's forward is rebound to the copy, its owner
        # mapped to the copied block); only pickling drops the generated code.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        nodes = "->".join(self.branch_nodes)
        return f"{super().extra_repr()}, skip=True, branch={nodes}"
