"""The public surgeries: analyse -> plan -> rewrite, for DropPath and DropBlock."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch.fx as fx
from torch import nn

from .analysis.residual import ResidualSite, SiteReport, residual_report, stack_depths
from .analysis.skip import skip_blocker
from .analysis.stages import find_conv_stages
from .capture.fx import get_submodule, module_of, require_module
from .capture.inline import batch_dims, is_inline_policy, record_inline_inputs
from .capture.model import ModelCapture, capture_model
from .plan import (
    DropBlockParams,
    DropPathParams,
    Plan,
    PlannedOp,
    ScheduleFn,
    SetRateParams,
    check_rate,
    depth_rates,
    pattern_list,
    scope_selected,
)
from .rewrite.apply import apply_plan, is_patched, strip
from .rewrite.check import PatchCheckError, check_train_forward

__all__ = [
    "plan_stochastic_depth",
    "apply_stochastic_depth",
    "plan_dropblock",
    "apply_dropblock",
    "NoSitesError",
    "StageIndexError",
    "residual_stages",
    "STAGE_NUMBERING",
]

Patterns = Union[None, str, Sequence[str]]
DROP_PATH_MODES = ("row", "batch")
DROPBLOCK_WHERE = ("branch", "skip")
DEPTH_MODES = ("blocks", "sites")


class NoSitesError(ValueError):
    """The model has no place where the requested regularizer can go."""


def _schedule_name(schedule: Union[str, ScheduleFn]) -> str:
    return schedule if isinstance(schedule, str) else getattr(schedule, "__name__", repr(schedule))


def plan_stochastic_depth(
    model: nn.Module,
    rate: float = 0.1,
    schedule: Union[str, ScheduleFn] = "linear",
    mode: str = "row",
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    skip_dropped: bool = False,
    example_inputs: Optional[Any] = None,
    sites: Optional[list[ResidualSite]] = None,
    capture: Optional[ModelCapture] = None,
    batch_dim: Optional[int] = None,
    depth: str = "blocks",
) -> Plan:
    """Plan one DropPath per residual call site, rates by depth (see :func:`apply_stochastic_depth`).

    Sites whose branch already ends in a DropPath / StochasticDepth module get a ``set_rate`` op on
    that module instead of a second regularizer.
    """
    require_module(model)
    rate = check_rate("rate", rate)
    if mode not in DROP_PATH_MODES:
        raise ValueError(f"mode must be one of {DROP_PATH_MODES}, got {mode!r}")
    if depth not in DEPTH_MODES:
        raise ValueError(f"depth must be one of {DEPTH_MODES}, got {depth!r}")
    site_patterns = [p for p in pattern_list("include", include) if ":" in p]
    report: Optional[SiteReport] = None
    if sites is None:
        if capture is None:  # made once here: sites, skip analysis and batch dims all read it
            capture = capture_model(model, example_inputs)
        report = residual_report(capture, force=site_patterns)
    all_sites = sites if sites is not None else report.sites if report is not None else []
    if not all_sites:
        raise NoSitesError(_no_sites_message(model, report))
    site_batch_dims = _site_batch_dims(all_sites, capture, batch_dim, example_inputs)
    if depth == "blocks":
        site_depths, num_depths = stack_depths(model, all_sites)
    else:
        site_depths = [s.depth for s in all_sites]
        num_depths = max(site_depths) + 1
    rates = depth_rates(num_depths, rate, schedule)
    ops: list[PlannedOp] = []
    slots_seen: set[str] = set()
    selected = 0
    fallbacks: list[dict[str, str]] = []
    for site, site_depth in zip(all_sites, site_depths):
        if not scope_selected(site.scope, include, exclude, add=site.add):
            continue
        selected += 1
        p = rates[site_depth]
        skip = False
        if skip_dropped:
            reason = skip_blocker(model, site, mode, capture=capture)
            if reason is None and mode == "row" and site_batch_dims.get(site.index):
                reason = f"samples along dim {site_batch_dims[site.index]}: skipping gathers rows of dim 0"
            skip = reason is None
            if reason is not None:
                fallbacks.append({"scope": site.scope, "add": site.add, "reason": reason})
        if skip and site.existing:
            # The existing slot is neutralised (rate 0) and the skipping op takes over its rate.
            if site.existing not in slots_seen:
                slots_seen.add(site.existing)
                ops.append(PlannedOp(
                    kind="set_rate", scope=site.scope, depth=site_depth, site=site.index, role="branch",
                    params=SetRateParams(module=site.existing, attr=site.existing_attr or "p", p=0.0),
                ))
        if site.existing and not skip:
            if site.existing in slots_seen:
                continue  # one module called by two sites of the same block (Mixer): one rate
            slots_seen.add(site.existing)
            ops.append(PlannedOp(
                kind="set_rate", scope=site.scope, depth=site_depth, site=site.index, role="branch",
                params=SetRateParams(module=site.existing, attr=site.existing_attr or "p", p=p, mode=mode),
            ))
        else:
            ops.append(PlannedOp(
                kind="drop_path", scope=site.scope, anchor=site.branch, user=site.add, role="branch",
                depth=site_depth, site=site.index,
                params=DropPathParams(p=p, mode=mode, trace_policy=site.trace_policy,
                                      trace_example=site.trace_example, skip=skip,
                                      batch_dim=int(site_batch_dims.get(site.index) or 0)),
            ))
    if selected == 0:
        raise NoSitesError(
            f"include={include!r} / exclude={exclude!r} select none of the {len(all_sites)} residual "
            f"sites (scopes such as {all_sites[0].scope!r}); fix the patterns"
        )
    meta: dict[str, Any] = {
        "drop_path": {"rate": rate, "schedule": _schedule_name(schedule), "mode": mode, "depth": depth,
                      "num_depths": num_depths, "forced": [f"{s.scope}:{s.add}" for s in all_sites if s.forced],
                      "include": include, "exclude": exclude, "sites": selected,
                      "existing_slots": sorted(slots_seen), "skip_dropped": skip_dropped,
                      "skip_fallbacks": fallbacks},
    }
    if report is not None and report.skipped:
        meta["untraced"] = [vars(f) for f in report.skipped]
    return Plan(ops=ops, meta=meta)


def _site_batch_dims(
    sites: list[ResidualSite], capture: Optional[ModelCapture], batch_dim: Optional[int],
    example_inputs: Any = None,
) -> dict[int, int]:
    """Site index -> the dimension of its branch that indexes samples: ``batch_dim`` when given,
    else found from the capture of blocks captured on their recorded arguments (else 0)."""
    if batch_dim is not None:
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise TypeError(f"batch_dim must be an int, got {batch_dim!r}")
        return {s.index: batch_dim for s in sites}
    out: dict[int, int] = {}
    by_scope: dict[tuple, list[ResidualSite]] = {}
    for s in sites:
        if capture is not None:
            by_scope.setdefault((s.scope, s.trace_policy), []).append(s)
    # Plain captures hold no example values: their blocks' calls are recorded once, when the
    # example is given (a plain capture of a sequence-first block: nn.TransformerDecoderLayer).
    plain = [scope for scope, policy in by_scope if not is_inline_policy(policy) and "specialized" not in policy]
    calls: dict[str, Any] = {}
    if capture is None:
        return out
    if plain and example_inputs is not None:
        try:
            calls = record_inline_inputs(capture.model, plain, example_inputs)
        except Exception:
            calls = {}
    for (scope, policy), group in by_scope.items():
        if not is_inline_policy(policy) and scope not in calls:
            continue
        found = batch_dims(capture.block(scope, policy), [s.branch for s in group], calls.get(scope))
        out.update({s.index: found.get(s.branch, 0) for s in group})
    return out


def _no_sites_message(model: nn.Module, report: Optional[SiteReport]) -> str:
    why = ""
    if report is not None and report.skipped:
        why = f" ({len(report.skipped)} modules could not be traced: " + ", ".join(
            f"{f.scope or '<root>'}" for f in report.skipped[:5]) + ")"
    msg = (f"no residual sites found in {type(model).__name__}{why}: stochastic depth needs residual "
           "adds (out = x + f(x))")
    closest = report.closest() if report is not None else []
    if closest:
        msg += "; closest candidates and why they were rejected:\n" + "\n".join(
            f"  {r.key} [{r.rule}] {r.reason}" + (" (forceable: include=" + repr(r.key) + ")" if r.forceable else "")
            for r in closest)
        msg += "\nforce one in with include='scope:addnode', or use another regularizer"
    else:
        msg += "; the model has no add of two data values; check residual_report(model) or use another regularizer"
    return msg


def _maybe_copy(model: nn.Module, inplace: bool) -> nn.Module:
    return require_module(model) if inplace else copy.deepcopy(require_module(model))


def apply_stochastic_depth(
    model: nn.Module,
    rate: float = 0.1,
    schedule: Union[str, ScheduleFn] = "linear",
    mode: str = "row",
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    inplace: bool = True,
    skip_dropped: bool = False,
    example_inputs: Optional[Any] = None,
    batch_dim: Optional[int] = None,
    depth: str = "blocks",
) -> nn.Module:
    """Give ``model`` stochastic depth (Huang et al., ECCV 2016): ``out = s + m * f(x) / (1-p)``.

    One :class:`regsurgery.DropPath` is inserted per residual call site found by
    :func:`regsurgery.find_residual_sites`. ``schedule="linear"`` gives the block at depth ``d``
    of ``D`` the rate ``rate * d / (D - 1)`` (the deepest gets ``rate``, as timm does);
    ``"uniform"`` gives every block ``rate``; a callable ``(depth, num_depths, rate) -> p`` any
    other rule. Both residuals of one block share a depth. ``include`` / ``exclude`` filter
    sites by scope pattern (``"layer3.*"``); a pattern with a colon names one add
    (``"blocks.3:add_1"``) and also forces in an add the rules rejected (see
    :func:`regsurgery.residual_report`, ``rejected``); the plan's meta lists forced sites.

    ``depth="blocks"`` (the default) counts depths in stacked blocks the way timm and torchvision
    do: every block of a stack takes a depth, residual or not (an EfficientNet's stride-2 blocks
    too), so ``D`` is the number of blocks (:func:`regsurgery.analysis.residual.stack_depths`).
    On stacks whose blocks are all residual (ResNet, ViT, ConvNeXt, Swin) it equals
    ``depth="sites"``, which counts only blocks that hold a residual site. Loops in one forward
    (``for blk in self.blocks: x = x + blk(x)``) give each block its own depth in both modes.

    Mutation: with ``inplace=True`` (the default) ``model`` itself is patched and returned — its
    class, methods, attributes and ``state_dict`` keys are unchanged; with ``inplace=False`` a deep
    copy is patched and ``model`` is left as it was. Eval-mode outputs are bitwise the original's.
    Existing DropPath / StochasticDepth modules are reused (their rate is set; a warning says so),
    never doubled. :func:`regsurgery.strip` undoes everything.

    ``skip_dropped=True`` makes stochastic depth save compute, as in the paper: each branch becomes
    its own callable; batch mode skips a dropped branch for the whole step, row mode runs the branch
    on the kept samples only (gather, branch, scatter-add). A branch with a cross-sample op
    (train-mode BatchNorm, ...) falls back to masking for that site; a warning and the plan's
    ``meta["drop_path"]["skip_fallbacks"]`` say which and why.

    ``example_inputs`` is only needed for blocks that do not trace symbolically (control flow on
    shapes): they are traced specialized on one forward of it (inferred from the model when
    possible), with run-time guards. It may be a Tensor, a tuple of arguments or a dict of keyword
    arguments (``input_ids``, ``attention_mask``...); blocks that plain tracing cannot capture
    (HuggingFace layers) are captured on the arguments they receive in that forward.

    ``batch_dim``: the dimension of the branch outputs that indexes samples; by default found
    from the capture (``(S, B, D)`` sequence-first layers get 1), else 0.
    """
    model = _maybe_copy(model, inplace)
    capture = capture_model(model, example_inputs)  # once: analysis, planning and rewrite share it
    plan = plan_stochastic_depth(model, rate, schedule, mode, include, exclude,
                                 skip_dropped=skip_dropped, example_inputs=example_inputs,
                                 capture=capture, batch_dim=batch_dim, depth=depth)
    existing = plan.meta["drop_path"]["existing_slots"]
    fallbacks = plan.meta["drop_path"]["skip_fallbacks"]
    if fallbacks:
        warnings.warn(
            f"skip_dropped: {len(fallbacks)} of {plan.meta['drop_path']['sites']} sites fall back to "
            f"masking (e.g. {fallbacks[0]['scope'] or '<root>'}: {fallbacks[0]['reason']})",
            stacklevel=2,
        )
    if existing and not skip_dropped:
        warnings.warn(
            f"{type(model).__name__} already has {len(existing)} DropPath/StochasticDepth modules "
            f"(e.g. {existing[0]!r}): their rates were set instead of inserting new ones",
            stacklevel=2,
        )
    return _apply_checked(model, plan, capture, example_inputs)


def _apply_checked(model: nn.Module, plan: Plan, capture: ModelCapture, example_inputs: Any) -> nn.Module:
    """apply_plan, then warn about what was not captured and run one train-mode forward of the
    example (:func:`regsurgery.rewrite.check.check_train_forward`); a failing patch is undone."""
    untraced = plan.meta.get("untraced") or []
    if untraced:
        warnings.warn(
            f"{len(untraced)} modules of {type(model).__name__} could not be captured and get no "
            "regularizer: " + "; ".join(f"{u['scope'] or '<root>'} ({u['reason'][:100]})" for u in untraced[:3])
            + (" ..." if len(untraced) > 3 else "") + " (see residual_report(...).skipped)",
            stacklevel=3,
        )
    patched_before = is_patched(model)
    apply_plan(model, plan, capture=capture)
    try:
        check_train_forward(model, example_inputs)
    except PatchCheckError:
        if not patched_before:
            strip(model)
        raise
    return model


# ----------------------------------------------------------------------------- DropBlock


def _is_conv_node(node: fx.Node, block: nn.Module, conv_type: type = nn.Conv2d) -> bool:
    m = module_of(node, block)
    if m is None:
        return False
    if isinstance(m, conv_type):
        return True
    # A conv+norm(+act) composite (timm ConvNormAct, torchvision Conv2dNormActivation).
    return any(isinstance(c, conv_type) for c in m.modules()) and not any(
        isinstance(c, (nn.Linear, nn.MultiheadAttention)) for c in m.modules()
    ) and sum(isinstance(c, conv_type) for c in m.modules()) == 1


def _after_conv_anchor(node: fx.Node, block: nn.Module) -> fx.Node:
    """A conv's output, or the norm right after it when the conv feeds only that norm."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        m = module_of(users[0], block)
        if m is not None and isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            return users[0]
    return node


def _branch_conv_anchors(block: nn.Module, capture: ModelCapture, site: ResidualSite, dims: int = 2) -> list[str]:
    graph = capture.block(site.scope, site.trace_policy).graph
    body = set(site.branch_nodes)
    anchors = []
    for node in graph.nodes:
        if node.name in body and _is_conv_node(node, block, nn.Conv3d if dims == 3 else nn.Conv2d):
            anchors.append(_after_conv_anchor(node, block).name)
    return list(dict.fromkeys(anchors))


#: How ``stages`` are numbered, in words (errors, the CLI's help and inspect say the same).
STAGE_NUMBERING = ("stage k is the k-th group of residual blocks at one resolution, counted from the "
                   "input: ResNet layer1..layer4 are 1..4, a stem without residual blocks is not counted, "
                   "as the DropBlock paper's groups")


class StageIndexError(ValueError):
    """A ``stages`` entry that is 0, not an integer, or beyond the model's residual stages."""


def residual_stages(found: Sequence[Any]) -> list[Any]:
    """The conv stages (of :func:`regsurgery.find_conv_stages`) that hold a residual site, in order:
    ``stages=(k,)`` of :func:`plan_dropblock` is the k-th of them."""
    return [s for s in found if getattr(s, "sites", None)]


def plan_dropblock(
    model: nn.Module,
    rate: float = 0.1,
    block_size: int = 7,
    stages: Sequence[int] = (-2, -1),
    where: Sequence[str] = ("branch", "skip"),
    example_inputs: Optional[Any] = None,
    per_channel: bool = False,
    *,
    capture: Optional[ModelCapture] = None,
) -> Plan:
    """Plan DropBlock (Ghiasi et al., NeurIPS 2018) in the chosen conv stages.

    In every residual site of the chosen stages: after each conv layer of the branch (after its
    norm when the conv feeds one) for ``"branch"``, and on the shortcut operand of the add for
    ``"skip"`` — the placement the paper found best. ``stages`` are 1-based *residual stage*
    numbers (:func:`residual_stages`: the conv stages that hold residual blocks, so ResNet's
    layer3/layer4 are ``(3, 4)``, the paper's groups) or negative ones counted from the last. The block
    size is clipped per site to the stage's map size.
    """
    require_module(model)
    rate = check_rate("rate", rate)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    where = (where,) if isinstance(where, str) else tuple(where)
    bad = [w for w in where if w not in DROPBLOCK_WHERE]
    if bad or not where:
        raise ValueError(f"where must be a non-empty subset of {DROPBLOCK_WHERE}, got {where!r}")
    capture = capture if capture is not None else capture_model(model, example_inputs)
    found = find_conv_stages(model, example_inputs, sites=residual_report(capture).sites)
    if not found:
        raise NoSitesError(
            f"{type(model).__name__} has no conv stages (NCHW or NCDHW feature maps) for DropBlock"
        )
    residual = residual_stages(found)
    if not residual:
        raise NoSitesError(
            f"the chosen stages {tuple(stages)} of {type(model).__name__} hold no residual site with an NCHW "
            "feature map (the model has no residual stage); check find_conv_stages(model)"
        )
    chosen = []
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int) or s == 0 or not -len(residual) <= s <= len(residual):
            raise StageIndexError(
                f"stages must hold 1-based stage numbers or negative ones from the last, in "
                f"[-{len(residual)}, {len(residual)}] without 0 ({STAGE_NUMBERING}; the model has "
                f"{len(residual)} stages), got {s!r}"
            )
        chosen.append(residual[s - 1] if s > 0 else residual[s])
    ops: list[PlannedOp] = []
    skipped_stages: list[dict[str, Any]] = []
    for stage in chosen:
        # "mixed": NCHW blocks with channels-last parts inside (ConvNeXt): the convs and the
        # block-level skip are NCHW. Channels-last stages (Swin) have no NCHW map to drop blocks in.
        if getattr(stage, "layout", "NCHW") not in ("NCHW", "mixed"):
            skipped_stages.append({"index": stage.index, "layout": stage.layout})
            continue
        dims = getattr(stage, "dims", 2)
        bs = max(1, min(block_size, *stage.size))  # clipped to the map in every spatial dim
        for site in stage.sites:
            block = get_submodule(model, site.scope)
            params = DropBlockParams(p=rate, block_size=bs, per_channel=per_channel, dims=dims,
                                     trace_policy=site.trace_policy, trace_example=site.trace_example)
            places: list[tuple[str, Optional[str], str]] = []
            if "branch" in where:
                places += [(anchor, None, "conv") for anchor in _branch_conv_anchors(block, capture, site, dims)]
            if "skip" in where:
                places.append((site.shortcut, site.add, "skip"))
            for anchor, user, role in places:
                ops.append(PlannedOp(kind="drop_block", scope=site.scope, anchor=anchor, user=user,
                                     role=role, depth=site.depth, site=site.index,
                                     params=dataclasses.replace(params)))
    if not ops:
        raise NoSitesError(
            f"the chosen stages {tuple(stages)} of {type(model).__name__} hold no residual site with "
            f"an NCHW feature map (skipped channels-last stages: {skipped_stages}); check "
            "find_conv_stages(model)"
        )
    meta = {"drop_block": {"rate": rate, "block_size": block_size, "stages": list(stages),
                           "where": list(where), "per_channel": per_channel,
                           "stage_index": [s.index for s in chosen], "skipped_stages": skipped_stages}}
    return Plan(ops=ops, meta=meta)


def apply_dropblock(
    model: nn.Module,
    rate: float = 0.1,
    block_size: int = 7,
    stages: Sequence[int] = (-2, -1),
    where: Sequence[str] = ("branch", "skip"),
    example_inputs: Optional[Any] = None,
    *,
    per_channel: bool = False,
    inplace: bool = True,
) -> nn.Module:
    """Insert :class:`regsurgery.DropBlock2d` into the last conv stages of ``model``
    (:class:`regsurgery.DropBlock3d` for a 3-D conv net on ``(N, C, D, H, W)`` volumes, where
    stages are found by reduction in every spatial dim; 1-D maps are refused).

    The defaults follow the paper's best ResNet-50 setting: block size 7, groups 3 and 4 (the last
    two stages), after the conv layers of the residual branches and on the skip connections.
    Ramp the rate during training with :class:`regsurgery.RateSchedule`. Same guarantees as
    :func:`apply_stochastic_depth` (class, methods, ``state_dict`` and eval output unchanged;
    ``inplace`` chooses mutation or a patched copy); the two compose in either order, and
    :func:`regsurgery.strip` removes both.
    """
    model = _maybe_copy(model, inplace)
    capture = capture_model(model, example_inputs)
    plan = plan_dropblock(model, rate, block_size, stages, where, example_inputs, per_channel,
                          capture=capture)
    return apply_plan(model, plan, capture=capture)
