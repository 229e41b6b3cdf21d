"""LayerDrop (Fan, Grave, Joulin, ICLR 2020) and pruning to a subset of layers."""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any, Optional, Union

from torch import nn

from .analysis.stacks import LayerStack, find_layer_stacks
from .api import NoSitesError, Patterns, _maybe_copy
from .capture.fx import get_submodule, require_module
from .plan import check_rate, scope_selected
from .rewrite.layerdrop import install_layerdrop

__all__ = ["apply_layerdrop", "prune_layers", "keep_indices", "keep_blocks", "KEEP_RULES"]

KEEP_RULES = ("every_other",)
Keep = Union[str, float, list, tuple, dict]


def _selected_stacks(model: nn.Module, include: Patterns, example_inputs: Any, what: str) -> list[LayerStack]:
    stacks = find_layer_stacks(model, example_inputs)
    usable = [s for s in stacks if s.droppable]
    if not usable:
        refused = "; ".join(f"{s.scope}: {next(iter(s.refused.values()))}" for s in stacks[:3] if s.refused)
        raise NoSitesError(
            f"{what}: {type(model).__name__} has no stack of repeated residual blocks (a ModuleList / "
            f"Sequential of same-class blocks with output = input + branch)"
            + (f" ({refused})" if refused else "")
        )
    chosen = [s for s in usable if scope_selected(s.scope, include)]
    if not chosen:
        raise NoSitesError(
            f"include={include!r} selects none of the layer stacks {[s.scope for s in usable]}; fix the pattern"
        )
    return chosen


def apply_layerdrop(
    model: nn.Module,
    rate: float = 0.2,
    include: Patterns = None,
    *,
    example_inputs: Optional[Any] = None,
    inplace: bool = True,
) -> nn.Module:
    """LayerDrop (Fan et al., ICLR 2020): skip each block of each layer stack with probability
    ``rate`` per training step, for the whole batch, computing nothing for a skipped block.

    Stacks are found by :func:`regsurgery.analysis.stacks.find_layer_stacks` (one recorded forward
    of ``example_inputs``, inferred when None): a ModuleList / Sequential of same-class blocks;
    only blocks whose output has their input's shape and is ``input + branch`` are wrapped.
    ``include`` selects stacks by scope pattern. Each block keeps its object, class and
    ``state_dict``; eval outputs are bitwise the original's; :func:`regsurgery.strip` removes it.
    The draw is a torch op compared on the host, re-drawn on every call also under
    ``torch.compile``; skipped blocks give their parameters zero gradients, so DDP needs no
    ``find_unused_parameters``. Returns the model (a patched copy with ``inplace=False``).
    """
    require_module(model)
    rate = check_rate("rate", rate)
    stacks = _selected_stacks(model, include, example_inputs, "apply_layerdrop")
    model = _maybe_copy(model, inplace)
    for stack in stacks:
        container = get_submodule(model, stack.scope)
        for i in stack.droppable:
            install_layerdrop(container[i], rate)  # type: ignore[index]
    return model


def keep_indices(keep: Keep, size: int, scope: str = "") -> list[int]:
    """Indices of the blocks of a stack of ``size`` to keep.

    ``"every_other"``: 0, 2, 4, ... (fairseq's ``--encoder-layers-to-keep`` example); a fraction
    in (0, 1]: ``round(f * size)`` blocks spread evenly (``floor(i * size / k)``); a list of
    indices (negative ones count from the end); a dict ``{stack scope: one of those}``.
    """
    if isinstance(keep, dict):
        if scope not in keep:
            return list(range(size))
        keep = keep[scope]
    if isinstance(keep, str):
        if keep not in KEEP_RULES:
            raise ValueError(f"keep must be one of {KEEP_RULES}, a fraction in (0, 1] or a list of indices, "
                             f"got {keep!r}")
        return list(range(0, size, 2))
    if isinstance(keep, numbers.Real) and not isinstance(keep, (bool, numbers.Integral)):
        f = float(keep)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"keep as a fraction must be in (0, 1], got {keep!r}")
        k = max(1, round(f * size))
        return sorted({(i * size) // k for i in range(k)})
    if isinstance(keep, (list, tuple)) and keep:
        out = []
        for i in keep:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -size <= int(i) < size:
                raise ValueError(f"keep index {i!r} is out of range for the stack {scope or '<root>'!r} of "
                                 f"{size} blocks")
            out.append(int(i) % size)
        if len(set(out)) != len(out):
            raise ValueError(f"keep lists an index twice: {list(keep)!r}")
        return sorted(out)
    raise ValueError(f"keep must be 'every_other', a fraction in (0, 1], a non-empty list of indices or a "
                     f"dict of them per stack, got {keep!r}")


def prune_layers(
    model: nn.Module,
    keep: Keep = "every_other",
    include: Patterns = None,
    *,
    example_inputs: Optional[Any] = None,
    inplace: bool = True,
) -> nn.Module:
    """Remove blocks from every layer stack (LayerDrop's inference-time pruning, Fan et al. 2020).

    ``keep`` chooses the blocks to keep in each selected stack (see :func:`keep_indices`). Only
    droppable blocks (same shape in and out, residual on their input) may be removed; removing
    another is a ValueError and nothing is changed. The container (same object, same
    ``nn.ModuleList`` / ``nn.Sequential`` class) then holds the kept blocks (the same block
    objects) re-indexed from 0, so the model keeps its class and its ``state_dict`` holds the kept
    blocks' keys, renumbered as a new ModuleList of them would be.
    Returns the model (a pruned copy with ``inplace=False``); the result exports like the original.
    """
    require_module(model)
    stacks = _selected_stacks(model, include, example_inputs, "prune_layers")
    if isinstance(keep, dict):
        unknown = sorted(set(keep) - {s.scope for s in stacks})
        if unknown:
            raise ValueError(f"keep names stacks {unknown} that are not layer stacks of "
                             f"{type(model).__name__} (stacks: {[s.scope for s in stacks]})")
    plan: list[tuple[LayerStack, list[int]]] = []
    for stack in stacks:
        kept = keep_indices(keep, stack.size, stack.scope)
        removed = [i for i in range(stack.size) if i not in kept]
        bad = [i for i in removed if i not in stack.droppable]
        if bad:
            raise ValueError(
                f"cannot remove block {stack.block_scope(bad[0])} of {stack.scope or '<root>'}: "
                f"{stack.refused.get(bad[0], 'not droppable')}"
            )
        plan.append((stack, kept))
    model = _maybe_copy(model, inplace)
    return keep_blocks(model, {stack.scope: kept for stack, kept in plan})


def keep_blocks(model: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """Keep only blocks ``kept[scope]`` of each container ``scope``, in place, with no analysis:
    how :func:`regsurgery.load` rebuilds a pruned model from its recipe (plain data, so every
    scope must name an ``nn.ModuleList`` / ``nn.Sequential`` and every index be in range)."""
    for scope, indices in kept.items():
        try:
            container = get_submodule(model, scope)
        except AttributeError:
            raise ValueError(f"no module {scope!r} in {type(model).__name__} to prune") from None
        if type(container) not in (nn.ModuleList, nn.Sequential):
            raise ValueError(f"{scope!r} is a {type(container).__name__}, not a ModuleList / Sequential")
        if not isinstance(indices, (list, tuple)) or not indices or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(container)  # type: ignore[arg-type]
                for i in indices):
            raise ValueError(f"kept indices for {scope!r} must be a non-empty list of ints in "
                             f"[0, {len(container)}), got {indices!r}")  # type: ignore[arg-type]
        blocks = [container[i] for i in indices]  # type: ignore[index]
        # In place (also a stack at the root): the container keeps its object and class, its
        # children are the kept blocks under the names a new ModuleList / Sequential gives them.
        container._modules = OrderedDict((str(j), b) for j, b in enumerate(blocks))
    return model
