"""Apply a Plan to a model in place, and take it out again.

Patching is block-local and keeps the user's model object:

* the block (the module whose forward performs the add) is traced alone, in train mode;
* each planned op becomes a ``call_module`` node on a regularizer module registered under the
  block's child ``ModuleDict`` named ``regsurgery`` (``layer3.2.regsurgery.dp0``): a leaf, so
  train/eval is decided at run time, and one module per call site, not per reused module;
* the graph's code becomes the block's *train-mode* forward, installed as an instance attribute
  ``forward``. In eval mode the instance forward calls the class's own forward, so eval outputs
  are bitwise those of the original and exports see the original graph.

The model keeps its class, methods and attributes; ``state_dict()`` keeps its keys (the
regularizers hold no parameters or buffers). :func:`strip` deletes the instance forwards, the
``regsurgery`` children and restores every existing slot rate the plan changed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from .. import ops
from ..capture.fx import CONTAINER, example_from_spec, get_submodule, trace_block
from ..capture.inline import (
    call_adapter,
    inline_example,
    inline_leaves,
    is_inline_policy,
    trace_inline,
)
from ..capture.model import ModelCapture, copy_graph
from ..plan import (
    DropBlockParams,
    DropoutParams,
    DropPathParams,
    Plan,
    PlannedOp,
    SetRateParams,
    check_rate,
)
from .codegen import compile_graph
from .forwards import new_forward, set_template
from .layerdrop import has_layerdrop, set_inner_forward, strip_layerdrop
from .skip import bind_skip_module, insert_skip, make_skip_module

__all__ = ["apply_plan", "strip", "is_patched", "inserted_modules", "patched_scopes", "PlanMismatchError"]

_STATE = "_regsurgery_patch"  # per-block patch state (instance attribute)
_SLOTS = "_regsurgery_slots"  # on the root: original rates of existing slots we changed
_SHORT = {"drop_path": "dp", "drop_block": "db", "dropout": "do"}  # child names: dp0, db0, do0


class PlanMismatchError(ValueError):
    """The plan names a scope or graph node the model does not have (another architecture?)."""


@dataclass
class _PatchState:
    ops: list[PlannedOp]
    modules: dict[tuple, nn.Module]
    train_forward: Optional[Callable[..., Any]]
    source: str = field(repr=False, default="")
    scope: str = ""

    # The generated train forward is code made by exec: it does not pickle. A pickled (or
    # spawned) patched model carries the ops and modules, and the block re-traces and regenerates
    # the same code on its first train-mode call (see _train_forward_of).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "train_forward": None, "source": ""}

    def __deepcopy__(self, memo: dict[int, Any]) -> _PatchState:
        # The generated function takes the block as an argument: the copy can share it.
        return _PatchState(ops=copy.deepcopy(self.ops, memo), modules=copy.deepcopy(self.modules, memo),
                           train_forward=self.train_forward, source=self.source, scope=self.scope)


def _train_forward_of(block: nn.Module) -> Callable[..., Any]:
    state: _PatchState = block.__dict__[_STATE]
    fn = state.train_forward
    if fn is None:  # unpickled: regenerate the rewritten graph's code from the stored ops
        _rebuild(block, state)
        fn = state.train_forward
    assert fn is not None
    return fn


def _patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # Train mode runs the rewritten graph; eval mode is the untouched class forward, so eval
    # outputs, exports and compile graphs are exactly the original's.
    if self.training:
        return _train_forward_of(self)(self, *args, **kwargs)
    if isinstance(self, nn.Sequential):
        return _sequential_forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


set_template(_patched_forward)


def _sequential_forward(self: nn.Sequential, x: Any) -> Any:
    # nn.Sequential.forward calls every child, and the inserted container is one: call the
    # original children in order (the same calls Sequential.forward makes, so bitwise equal).
    for name, child in self._modules.items():
        if name != CONTAINER:
            x = child(x)
    return x


def _own_patched_forward() -> Callable[..., Any]:
    # One code object per patched block: dynamo caches frames per code object, and a graph break
    # inside a block (skip mode) compiles this frame once per block, past recompile_limit (8).
    # The function is importable (regsurgery.rewrite.forwards), so a partial of it pickles.
    return new_forward()


def _make_module(op: PlannedOp) -> nn.Module:
    params = op.params
    p = check_rate(f"p of {op.kind} at {op.scope or '<root>'}:{op.anchor}", params.p)
    if isinstance(params, DropPathParams):
        if params.skip:
            return make_skip_module(op)
        return ops.DropPath(p, mode=params.mode, scale_by_keep=params.scale_by_keep,
                            batch_dim=int(params.batch_dim))
    if isinstance(params, DropBlockParams):
        cls = ops.DropBlock3d if params.dims == 3 else ops.DropBlock2d
        return cls(p, block_size=int(params.block_size), per_channel=bool(params.per_channel))
    if isinstance(params, DropoutParams):
        return ops.Dropout(p)
    raise ValueError(f"cannot build a module for op kind {op.kind!r}")


def _is_skip(op: PlannedOp) -> bool:
    return isinstance(op.params, DropPathParams) and op.params.skip


def _compile_forward(graph: fx.Graph, scope: str) -> tuple[Callable[..., Any], str]:
    return compile_graph(graph, f"train forward of {scope or 'root'}")


def _insert_ops(graph: fx.Graph, scope: str, ops: list[tuple[str, PlannedOp]]) -> None:
    """Insert one call_module per op, rewiring the anchor's uses (all, or one user's)."""
    nodes = {n.name: n for n in graph.nodes}

    def lookup(name: str, what: str, op: PlannedOp) -> fx.Node:
        if name not in nodes:
            raise PlanMismatchError(
                f"plan op {op.kind} for scope {scope or '<root>'!r} names {what} node {name!r}, "
                "which this model's graph does not have: the plan was made for another "
                "architecture or version; re-plan it on this model"
            )
        return nodes[name]

    current: dict[str, fx.Node] = {}  # anchor name -> node now carrying its value for all users
    per_user: dict[tuple[str, str], fx.Node] = {}
    # All-uses ops first, so a later user-specific op sees the already transformed value; skip
    # ops last: they replace the add, so other ops on that add (DropBlock on the shortcut) go first.
    ordered = sorted(ops, key=lambda item: (item[1].user is not None, _is_skip(item[1])))
    for target, op in ordered:
        anchor = lookup(op.anchor, "anchor", op)
        if _is_skip(op):
            # The branch becomes its own callable run only for kept samples (issue: skip mode).
            insert_skip(graph, target, op, anchor=anchor, user=lookup(op.user or "", "user", op))
            continue
        if op.user is None:
            value = current.get(op.anchor, anchor)
            insert_at = graph.inserting_after(value)
            if value.op == "placeholder":
                first_body = next(n for n in graph.nodes if n.op != "placeholder")
                insert_at = graph.inserting_before(first_body)
            with insert_at:
                new = graph.call_module(target, (value,))
            value.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)  # type: ignore[misc]
            current[op.anchor] = new
        else:
            user = lookup(op.user, "user", op)
            value = per_user.get((op.anchor, op.user), current.get(op.anchor, anchor))
            if value not in user.all_input_nodes:
                raise PlanMismatchError(
                    f"plan op {op.kind} for scope {scope or '<root>'!r}: node {op.user!r} does not "
                    f"read {op.anchor!r}; re-plan it on this model"
                )
            with graph.inserting_before(user):
                new = graph.call_module(target, (value,))
            user.replace_input_with(value, new)
            per_user[(op.anchor, op.user)] = new
    graph.lint()


def add_into_dropped(
    a: torch.Tensor, b: torch.Tensor, branch_operand: int, branch: torch.Tensor
) -> torch.Tensor:
    """``a + b`` where operand ``branch_operand`` is a DropPath output and ``branch`` its input.

    fx records ``x += shortcut`` (timm's ResNet blocks) as an out-of-place add, so a rewritten
    block would allocate one more feature map per residual than the original. When DropPath
    drew a mask its output is a fresh product that nothing else reads and whose autograd node
    saved only its inputs: adding into it in place is safe and gives the same values (an add is
    commutative, bitwise). When it returned its input unchanged (rate 0, eval) or the operands
    differ in dtype or shape (promotion, broadcasting), this is the plain add.
    """
    out, other = (a, b) if branch_operand == 0 else (b, a)
    if (
        out is not branch
        and isinstance(other, torch.Tensor)
        # Same dtype and shape (no promotion, no broadcast); plain metadata compiles without
        # a graph break, where torch.result_type would not.
        and out.dtype == other.dtype
        and out.shape == other.shape
    ):
        return out.add_(other)
    return a + b


# Out-of-place adds only: ``operator.iadd`` / ``add_`` write into their first operand, which may
# be the shortcut, and must keep doing so.
_PLAIN_ADD_FUNCTIONS = {operator.add, torch.add}


def _add_into_drop_path_outputs(graph: fx.Graph, drop_path_targets: set[str]) -> None:
    """Let residual adds write into the fresh output of the DropPath before them (masking mode)."""
    for node in list(graph.nodes):
        plain = (node.op == "call_function" and node.target in _PLAIN_ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target == "add")
        if not plain or len(node.args) != 2 or node.kwargs:
            continue
        for pos, arg in enumerate(node.args):
            if (isinstance(arg, fx.Node) and arg.op == "call_module" and arg.target in drop_path_targets
                    and len(arg.users) == 1 and arg.args and isinstance(arg.args[0], fx.Node)):
                node.op, node.target = "call_function", add_into_dropped
                node.args = (*node.args, pos, arg.args[0])
                break


def _root_slots(model: nn.Module) -> dict[str, tuple[str, Any]]:
    slots = model.__dict__.get(_SLOTS)
    if slots is None:
        slots = {}
        model.__dict__[_SLOTS] = slots
    return slots


def _set_slot_rate(model: nn.Module, op: PlannedOp) -> None:
    params = op.params
    assert isinstance(params, SetRateParams)
    name = params.module
    attr = params.attr
    try:
        module = get_submodule(model, name)
    except AttributeError:
        raise PlanMismatchError(
            f"plan sets the rate of {name!r}, which this model does not have; re-plan it on this model"
        ) from None
    if not hasattr(module, attr):
        raise PlanMismatchError(f"module {name!r} ({type(module).__name__}) has no rate attribute {attr!r}")
    p = check_rate(f"p of the existing slot {name}", params.p)
    _root_slots(model).setdefault(name, (attr, getattr(module, attr)))
    setattr(module, attr, p)
    if params.mode is not None and hasattr(module, "mode") and isinstance(module.mode, str):
        _root_slots(model).setdefault(name + "#mode", ("mode", module.mode))
        module.mode = params.mode  # type: ignore[assignment]


def _prepare_block(
    model: nn.Module, scope: str, new_ops: list[PlannedOp], capture: Optional[ModelCapture] = None
) -> tuple[nn.Module, _PatchState]:
    """Trace a block and build its new patch state (nothing is installed yet)."""
    try:
        block = get_submodule(model, scope)
    except AttributeError:
        raise PlanMismatchError(
            f"plan names scope {scope!r}, which this model does not have; re-plan it on this model"
        ) from None
    old: Optional[_PatchState] = block.__dict__.get(_STATE)
    merged = {op.key: op for op in (old.ops if old else [])}
    merged.update({op.key: op for op in new_ops})
    ops = list(merged.values())
    modules: dict[tuple, nn.Module] = {}
    for op in ops:
        module = old.modules.get(op.key) if old else None
        if module is not None:
            module.p = check_rate(f"p of {op.kind} at {scope or '<root>'}:{op.anchor}", op.params.p)  # type: ignore[assignment]
        else:
            module = _make_module(op)
        modules[op.key] = module
    state = _PatchState(ops=ops, modules=modules, train_forward=None, scope=scope)
    graph = None
    if capture is not None and old is None and capture.model is model:
        # The block as analysed, copied: the capture is shared and must not change.
        policy = getattr(ops[0].params, "trace_policy", None) if ops else None
        graph = copy_graph(capture.block(scope, policy).graph)
    _rebuild(block, state, graph)
    return block, state


def _named_ops(ops: list[PlannedOp]) -> list[tuple[str, PlannedOp]]:
    """The call_module target of each op (``regsurgery.dp0``...), as :func:`_install` names them."""
    named: list[tuple[str, PlannedOp]] = []
    counts = {kind: 0 for kind in _SHORT}
    for op in ops:
        named.append((f"{CONTAINER}.{_SHORT[op.kind]}{counts[op.kind]}", op))
        counts[op.kind] += 1
    return named


def _rebuild(block: nn.Module, state: _PatchState, graph: Optional[fx.Graph] = None) -> None:
    """Insert ``state``'s ops into ``graph`` (the block's captured graph; traced again from its class
    forward when None) and compile: ``state.train_forward``. Deterministic (same ops, same trace
    policy and example): a block unpickled in another process gets the code it had."""
    ops, scope, named = state.ops, state.scope, _named_ops(state.ops)
    policy = getattr(ops[0].params, "trace_policy", None) if ops else None
    spec = getattr(ops[0].params, "trace_example", None) if ops else None
    if graph is None and is_inline_policy(policy):  # captured on its recorded arguments
        args, kwargs = inline_example(spec or {}, block)
        graph = trace_inline(block, scope, args, kwargs,
                             leaves=tuple(inline_leaves(policy or "")), spec=spec).graph
    elif graph is None:  # a plan from a file, a block patched before, or an unpickled one
        graph = trace_block(block, scope, policy=policy,
                            example=example_from_spec(spec, block) if spec else None).graph
    _insert_ops(graph, scope, named)
    _add_into_drop_path_outputs(graph, {
        target for target, op in named if op.kind == "drop_path" and not _is_skip(op)})
    train_forward, state.source = _compile_forward(graph, scope)
    if is_inline_policy(policy):
        train_forward = call_adapter(block, spec or {}, train_forward, scope)
    state.train_forward = train_forward
    for op in ops:
        if _is_skip(op):
            bind_skip_module(state.modules[op.key], block, graph, op)


def _install(block: nn.Module, state: _PatchState) -> None:
    container = nn.ModuleDict()
    counts = {"drop_path": 0, "drop_block": 0, "dropout": 0}
    for op in state.ops:
        short = _SHORT[op.kind]
        container[f"{short}{counts[op.kind]}"] = state.modules[op.key]
        counts[op.kind] += 1
    container.train(block.training)
    if CONTAINER in block._modules or hasattr(type(block), CONTAINER):
        if block.__dict__.get(_STATE) is None:
            raise ValueError(
                f"{type(block).__name__} already has an attribute {CONTAINER!r}; regsurgery cannot patch it"
            )
    block._modules[CONTAINER] = container
    block.__dict__[_STATE] = state
    # A partial of an importable function (not a bound method): it pickles, and deepcopy maps the
    # block to its copy.
    forward = functools.partial(_own_patched_forward(), block)
    if has_layerdrop(block):
        set_inner_forward(block, forward)  # LayerDrop stays outermost
    else:
        block.__dict__["forward"] = forward


def apply_plan(model: nn.Module, plan: Plan, *, capture: Optional[ModelCapture] = None) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it.

    Every block is traced and rewritten before anything is installed, so a plan that does not fit
    the model (:class:`PlanMismatchError`) leaves the model untouched. Applying a plan to an
    already patched model merges: an op at the same place replaces the old one (its module object
    is kept, so schedules holding it stay valid), new ops are added.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a regsurgery.Plan, got {type(plan).__name__}")
    by_scope: dict[str, list[PlannedOp]] = {}
    slot_ops: list[PlannedOp] = []
    for op in plan.ops:
        if op.kind == "set_rate":
            slot_ops.append(op)
        else:
            by_scope.setdefault(op.scope, []).append(op)
    prepared = [_prepare_block(model, scope, ops, capture) for scope, ops in by_scope.items()]
    for op in slot_ops:  # validate before mutating
        get_submodule(model, op.params.module) if op.params.module else None
    for block, state in prepared:
        _install(block, state)
    for op in slot_ops:
        _set_slot_rate(model, op)
    return model


def strip(model: nn.Module) -> nn.Module:
    """Remove everything regsurgery inserted, in place; return the model.

    Afterwards the model has its original forwards, submodules and existing-slot rates: it
    computes exactly what it did before patching, with the same ``state_dict``.
    """
    strip_layerdrop(model)
    for module in model.modules():
        if module.__dict__.pop(_STATE, None) is not None:
            module.__dict__.pop("forward", None)
            module._modules.pop(CONTAINER, None)
    slots = model.__dict__.pop(_SLOTS, None) or {}
    for key, (attr, value) in slots.items():
        name = key.split("#", 1)[0]
        setattr(get_submodule(model, name), attr, value)
    return model


def is_patched(model: nn.Module) -> bool:
    """Does ``model`` hold any regsurgery insertion or changed slot?"""
    return bool(model.__dict__.get(_SLOTS)) or any(
        _STATE in m.__dict__ or has_layerdrop(m) for m in model.modules())


def patched_scopes(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _STATE in m.__dict__]


def inserted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every regularizer regsurgery inserted."""
    found = {}
    for name, m in model.named_modules():
        state: Optional[_PatchState] = m.__dict__.get(_STATE)
        if state is None:
            continue
        for child_name, child in m._modules[CONTAINER].named_children():
            found[f"{name}.{CONTAINER}.{child_name}" if name else f"{CONTAINER}.{child_name}"] = child
    return found


def plan_of(model: nn.Module) -> Plan:
    """The plan currently applied to ``model`` (inserted ops and changed slots), with each
    module's live rate: mid-training under a RateSchedule that is the ramped rate, not the target."""
    ops: list[PlannedOp] = []
    for m in model.modules():
        state: Optional[_PatchState] = m.__dict__.get(_STATE)
        if state is not None:
            for op in state.ops:
                live = dataclasses.replace(op.params, p=float(state.modules[op.key].p))  # type: ignore[arg-type]
                ops.append(dataclasses.replace(op, params=live))
    for key, (attr, _orig) in (model.__dict__.get(_SLOTS) or {}).items():
        if "#" in key:
            continue
        ops.append(PlannedOp(kind="set_rate", scope="", params=SetRateParams(
            module=key, attr=attr, p=float(getattr(get_submodule(model, key), attr)))))
    return Plan(ops=ops)
