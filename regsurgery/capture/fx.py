"""Block-local tracing with torch.fx.

regsurgery never traces a model as a whole to patch it. Each module that has a
forward of its own is traced *alone*, with every submodule it calls kept as an
opaque ``call_module`` leaf. The residual add a block performs is in the block's
own forward, so that graph is all analysis and rewriting need, and:

- a model whose top level does not trace (data-dependent control flow) still
  has its blocks traced and patched;
- children are never inlined, so their ``self.training`` branches (BatchNorm,
  BN+activation, dropout) stay decided at run time and their hooks still run;
- buffers stay attributes (``proxy_buffer_attributes=True``) instead of being
  folded into ``_tensor_constant`` copies.

When a block's forward calls something that cannot be a leaf (a child returning
a tuple that the block unpacks, a module that is not registered under it), the
block is traced again with only library modules as leaves; what still fails is
reported as a :class:`TraceFailure`, never raised.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from ..ops import RegularizerModule
from ..ops.slots import is_drop_path_slot, training_flags

__all__ = [
    "BlockGraph",
    "TraceFailure",
    "BlockTracer",
    "trace_block",
    "iter_block_graphs",
    "is_library_module",
    "is_drop_path_slot",
    "SpecializingTracer",
    "capture_block_inputs",
    "example_spec",
    "example_from_spec",
    "require_module",
]

#: Leaf policies, tried in this order. "children": every submodule is a leaf.
#: "library": only torch.nn built-ins, norms and known no-trace modules are leaves.
#: Name of the ModuleDict child that holds a patched block's inserted modules.
CONTAINER = "regsurgery"

POLICIES = ("children", "library", "children+defaults", "library+defaults")
_DEFAULTS = "+defaults"  # suffix: non-tensor default arguments traced as guarded constants


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm absent or changed: nothing to add
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


def _regularizer_types() -> tuple[type, ...]:
    return (RegularizerModule,)


def is_library_module(module: nn.Module) -> bool:
    """Modules that are leaves when their parent is traced: built-in layers, norms,
    regularizers, BN+activation modules and modules registered as no-trace (timm)."""
    if _is_builtin_module(module):
        return True
    notrace_modules, _ = _timm_notrace()
    return bool(notrace_modules) and isinstance(module, notrace_modules)


def _is_builtin_module(module: nn.Module) -> bool:
    """Modules that hold no residual add of interest and are never traced on their own."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if isinstance(module, (*_regularizer_types(), nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)):
        return True
    mod = type(module).__module__ or ""
    if mod.startswith(("torch.nn", "torch.ao.nn", "torchvision.ops")):
        return True
    if is_drop_path_slot(module):
        return True
    # BN+activation modules (timm BatchNormAct2d is a _NormBase subclass; others by name): tracing
    # through them freezes their train/eval branch and drops num_batches_tracked updates.
    return "BatchNorm" in type(module).__name__ or "NormAct" in type(module).__name__


class BlockTracer(fx.Tracer):
    """Traces one module's own forward; which submodules stay leaves depends on ``policy``."""

    def __init__(self, policy: str = "children") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        _, notrace_functions = _timm_notrace()
        super().__init__(autowrap_modules=(math,), autowrap_functions=notrace_functions)
        self.policy = policy
        # Buffers as get_attr nodes, not frozen constants (maxvit, swin relative-position tables).
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.policy == "children":
            return True
        return is_library_module(m)

    # Record, for every node, the module whose forward created it (as torchvision's feature
    # extraction tracer does): with the "library" policy custom children are inlined, and only
    # the block's own nodes (scope "") are its own residual adds.
    _scope: str = ""

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        outer = self._scope
        self._scope = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scope = outer

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["regsurgery_scope"] = self._scope
        return node


_UNKNOWN = object()


def _specialization_guard(value: Any, expected: bool, where: str) -> None:
    """Run time check of a control-flow decision that a specialized trace fixed (see below)."""
    if bool(value) != expected:
        raise RuntimeError(
            f"regsurgery: {where} was traced for inputs where a control-flow condition was "
            f"{expected}, but it is {not expected} for this input (another input size?). Re-apply "
            "the surgery with example_inputs shaped like the training inputs, or strip the model"
        )


class SpecializingTracer(BlockTracer):
    """A block tracer that also runs the block on example arguments, node by node.

    Every proxy carries the concrete value its node has for the example, so control flow on a
    proxy (``if H == self.window_size``, ``if pad_h > 0``) takes the example's branch instead of
    failing. Each such decision is recorded as a guard node that re-checks it at run time and
    raises a clear error if another input would take the other branch: the graph is specialized,
    never silently wrong. Shapes stay symbolic, so a new batch size is fine.
    """

    def __init__(self, policy: str, example_args: tuple, example_kwargs: dict, where: str) -> None:
        super().__init__(policy)
        self._example_args = list(example_args)
        self._example_kwargs = dict(example_kwargs)
        self._where = where
        self.guards: list[tuple[fx.Node, bool]] = []
        self._concrete_depth = 0  # > 0 while running real code for example values

    # fx patches nn.Module.__call__ / __getattr__ while tracing; computing an example value runs
    # real modules, which must then pass straight through to the originals.
    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._concrete_depth:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._concrete_depth:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["regsurgery_value"] = self._value(kind, target, args, kwargs)
        return proxy

    def _concrete(self, obj: Any) -> Any:
        def conv(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                value = a.node.meta.get("regsurgery_value", _UNKNOWN)
                if value is _UNKNOWN:
                    raise LookupError
                return value
            return a

        return fx.node.map_aggregate(obj, conv)

    def _value(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        try:
            if kind == "placeholder":
                name = str(target).lstrip("*")
                if name in self._example_kwargs:
                    return self._example_kwargs[name]
                return self._example_args.pop(0) if self._example_args else _UNKNOWN
            if kind == "get_attr":
                return _get_attr_path(self.root, str(target))
            cargs, ckwargs = self._concrete(args), self._concrete(kwargs)
            self._concrete_depth += 1
            try:
                return self._run(kind, target, cargs, ckwargs)
            finally:
                self._concrete_depth -= 1
        except Exception:  # any op the example cannot run: unknown, and control flow on it fails
            return _UNKNOWN

    def _run(self, kind: str, target: Any, cargs: Any, ckwargs: Any) -> Any:
        with torch.no_grad():
            if kind == "call_function":
                return target(*cargs, **ckwargs)
            if kind == "call_method":
                return getattr(cargs[0], target)(*cargs[1:], **ckwargs)
            if kind == "call_module":
                module = self.root.get_submodule(str(target))
                # Eval mode: computing example values must not move BatchNorm statistics.
                with training_flags(module, False):
                    return module(*cargs, **ckwargs)
        return _UNKNOWN

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = obj.node.meta.get("regsurgery_value", _UNKNOWN)
        if value is _UNKNOWN:
            return super().to_bool(obj)
        decision = bool(value)
        self.guards.append((obj.node, decision))
        return decision

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = obj.node.meta.get("regsurgery_value", _UNKNOWN)
        if value is _UNKNOWN or not isinstance(value, (tuple, list, torch.Size)):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])  # type: ignore[index]

    def insert_guards(self, graph: fx.Graph) -> None:
        for node, decision in self.guards:
            with graph.inserting_after(node):
                graph.call_function(_specialization_guard, (node, decision, self._where))


def _get_attr_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class BlockGraph:
    """The fx graph of one module's own forward, traced in train mode."""

    scope: str
    module: nn.Module
    graph: fx.Graph
    policy: str
    example: Optional[dict[str, Any]] = None  # example-argument spec of a specialized trace

    def node(self, name: str) -> fx.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the graph of scope {self.scope!r}")


@dataclass
class TraceFailure:
    """A module whose own forward could not be traced: its adds are not analysed or patched."""

    scope: str
    type_name: str
    reason: str


def trace_block(
    module: nn.Module,
    scope: str = "",
    policy: Optional[str] = None,
    example: Optional[tuple[tuple, dict]] = None,
) -> BlockGraph:
    """Trace ``module``'s own (class) forward in train mode.

    ``policy=None`` tries each leaf policy in :data:`POLICIES` order and keeps the first that
    works, so the same module always gets the same graph (and the same node names): a Plan
    refers to nodes by name. With ``example=(args, kwargs)`` the trace is specialized on those
    arguments (:class:`SpecializingTracer`; policies are then named ``"specialized:<policy>"``).
    Raises the last tracing error if no policy works.
    """
    if policy is not None and policy.startswith("specialized:"):
        policy = policy.split(":", 1)[1]
        if example is None:
            raise ValueError(f"scope {scope!r} was traced specialized on example arguments; pass them")
    policies = POLICIES if policy is None else (policy,)
    last_error: Optional[BaseException] = None
    for pol in policies:
        where = f"block {scope or '<root>'} ({type(module).__name__})"
        base = pol[: -len(_DEFAULTS)] if pol.endswith(_DEFAULTS) else pol
        concrete = _constant_defaults(module) if pol.endswith(_DEFAULTS) else None
        if pol.endswith(_DEFAULTS) and (not concrete or example is not None):
            continue
        tracer = BlockTracer(base) if example is None else SpecializingTracer(base, *example, where=where)
        try:
            with training_flags(module, True):
                graph = tracer.trace(module, concrete_args=concrete)
        except Exception as exc:  # fx raises many types: TraceError, TypeError, NameError, ...
            last_error = exc
            continue
        if concrete:
            _restore_parameter_names(graph, concrete)
        if isinstance(tracer, SpecializingTracer):
            tracer.insert_guards(graph)
            pol = f"specialized:{pol}"
        return BlockGraph(scope=scope, module=module, graph=graph, policy=pol)
    assert last_error is not None
    raise last_error


def _constant_defaults(module: nn.Module) -> dict[str, Any]:
    """Forward parameters whose default is a non-tensor constant (``pre_logits=False``,
    ``mask=None``): traced as those constants, fx guards each (a call with another value fails
    loudly in the patched train forward instead of taking the traced branch silently)."""
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for name, param in list(sig.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is None or isinstance(param.default, (bool, int, float, str)):
            out[name] = param.default
    return out


def _restore_parameter_names(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """fx renames a constant parameter ``p`` to ``p_1``: give the generated forward its real
    parameter name back, so callers passing it by keyword still match."""
    for node in graph.nodes:
        if node.op == "placeholder" and isinstance(node.target, str):
            stem = node.target.rsplit("_", 1)[0]
            if node.target not in concrete and stem in concrete:
                node.target = stem


# ----------------------------------------------------------------------------- example arguments
#
# A specialized trace needs the block's arguments. They are captured once from a real forward and
# kept in the Plan as plain data (shapes and dtypes, or JSON values); analysis and rewrite both
# rebuild them from that spec with a fixed seed, so both see the same graph.


def example_spec(args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    """Plain-data description of example arguments, or None if one cannot be described."""

    def one(v: Any) -> Optional[dict[str, Any]]:
        if isinstance(v, torch.Tensor):
            return {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"value": v}
        if isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
            return {"value": list(v), "tuple": isinstance(v, tuple)}
        return None

    spec_args = [one(a) for a in args]
    spec_kwargs = {k: one(v) for k, v in kwargs.items()}
    if any(a is None for a in spec_args) or any(v is None for v in spec_kwargs.values()):
        return None
    return {"args": spec_args, "kwargs": spec_kwargs}


def spec_dtype(name: Any) -> torch.dtype:
    """The torch dtype a spec names (``"float32"``, ``"torch.int64"``); anything else, a torch
    function included, is a ValueError: a spec names data types, never code."""
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return value


def module_device(module: Optional[nn.Module]) -> Optional[torch.device]:
    """The device of ``module``'s first parameter or buffer (None: none, or no module)."""
    if module is None:
        return None
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else None


def tensor_from_spec(d: dict[str, Any], g: torch.Generator, device: Optional[torch.device],
                     bool_fill: bool = False) -> torch.Tensor:
    """A tensor of the spec's shape and dtype: floats standard normal from ``g``, integers zero,
    booleans ``bool_fill`` (masks all-keep when True)."""
    dtype = spec_dtype(d["dtype"])
    if dtype.is_floating_point:
        t = torch.randn(d["shape"], generator=g).to(dtype)
    elif dtype == torch.bool:
        t = torch.full(d["shape"], bool_fill, dtype=torch.bool)
    else:
        t = torch.zeros(d["shape"], dtype=dtype)
    return t.to(device) if device is not None else t


def example_from_spec(spec: dict[str, Any], module: Optional[nn.Module] = None) -> tuple[tuple, dict]:
    """Rebuild example arguments from :func:`example_spec` (tensors drawn with a fixed seed, on
    the device of ``module``'s first parameter or buffer)."""
    g = torch.Generator().manual_seed(0)
    device = module_device(module)

    def one(d: dict[str, Any]) -> Any:
        if "shape" in d:
            return tensor_from_spec(d, g, device)
        value = d["value"]
        return tuple(value) if d.get("tuple") else value

    return tuple(one(a) for a in spec["args"]), {k: one(v) for k, v in spec["kwargs"].items()}


def capture_block_inputs(
    model: nn.Module, scopes: list[str], example_inputs: Any
) -> dict[str, dict[str, Any]]:
    """Run ``model`` once (eval, no grad) and describe the first call's arguments of each scope."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    wanted = {id(get_submodule(model, s)): s for s in scopes}
    found: dict[str, dict[str, Any]] = {}

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        scope = wanted.get(id(module))
        if scope is not None and scope not in found:
            spec = example_spec(a, kw)
            if spec is not None:
                found[scope] = spec

    handles = [get_submodule(model, s).register_forward_pre_hook(hook, with_kwargs=True) for s in scopes]
    try:
        with training_flags(model, False), torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return found


def is_builtin_composite(module: nn.Module) -> bool:
    """A ``torch.nn`` module that composes two or more children with parameters (the transformer
    encoder / decoder layers): it can hold residual adds, so it is captured like a custom block."""
    if not (type(module).__module__ or "").startswith("torch.nn"):
        return False
    weighted = [c for c in module.children() if next(c.parameters(), None) is not None]
    return len(weighted) >= 2


def _has_own_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


_NORM_OR_ACTIVATION = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Identity,
)


def holds_no_own_add(module: nn.Module) -> bool:
    """Modules whose own forward cannot perform a residual add, known without tracing: the
    torch.nn containers' own chaining forward, and childless subclasses of torch.nn norms and
    activations (timm LayerNorm2d, GELU): no weighted layer can sit in a branch there."""
    for container in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        if isinstance(module, container) and type(module).forward is container.forward:
            return True
    return isinstance(module, _NORM_OR_ACTIVATION) and next(module.children(), None) is None


def iter_block_graphs(model: nn.Module, *, chains: bool = False) -> Iterator[BlockGraph | TraceFailure]:
    """Trace every module of ``model`` that has its own forward, in registration order.

    Built-in modules (``torch.nn`` layers, norms, regularizers) are skipped: they perform no
    residual adds of interest. Modules registered as no-trace are still tried on their own (they
    are only leaves for their parents). A module registered under two names is traced once.
    Modules that cannot perform a residual add of their own (:func:`holds_no_own_add`) are left
    out unless ``chains=True``: the chaining forward of an ``nn.Sequential`` still holds dataflow
    that other analyses (hidden MLP layers) read.
    """
    for scope, module in model.named_modules():
        if ((_is_builtin_module(module) and not is_builtin_composite(module)) or not _has_own_forward(module)
                or (not chains and holds_no_own_add(module))):
            continue
        try:
            yield trace_block(module, scope)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            yield TraceFailure(scope=scope, type_name=type(module).__name__, reason=reason)


def require_module(model: Any, name: str = "model") -> nn.Module:
    """``model`` itself, or a TypeError naming what was passed instead (a model name, a path)."""
    if not isinstance(model, nn.Module):
        hint = " (build the model first, e.g. timm.create_model(...))" if isinstance(model, str) else ""
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}{hint}")
    return model


def qualified(scope: str, name: str) -> str:
    """Join a scope and a relative module path."""
    return f"{scope}.{name}" if scope and name else (scope or name)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model if path == "" else model.get_submodule(path)


def module_of(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    """The module a ``call_module`` node calls, relative to the traced block."""
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def own_node(node: fx.Node) -> bool:
    """Was this node created by the traced block's own forward (not an inlined child's)?"""
    return node.meta.get("regsurgery_scope", "") == ""


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, in order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))

