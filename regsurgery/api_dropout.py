"""Dropout on hidden layers (Srivastava et al., 2014): analyse -> plan -> rewrite."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Union

from torch import nn

from .analysis.mlp import MlpSite, find_head_site, find_mlp_sites
from .api import NoSitesError, Patterns, _maybe_copy
from .capture.fx import iter_block_graphs, require_module
from .plan import DropoutParams, Plan, PlannedOp, SetRateParams, check_rate, scope_selected
from .rewrite.apply import apply_plan

__all__ = ["plan_dropout", "apply_dropout", "DROPOUT_WHERE"]

DROPOUT_WHERE = ("mlp", "head")


def _check_where(where: Union[str, Sequence[str]]) -> tuple[str, ...]:
    where = (where,) if isinstance(where, str) else tuple(where)
    bad = [w for w in where if w not in DROPOUT_WHERE]
    if bad or not where:
        raise ValueError(f"where must be a non-empty subset of {DROPOUT_WHERE}, got {where!r}")
    return where


def plan_dropout(
    model: nn.Module,
    rate: float = 0.1,
    where: Union[str, Sequence[str]] = ("mlp",),
    include: Patterns = None,
    exclude: Patterns = None,
) -> Plan:
    """Plan element-wise Dropout on hidden MLP activations (see :func:`apply_dropout`).

    A dropout module already at a site (timm ``Mlp.drop1``, often built with ``p=0``) gets a
    ``set_rate`` op instead of a second dropout.
    """
    require_module(model)
    rate = check_rate("rate", rate)
    where = _check_where(where)
    blocks = list(iter_block_graphs(model, chains=True))
    found: list[MlpSite] = find_mlp_sites(blocks) if "mlp" in where else []
    if "head" in where:
        head = find_head_site(blocks)
        # A classifier MLP head's hidden activation is both: one dropout, not two.
        if head is not None and not any(s.scope == head.scope and s.dense_out == head.dense_out for s in found):
            found.append(head)
    if not found:
        raise NoSitesError(
            f"no place for dropout ({', '.join(where)}) in {type(model).__name__}: dropout goes on "
            "hidden activations of MLPs (dense -> activation -> dense) or on the input of a final "
            "linear classifier; none was found in the traced blocks"
        )
    ops: list[PlannedOp] = []
    slots: list[str] = []
    selected = 0
    for site in found:
        if not scope_selected(site.scope, include, exclude):
            continue
        selected += 1
        if site.existing:
            if site.existing in slots:
                continue
            slots.append(site.existing)
            ops.append(PlannedOp(kind="set_rate", scope=site.scope, role=site.role, site=site.index,
                                 params=SetRateParams(module=site.existing, attr="p", p=rate)))
        else:
            ops.append(PlannedOp(kind="dropout", scope=site.scope, anchor=site.anchor, user=site.user,
                                 role=site.role, site=site.index,
                                 params=DropoutParams(p=rate, trace_policy=site.policy)))
    if selected == 0:
        raise NoSitesError(
            f"include={include!r} / exclude={exclude!r} select none of the {len(found)} dropout sites "
            f"(scopes such as {found[0].scope!r}); fix the patterns"
        )
    meta: dict[str, Any] = {"dropout": {"rate": rate, "where": list(where), "include": include,
                                        "exclude": exclude, "sites": selected, "existing_slots": slots}}
    return Plan(ops=ops, meta=meta)


def apply_dropout(
    model: nn.Module,
    rate: float = 0.1,
    where: Union[str, Sequence[str]] = ("mlp",),
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    inplace: bool = True,
) -> nn.Module:
    """Give ``model`` Dropout (Srivastava et al., JMLR 2014) on its hidden fully-connected outputs.

    ``out = x * m / (1 - p)``, one ``m ~ Bernoulli(1 - p)`` per element, identity at inference.
    ``where=("mlp",)`` puts one :class:`regsurgery.ops.Dropout` per call site after every hidden
    MLP activation found from the dataflow (linear or 1x1 conv -> activation -> linear or 1x1
    conv: transformer MLPs, classifier MLP heads); ``"head"`` puts one on the input of the final
    classifier (timm's ``drop_rate``). Never on the network input or on the logits.

    Existing dropout modules at those places are reused (their rate is set, a warning says so),
    never doubled; :func:`regsurgery.strip` restores them. Same guarantees as
    :func:`regsurgery.apply_stochastic_depth`: same object (or a patched copy with
    ``inplace=False``), same class and ``state_dict`` keys, eval output bitwise the original's.
    """
    plan = plan_dropout(model, rate, where, include, exclude)
    model = _maybe_copy(model, inplace)
    existing = plan.meta["dropout"]["existing_slots"]
    if existing:
        warnings.warn(
            f"{type(model).__name__} already has {len(existing)} dropout modules at hidden layers "
            f"(e.g. {existing[0]!r}): their rates were set instead of inserting new ones",
            stacklevel=2,
        )
    return apply_plan(model, plan)
