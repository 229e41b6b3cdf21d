"""The Plan: which regularizer goes where, as plain data.

A Plan is what ``inspect`` prints, what ``patch`` stores in a checkpoint and what ``load``
re-applies. It never holds modules or tensors, only names: the scope of the block, the fx node
(in the block's train-mode graph) whose value the op is applied to, and the op's parameters.
Rewriting follows a Plan and never re-decides anything.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Union

from .ops import check_rate as _check_rate

__all__ = [
    "OpParams",
    "DropPathParams",
    "DropBlockParams",
    "SetRateParams",
    "DropoutParams",
    "PARAMS_OF_KIND",
    "PlannedOp",
    "Plan",
    "PLAN_FORMAT",
    "depth_rates",
    "scope_selected",
    "check_rate",
]

PLAN_FORMAT = "regsurgery.plan/1"

#: A schedule maps (depth, number of depths, rate) to the rate of that depth.
ScheduleFn = Callable[[int, int, float], float]


def check_rate(name: str, value: Any) -> float:
    """A rate in [0, 1]; see :func:`regsurgery.ops.check_rate` (the one place rates are checked)."""
    return _check_rate(name, value)


@dataclass
class OpParams:
    """Arguments of one planned op; a dataclass per op kind, plain JSON on disk.

    ``get`` / ``[]`` / ``in`` read fields by name, for code written against the dict params of
    plans before typed ops; new code reads attributes.
    """

    p: float = 0.0

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default) if name in self._names() else default

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names() and getattr(self, name) is not None

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, kind: str, data: Mapping[str, Any]) -> OpParams:
        if not isinstance(data, Mapping):
            raise ValueError(f"params of a {kind} op must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - cls._names())
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} in the params of a {kind} op; known: {sorted(cls._names())}"
            )
        return cls(**data)


@dataclass
class DropPathParams(OpParams):
    """``drop_path``: a DropPath (or skip-compute SkipDropPath) on a residual branch."""

    mode: str = "row"
    scale_by_keep: bool = True
    skip: bool = False
    batch_dim: int = 0  # the dimension samples are stacked along ((S, B, D) layers: 1)
    trace_policy: Optional[str] = None
    trace_example: Optional[dict[str, Any]] = None


@dataclass
class DropBlockParams(OpParams):
    """``drop_block``: a DropBlock2d (``dims=2``) or DropBlock3d after a conv or on a skip."""

    block_size: int = 7
    per_channel: bool = False
    dims: int = 2
    trace_policy: Optional[str] = None
    trace_example: Optional[dict[str, Any]] = None


@dataclass
class SetRateParams(OpParams):
    """``set_rate``: the rate ``attr`` of an existing regularizer slot ``module`` (qualified name)."""

    module: str = ""
    attr: str = "p"
    mode: Optional[str] = None


@dataclass
class DropoutParams(OpParams):
    """``dropout``: element-wise Dropout on a hidden activation or on the classifier's input."""

    trace_policy: Optional[str] = None
    trace_example: Optional[dict[str, Any]] = None


#: The params dataclass of each op kind.
PARAMS_OF_KIND: dict[str, type[OpParams]] = {
    "drop_path": DropPathParams,
    "drop_block": DropBlockParams,
    "dropout": DropoutParams,
    "set_rate": SetRateParams,
}


@dataclass
class PlannedOp:
    """One regularizer to insert (or one existing slot whose rate to set).

    kind:    ``"drop_path"``, ``"drop_block"``, ``"dropout"`` or ``"set_rate"`` (an existing slot).
    scope:   qualified name of the module whose forward is rewritten (``""`` is the root).
    anchor:  fx node name (train-mode block graph) whose value the op transforms.
    user:    if set, only this node's use of ``anchor`` is rewired (e.g. the residual add);
             otherwise every use is.
    role:    ``"branch"``, ``"skip"`` or ``"conv"`` (after a conv layer of a branch); for
             ``"dropout"``: ``"hidden"`` (an MLP activation) or ``"head"`` (classifier input).
    params:  the op's arguments, a dataclass of the kind (:data:`PARAMS_OF_KIND`); a dict is
             converted (unknown fields are a ValueError naming them).
    """

    kind: str
    scope: str
    anchor: str = ""
    user: Optional[str] = None
    role: str = "branch"
    depth: int = 0
    site: Optional[int] = None
    params: Any = None

    def __post_init__(self) -> None:
        if self.kind not in PARAMS_OF_KIND:
            raise ValueError(f"PlannedOp.kind must be one of {tuple(PARAMS_OF_KIND)}, got {self.kind!r}")
        cls = PARAMS_OF_KIND[self.kind]
        if self.params is None:
            self.params = cls()
        elif isinstance(self.params, Mapping):
            self.params = cls.from_dict(self.kind, self.params)
        elif type(self.params) is not cls:
            raise TypeError(
                f"params of a {self.kind} op must be {cls.__name__} or a dict, got {type(self.params).__name__}"
            )

    @property
    def key(self) -> tuple:
        """Two ops with the same key are the same insertion (re-applying replaces, never doubles)."""
        if isinstance(self.params, SetRateParams):
            return (self.kind, self.params.module)
        return (self.kind, self.scope, self.anchor, self.user)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"] = {k: v for k, v in asdict(self.params).items() if v is not None}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlannedOp:
        if not isinstance(data, Mapping):
            raise ValueError(f"a plan op must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} in a plan op; known: {sorted(known)}")
        return cls(**data)


@dataclass
class Plan:
    """An ordered list of planned ops plus free-form metadata (what produced it)."""

    ops: list[PlannedOp] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "meta": dict(self.meta), "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a regsurgery plan (expected format {PLAN_FORMAT!r}, got {found!r})")
        return cls(ops=[PlannedOp.from_dict(op) for op in data.get("ops", [])], meta=dict(data.get("meta", {})))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def __add__(self, other: Plan) -> Plan:
        merged = {op.key: op for op in self.ops}
        merged.update({op.key: op for op in other.ops})
        return Plan(ops=list(merged.values()), meta={**self.meta, **other.meta})

    def rates(self) -> dict[str, float]:
        """Planned rate per op, keyed ``kind@scope:anchor`` (for printing)."""
        return {f"{op.kind}@{op.scope}:{op.anchor or op.params.get('module')}": op.params.p
                for op in self.ops}


def depth_rates(
    num_depths: int, rate: float, schedule: Union[str, ScheduleFn] = "linear"
) -> list[float]:
    """Rate of each depth ``0 .. num_depths-1``.

    ``"linear"``: ``rate * d / (num_depths - 1)``, the first block 0 and the deepest ``rate`` (timm's
    ``linspace(0, rate, depth)``; the stochastic-depth paper's linear decay rule, Huang et al. 2016).
    ``"uniform"``: ``rate`` everywhere. A callable gets ``(depth, num_depths, rate)`` and returns
    the rate of that depth (checked to lie in [0, 1]).
    """
    rate = check_rate("rate", rate)
    if num_depths <= 0:
        return []
    if schedule == "linear":
        if num_depths == 1:
            return [rate]
        return [rate * d / (num_depths - 1) for d in range(num_depths)]
    if schedule == "uniform":
        return [rate] * num_depths
    if callable(schedule):
        return [check_rate(f"schedule({d}, {num_depths}, {rate})", schedule(d, num_depths, rate))
                for d in range(num_depths)]
    raise ValueError(f"schedule must be 'linear', 'uniform' or a callable, got {schedule!r}")


def _patterns(name: str, value: Union[None, str, Sequence[str]]) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a scope pattern or a list of them, got {value!r}")
    return items


def pattern_list(name: str, value: Union[None, str, Sequence[str]]) -> list[str]:
    """Scope patterns as a list (``[]`` for None); anything but strings is a ValueError naming ``name``."""
    return _patterns(name, value) or []


def scope_selected(
    scope: str,
    include: Union[None, str, Sequence[str]] = None,
    exclude: Union[None, str, Sequence[str]] = None,
    *,
    add: Optional[str] = None,
) -> bool:
    """Does ``scope`` pass the filters? Patterns are shell-style (``layer3.*``, ``blocks.1?``);
    a pattern also selects everything below a scope it names (``layer3`` selects ``layer3.0``).
    A pattern with a colon names one add, ``"scope:addnode"`` (the key ``residual_report`` shows
    for sites and rejected adds): it matches only when ``add`` is given."""

    def hit(patterns: list[str]) -> bool:
        return any(
            (add is not None and fnmatch.fnmatchcase(f"{scope}:{add}", p)) if ":" in p
            else fnmatch.fnmatchcase(scope, p) or fnmatch.fnmatchcase(scope, p + ".*")
            for p in patterns
        )

    inc = _patterns("include", include)
    exc = _patterns("exclude", exclude)
    if inc is not None and not hit(inc):
        return False
    return not (exc is not None and hit(exc))
