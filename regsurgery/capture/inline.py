"""Fallback capture: a block traced on the arguments it received in one real forward.

Where plain block tracing fails (any fx failure: a child returning a tuple, a wrapped
``forward(*args, **kwargs)``, control flow on arguments, as in HuggingFace ``transformers``
layers), a block is traced again by :class:`InliningTracer`:

* the example arguments of the block are recorded from one forward of the model (a Tensor, a
  tuple of arguments, or a dict of keyword arguments such as ``input_ids`` / ``attention_mask``);
* every tensor in them (nested in tuples and lists too) becomes a placeholder; everything else
  (``None``, flags, ints, strings) stays a *constant*: ``attn_mask=None`` leaves no
  ``if attn_mask is not None`` branch in the graph;
* custom children are inlined, library modules (``torch.nn``) stay leaves, and control flow is
  decided on the example values (:class:`~.fx.SpecializingTracer`) with run-time guards. Children
  named in ``leaves`` stay ``call_module`` leaves (they are patched on their own);
* a residual add that sits in a child whose operands both arrive as arguments (BERT's
  ``LayerNorm(dense(h) + input_tensor)``) is visible in the block's dataflow, and the DropPath is
  inserted at that call site, in the block's graph.

The compiled train forward is called through :func:`call_adapter`, which binds the call's
arguments to the forward's signature, checks that the constants are the ones traced (a clear
error if not) and passes the tensors on. Policies are named ``"inline"`` or
``"inline:<leaf>,<leaf>"``.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from ..ops.slots import training_flags
from .fx import (
    BlockGraph,
    SpecializingTracer,
    TraceFailure,
    get_submodule,
    module_device,
    spec_dtype,
    tensor_from_spec,
)

__all__ = [
    "INLINE",
    "InliningTracer",
    "trace_inline",
    "is_inline_policy",
    "inline_policy",
    "inline_leaves",
    "inline_spec",
    "inline_example",
    "record_inline_inputs",
    "call_forward",
    "call_adapter",
    "inline_failures",
    "site_owner_scope",
]

INLINE = "inline"
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def is_inline_policy(policy: Optional[str]) -> bool:
    return policy is not None and (policy == INLINE or policy.startswith(INLINE + ":"))


def inline_policy(leaves: list[str]) -> str:
    return INLINE if not leaves else f"{INLINE}:{','.join(sorted(leaves))}"


def inline_leaves(policy: str) -> list[str]:
    return [p for p in policy.split(":", 1)[1].split(",") if p] if ":" in policy else []


# ----------------------------------------------------------------------------- example arguments


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    # inspect follows functools.wraps (HF's checkpointing wrapper) to the real forward.
    forward = type(module).forward
    sig = _SIGNATURES.get(forward)
    if sig is None:
        sig = _SIGNATURES[forward] = inspect.signature(forward)
    return sig


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by name (``self`` excluded, defaults applied, ``**kwargs`` flattened in)."""
    sig = _signature(module)
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            for k in sorted(value):
                out[f"**{k}"] = value[k]
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            for i, v in enumerate(value):
                out[f"*{i}"] = v
        else:
            out[name] = value
    return out


def _unbind(module: nn.Module, values: dict[str, Any], npos: int) -> tuple[tuple, dict]:
    """Call arguments again: the first ``npos`` named parameters positional, the rest keywords
    (decorators such as HF's ``merge_with_config_defaults`` fill in keywords themselves)."""
    sig = _signature(module)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(values[k] for k in sorted((k for k in values if k.startswith("*") and not k.startswith("**")),
                                                  key=lambda k: int(k[1:])))
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update({k[2:]: v for k, v in values.items() if k.startswith("**")})
        elif p.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[name] = values[name]
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY or len(args) < npos:
            args.append(values[name])
        else:
            kwargs[name] = values[name]
    return tuple(args), kwargs


def _describe(value: Any) -> Optional[dict[str, Any]]:
    """Plain data for one argument: a tensor's shape/dtype, a constant, or a sequence of those."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, (torch.dtype, torch.device)):
        return {"repr": str(value), "kind": type(value).__name__}
    if isinstance(value, _CONSTANT_TYPES):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        items = [_describe(v) for v in value]
        if any(i is None for i in items):
            return None
        return {"seq": items, "tuple": isinstance(value, tuple)}
    return None


def inline_spec(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Plain-data description of a call's arguments, by name; a TypeError names what cannot be."""
    bound = _bind(module, args, kwargs)
    spec: dict[str, Any] = {}
    for name, value in bound.items():
        d = _describe(value)
        if d is None:
            raise TypeError(
                f"argument {name.lstrip('*')!r} is a {type(value).__name__}, which a capture cannot keep "
                "(only tensors, constants and tuples of them; HF models: pass use_cache=False)"
            )
        spec[name] = d
    return {"inline": spec, "npos": len(args)}


def _rebuild(d: dict[str, Any], g: torch.Generator, device: Any) -> Any:
    if "shape" in d:
        return tensor_from_spec(d, g, device, bool_fill=True)  # masks: keep everything
    if "seq" in d:
        items = [_rebuild(i, g, device) for i in d["seq"]]
        return tuple(items) if d.get("tuple") else items
    if "repr" in d:
        return spec_dtype(d["repr"]) if d["kind"] == "dtype" else torch.device(d["repr"])
    return d["value"]


def inline_example(spec: dict[str, Any], module: nn.Module) -> tuple[tuple, dict]:
    """Arguments rebuilt from :func:`inline_spec` (tensors drawn with a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    values = {k: _rebuild(d, g, module_device(module)) for k, d in spec["inline"].items()}
    return _unbind(module, values, spec["npos"])


def call_forward(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` called on example inputs: a Tensor, a tuple of arguments or a dict of keywords."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def default_example(model: nn.Module) -> Any:
    """The model's own dummy inputs (HuggingFace ``dummy_inputs``), else None."""
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, Mapping) and dummy:
        return dict(dummy)
    return None


def _hf_call_defaults(model: nn.Module, example_inputs: Any) -> Any:
    # A KV cache object is state, not an argument a capture can keep: capture without it.
    if isinstance(example_inputs, Mapping) and "use_cache" in _forward_params(model):
        return {"use_cache": False, **example_inputs}
    return example_inputs


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(_signature(model).parameters)
    except (TypeError, ValueError):
        return set()


def record_inline_inputs(model: nn.Module, scopes: list[str], example_inputs: Any) -> dict[str, tuple[tuple, dict]]:
    """The first call's real arguments of each scope, from one eval-mode, no-grad forward."""
    wanted = {id(get_submodule(model, s)): s for s in scopes}
    found: dict[str, tuple[tuple, dict]] = {}

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        scope = wanted.get(id(module))
        if scope is not None and scope not in found:
            found[scope] = (tuple(a), dict(kw))

    handles = [get_submodule(model, s).register_forward_pre_hook(hook, with_kwargs=True) for s in scopes]
    try:
        with training_flags(model, False), torch.no_grad():
            call_forward(model, _hf_call_defaults(model, example_inputs))
    finally:
        for h in handles:
            h.remove()
    return found


# ----------------------------------------------------------------------------- tracer


def _placeholder_name(name: str, path: tuple) -> str:
    base = re.sub(r"\W", "_", name.lstrip("*")) or "arg"
    if base[0].isdigit():
        base = "arg" + base
    return base + "".join(f"_{i}" for i in path)


class _SizedProxy(fx.Proxy):
    """A proxy whose ``len()`` is that of its example value (``(*x.shape[:-1], -1)``)."""

    def __len__(self) -> int:
        value = self.node.meta.get("regsurgery_value")
        if isinstance(value, (tuple, list, torch.Size)):
            return len(value)
        return super().__len__()

    def __getattr__(self, k: str) -> Any:
        # A tensor's dtype / device is a constant of the capture (``torch.finfo(x.dtype).min``),
        # the example's, like the rest of the train-mode specialization.
        if k in ("dtype", "device", "is_cuda", "is_floating_point"):
            value = self.node.meta.get("regsurgery_value")
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return super().__getattr__(k)


class InliningTracer(SpecializingTracer):
    """Traces a block on its recorded arguments: tensors are placeholders, the rest constants;
    custom children inlined except ``leaves`` (see the module docstring)."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict, where: str, leaves: tuple = ()) -> None:
        super().__init__("library", (), {}, where)
        self._bound = _bind(module, args, kwargs)
        self._npos = len(args)
        self._leaves = set(leaves)
        self.tensor_names: list[str] = []

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        # A module that is not a submodule (HF kernel-hub functions such as the rotary embedding
        # helper are module objects): its code is traced through, as a function's would be.
        if not self._concrete_depth:
            try:
                self.path_of_module(m)
            except NameError:
                return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _value(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        # Reading a parameter runs through fx's patched Module.__getattr__: concrete mode.
        self._concrete_depth += kind == "get_attr"
        try:
            return super()._value(kind, target, args, kwargs)
        finally:
            self._concrete_depth -= kind == "get_attr"

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        # A tensor's dtype / device is a constant of the capture (``torch.finfo(x.dtype).min``):
        # the example's, like the rest of the train-mode specialization.
        value = proxy.node.meta.get("regsurgery_value")
        if kind == "call_function" and target is getattr and isinstance(value, (torch.dtype, torch.device)):
            self.graph.erase_node(proxy.node)
            return value  # type: ignore[return-value]
        return proxy

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves or super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None):  # type: ignore[override]
        values: dict[str, Any] = {}

        def proxify(name: str, value: Any, path: tuple) -> Any:
            if isinstance(value, torch.Tensor):
                pname = _placeholder_name(name, path)
                self._example_kwargs[pname] = value
                self.tensor_names.append(pname)
                return self.create_proxy("placeholder", pname, (), {})
            if isinstance(value, (tuple, list)):
                items = [proxify(name, v, (*path, i)) for i, v in enumerate(value)]
                return tuple(items) if isinstance(value, tuple) else items
            return value

        for name, value in self._bound.items():
            values[name] = proxify(name, value, ())

        def fn(root: nn.Module) -> Any:
            a, kw = _unbind(root, values, self._npos)
            return type(root).forward(root, *a, **kw)

        return fn, [self.root]


def trace_inline(
    module: nn.Module, scope: str, args: tuple, kwargs: dict, leaves: tuple = (),
    spec: Optional[dict[str, Any]] = None,
) -> BlockGraph:
    """The train-mode graph of ``module`` called on ``(args, kwargs)`` (see the module docstring)."""
    where = f"block {scope or '<root>'} ({type(module).__name__})"
    tracer = InliningTracer(module, args, kwargs, where, leaves)
    with training_flags(module, True):
        graph = tracer.trace(module)
    tracer.insert_guards(graph)
    block = BlockGraph(scope=scope, module=module, graph=graph, policy=inline_policy(list(leaves)))
    block.example = spec if spec is not None else inline_spec(module, args, kwargs)
    block.inline_args = (args, kwargs)  # type: ignore[attr-defined]  # for retraces with leaves
    return block


# ----------------------------------------------------------------------------- call adapter


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The structure of ``value`` with tensors replaced by a marker (tensors appended in order)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return "<tensor>"
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_flatten(v, tensors) for v in value))
    return value


def _structure(d: dict[str, Any]) -> Any:
    if "shape" in d:
        return "<tensor>"
    if "seq" in d:
        return ("tuple" if d.get("tuple") else "list", tuple(_structure(i) for i in d["seq"]))
    if "repr" in d:
        return _rebuild(d, torch.Generator(), None)
    return d["value"]


def call_adapter(module: nn.Module, spec: dict[str, Any], fn: Callable[..., Any], scope: str) -> Callable[..., Any]:
    """Wrap the compiled graph ``fn(self, *tensors)`` into ``forward(self, *args, **kwargs)``.

    The call's arguments are bound to the forward's signature; their structure and constants must
    be the traced ones (else a RuntimeError naming the argument). HF's gradient checkpointing
    (``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on the block) stays in force.
    """
    expected = {name: _structure(d) for name, d in spec["inline"].items()}

    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = _bind(self, args, kwargs)
        tensors: list[torch.Tensor] = []
        for name in expected:
            got = _flatten(bound.get(name), tensors)
            if got != expected[name]:
                raise RuntimeError(
                    f"regsurgery: block {scope or '<root>'} ({type(self).__name__}) was captured for "
                    f"{name.lstrip('*')}={expected[name]!r}, but is called with {got!r}; re-apply the "
                    "surgery with example_inputs like the training call (HF: use_cache=False), or strip it"
                )
        extra = [k for k in bound if k not in expected and bound[k] is not None]
        if extra:
            raise RuntimeError(
                f"regsurgery: block {scope or '<root>'} ({type(self).__name__}) is called with "
                f"arguments {extra} it was not captured with; re-apply the surgery with such example_inputs"
            )
        return fn(self, *tensors)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if (getattr(self, "gradient_checkpointing", False) is True and torch.is_grad_enabled()
                and callable(getattr(self, "_gradient_checkpointing_func", None))):
            checkpointed: Callable[..., Any] = self._gradient_checkpointing_func  # type: ignore[assignment]
            return checkpointed(functools.partial(run, self, **kwargs), *args)
        return run(self, *args, **kwargs)

    return forward


# ----------------------------------------------------------------------------- capture fallback


def inline_failures(model: nn.Module, items: list, example_inputs: Any) -> list:
    """Capture every block that failed plain tracing with :func:`trace_inline` where possible."""
    failed = [i.scope for i in items if isinstance(i, TraceFailure)]
    if not failed:
        return items
    if example_inputs is None:
        example_inputs = default_example(model)
    if example_inputs is None:
        return items
    try:
        recorded = record_inline_inputs(model, failed, example_inputs)
    except Exception as exc:
        note = f"; inline capture: the example forward failed ({type(exc).__name__}: {str(exc)[:120]})"
        return [TraceFailure(i.scope, i.type_name, i.reason + note) if isinstance(i, TraceFailure) else i
                for i in items]
    out = []
    for item in items:
        if not isinstance(item, TraceFailure):
            out.append(item)
            continue
        if item.scope not in recorded:
            out.append(TraceFailure(item.scope, item.type_name, item.reason + "; not called by the example forward"))
            continue
        module = get_submodule(model, item.scope)
        try:
            out.append(trace_inline(module, item.scope, *recorded[item.scope]))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            out.append(TraceFailure(item.scope, item.type_name,
                                    f"{item.reason}; inline capture: {type(exc).__name__}: {first}"))
    return out


# ----------------------------------------------------------------------------- site ownership


def _common_scope(scopes: list[str]) -> str:
    parts = [s.split(".") if s else [] for s in scopes]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def site_owner_scope(graph: fx.Graph, add: str, body: list[str]) -> str:
    """The innermost child scope (relative) that holds an add and its whole branch, "" for the block."""
    scopes = {n.name: n.meta.get("regsurgery_scope", "") for n in graph.nodes}
    return _common_scope([scopes.get(add, "")] + [scopes.get(b, "") for b in body])


# ----------------------------------------------------------------------------- batch dimension


def batch_dims(block: BlockGraph, anchors: list[str], call: Optional[tuple[tuple, dict]] = None) -> dict[str, int]:
    """The dimension that indexes samples in each anchor's value, found from the example call.

    The block's graph is run (eval flags, seeded RNG, no grad) on its recorded arguments, then
    again with sample 0 of its first tensor argument changed along a candidate dimension: the
    batch dimension is the first one along which only slice 0 of the anchor changes (in
    ``(S, B, D)`` attention mixes positions along dim 0, never samples along dim 1). Anchors
    without a clear answer (a batch of one, BatchNorm in train mode) are left out (dim 0).
    """
    placeholders = [n for n in block.graph.nodes if n.op == "placeholder"]
    if call is not None:  # a plain graph: its placeholders are the forward's parameters
        values, kwargs = list(call[0]), dict(call[1])
    else:  # an inline graph: its placeholders are the tensors of the recorded call
        values, kwargs = [n.meta.get("regsurgery_value") for n in placeholders], {}
        if not all(isinstance(v, torch.Tensor) for v in values):
            return {}
    if not placeholders or not values or not isinstance(values[0], torch.Tensor) or not anchors:
        return {}
    x = values[0]
    if not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 1:
        return {}  # with a size-1 dim 0, a channel-wise branch would pass for samples along dim 1
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(block.graph, val_map)
    by_name = {n.name: val_map[n] for n in block.graph.nodes if n in val_map}
    graph.output(tuple(by_name[a] for a in anchors))
    gm = fx.GraphModule(block.module, graph)

    def run(first: torch.Tensor) -> tuple:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), training_flags(block.module, False):
            torch.manual_seed(0)
            return gm(first, *values[1:], **kwargs)

    try:
        base = run(x)
    except Exception:
        return {}
    found: dict[str, int] = {}
    for d in range(x.dim()):
        todo = [i for i, a in enumerate(anchors) if a not in found and isinstance(base[i], torch.Tensor)
                and base[i].dim() > d and base[i].shape[d] == x.shape[d] > 1]
        if not todo:
            continue
        x2 = x.clone()
        part = x2.select(d, 0)  # a non-constant change: a norm would cancel a constant shift
        part.add_(torch.randn(part.shape, generator=torch.Generator().manual_seed(1)).to(part))
        try:
            out = run(x2)
        except Exception:
            return found
        for i in todo:
            changed = (out[i] - base[i]).abs().float().movedim(d, 0).flatten(1).amax(1) > 1e-6
            if bool(changed[0]) and not bool(changed[1:].any()):
                found[anchors[i]] = d
    return found


# ----------------------------------------------------------------------------- optional arguments


def _optional_used(block: BlockGraph) -> list[str]:
    """Arguments with a ``None`` default that the block's own code computes with: a plain trace
    made them proxies, so ``arg.to(x.dtype) if arg is not None else None`` kept its "not None"
    branch. One only handed to a child module is safe: the child gets the real value at run time."""
    try:
        params = _signature(block.module).parameters
    except (TypeError, ValueError):
        return []
    return [n.target for n in block.graph.nodes
            if n.op == "placeholder" and n.target in params and params[n.target].default is None
            and any(u.op not in ("call_module", "output") for u in n.users)]


def inline_optional_args(model: nn.Module, items: list, example_inputs: Any) -> list:
    """Capture again, on the example call, the blocks whose plain graph reads an optional
    argument that the example call leaves ``None`` (that argument becomes a guarded constant)."""
    candidates = {i.scope: _optional_used(i) for i in items
                  if isinstance(i, BlockGraph) and i.example is None}
    candidates = {s: names for s, names in candidates.items() if names}
    if not candidates:
        return items
    if example_inputs is None:
        example_inputs = default_example(model)
    if example_inputs is None:
        return items
    try:
        recorded = record_inline_inputs(model, list(candidates), example_inputs)
    except Exception:
        return items  # the plain captures stay; the train-mode check at apply time runs them
    out = []
    for item in items:
        call = recorded.get(item.scope) if item.scope in candidates else None
        if call is not None:
            bound = _bind(item.module, *call)
            if any(bound.get(name) is None for name in candidates[item.scope]):
                try:
                    item = trace_inline(item.module, item.scope, *call)
                except Exception:
                    pass
        out.append(item)
    return out
