"""Files are data: what a recipe or a plan read from a file may make regsurgery do.

A patched checkpoint (``regsurgery patch --out``) and a hand-edited plan (``patch --plan FILE``)
come from elsewhere. Reading one must never run code named in it. This module is the one place
that decides what a file may ask for:

* **model builders** (:func:`check_file_spec`): ``timm:NAME``, ``torchvision:NAME``,
  ``regsurgery:NAME``, ``hf:DIR`` (a local HuggingFace directory, built with
  ``trust_remote_code=False``) and the builders registered in code with :func:`register_builder`.
  Any other ``package.module:callable`` in a file is refused unless the caller passes
  ``trust_code=True`` (``--trust-code``); given on the command line it is the user's own choice.
* **builder kwargs** (:func:`check_file_kwargs`): JSON scalars, lists and str-keyed dicts only,
  checked against the builder's signature; timm kwargs that read files (``checkpoint_path``,
  ``pretrained_cfg``...) are refused.
* **plan ops** (:func:`validate_plan_ops`): ``drop_path`` / ``drop_block`` create regsurgery's
  own regularizers; ``set_rate`` sets the rate of an existing regularizer slot (regsurgery's
  ``p``, timm ``DropPath.drop_prob``, torchvision ``StochasticDepth.p``, ``nn.Dropout.p``) and
  nothing else. Unknown kinds, fields and parameters are refused, naming them.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import fields
from typing import Any, Callable, Optional

from torch import nn

from ..capture.fx import POLICIES, get_submodule
from ..capture.inline import inline_leaves, is_inline_policy
from ..ops import RegularizerModule, check_rate
from ..ops.slots import is_drop_path_slot
from ..plan import PARAMS_OF_KIND, PLAN_FORMAT, Plan
from ..rewrite.apply import PlanMismatchError
from .modelspec import _REGISTRY, check_kwargs_signature, parse_spec

__all__ = [
    "UntrustedFileError",
    "register_builder",
    "unregister_builder",
    "registered_builders",
    "check_file_spec",
    "check_file_kwargs",
    "check_kwargs_signature",
    "validate_plan_ops",
    "validate_plan_dict",
    "check_input_shape",
]

TRUST_HINT = ("pass --trust-code (regsurgery.load(..., trust_code=True)) if you trust the file, give the "
              "model on the command line instead, or register it in code with "
              "regsurgery.register_builder(name, fn)")

#: Sources a file may name without trust.
SAFE_SOURCES = ("timm", "torchvision", "regsurgery", "hf")
#: timm.create_model kwargs that read files or fetch configs: never from a file.
_TIMM_FILE_KWARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                               "pretrained", "pretrained_strict", "features_only_cfg"})
_TV_FILE_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "progress"})
_HF_FILE_KWARGS = frozenset({"trust_remote_code", "local_files_only", "token", "cache_dir", "revision",
                             "code_revision", "force_download", "proxies", "subfolder"})


class UntrustedFileError(ValueError):
    """A file asks for something files may not do (run a callable, set an arbitrary attribute)."""


# --------------------------------------------------------------------------- builders
def register_builder(name: str, fn: Callable[..., nn.Module]) -> None:
    """Allow model spec ``name`` (e.g. ``"myproj:net"``) in files: ``build_model(name, kwargs)`` calls
    ``fn(**kwargs)``. Registered builders take precedence over every other spec form."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"builder name must be a non-empty string without spaces, got {name!r}")
    if not callable(fn) or isinstance(fn, nn.Module):
        raise TypeError(f"builder {name!r} must be a callable returning an nn.Module, got {type(fn).__name__}")
    _REGISTRY[name] = fn


def unregister_builder(name: str) -> None:
    """Remove a builder registered with :func:`register_builder` (no error if absent)."""
    _REGISTRY.pop(name, None)


def registered_builders() -> dict[str, Callable[..., nn.Module]]:
    """A copy of the registered builders, by name."""
    return dict(_REGISTRY)


def check_file_spec(spec: Any, source: str, trust_code: bool = False) -> str:
    """Refuse a spec read from ``source`` that would call code not registered as a builder."""
    if not isinstance(spec, str):
        raise UntrustedFileError(f"{source}: the model spec must be a string, got {type(spec).__name__}")
    if spec in _REGISTRY or trust_code:
        return spec
    origin, name = parse_spec(spec)
    if origin in SAFE_SOURCES:
        return spec
    raise UntrustedFileError(
        f"{source} names the callable {spec!r} as its model builder; files may name only timm:NAME, "
        f"torchvision:NAME, regsurgery:NAME, hf:DIR or a registered builder, since calling it would run code "
        f"chosen by the file; {TRUST_HINT}"
    )


def _check_plain(value: Any, where: str) -> Any:
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value
    if type(value) in (list, tuple):
        return [_check_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value) is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise UntrustedFileError(f"{where} has a non-string key {k!r}")
            out[k] = _check_plain(v, f"{where}[{k!r}]")
        return out
    raise UntrustedFileError(f"{where} is a {type(value).__name__}; files hold JSON scalars, lists and dicts only")


def check_file_kwargs(spec: str, kwargs: Any, source: str) -> dict[str, Any]:
    """Builder kwargs read from a file: plain JSON data, no file-reading options."""
    if kwargs is None:
        return {}
    if type(kwargs) is not dict:
        raise UntrustedFileError(f"{source}: the model kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = _check_plain(kwargs, f"{source}: kwargs")
    origin = spec.partition(":")[0]
    banned = {"timm": _TIMM_FILE_KWARGS, "torchvision": _TV_FILE_KWARGS, "hf": _HF_FILE_KWARGS}.get(origin, ())
    bad = sorted(k for k in kwargs if k in banned and kwargs[k] not in (None, False))
    if bad:
        raise UntrustedFileError(f"{source}: kwargs {', '.join(map(repr, bad))} of {spec!r} would read or fetch "
                                 f"files; a file may not set them")
    return kwargs


def check_input_shape(shape: Any, source: str) -> Optional[tuple[int, ...]]:
    """An input shape from a file: positive ints, at most 2**28 elements in all (or None)."""
    if shape is None:
        return None
    if (type(shape) not in (list, tuple) or not shape or len(shape) > 8
            or not all(type(s) is int and s >= 1 for s in shape) or math.prod(shape) > 2**28):
        raise UntrustedFileError(f"{source}: input_shape must be 1 to 8 positive integers (at most 2**28 "
                                 f"elements), got {shape!r}")
    return tuple(shape)


# --------------------------------------------------------------------------- plans
_OP_FIELDS = {"kind": str, "scope": str, "anchor": str, "user": (str, type(None)), "role": str,
              "depth": int, "site": (int, type(None)), "params": dict}
_ROLES = ("branch", "skip", "conv", "hidden", "head")
#: The parameters of each op kind a file may give: the fields of its typed params.
_PARAMS = {kind: {f.name for f in fields(cls)} for kind, cls in PARAMS_OF_KIND.items()}
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_NAME = re.compile(r"^[A-Za-z0-9_.]*$")


def _check_example_spec(spec: Any, where: str) -> None:
    if spec is None:
        return
    if type(spec) is dict and "inline" in spec:
        _check_inline_spec(spec, where)
        return
    if type(spec) is not dict or set(spec) - {"args", "kwargs"}:
        raise UntrustedFileError(f"{where}: trace_example must be {{'args': [...], 'kwargs': {{...}}}}")
    items = list(enumerate(spec.get("args") or [])) + list((spec.get("kwargs") or {}).items())
    for key, d in items:
        w = f"{where}: trace_example[{key!r}]"
        if type(d) is not dict:
            raise UntrustedFileError(f"{w} must be a dict")
        if "shape" in d:
            if set(d) - {"shape", "dtype"} or d.get("dtype") not in _DTYPES:
                raise UntrustedFileError(f"{w}: a tensor is {{'shape': [...], 'dtype': one of {_DTYPES}}}, got {d!r}")
            check_input_shape(d["shape"], w)
        else:
            if set(d) - {"value", "tuple"}:
                raise UntrustedFileError(f"{w}: unknown fields {sorted(set(d) - {'value', 'tuple'})}")
            _check_plain(d.get("value"), w)


_ARG_NAME = re.compile(r"^\*{0,2}[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|meta)(:[0-9]+)?$")


def _check_inline_value(d: Any, where: str, depth: int = 0) -> None:
    """One argument of an inline capture spec: a tensor's shape and dtype, a dtype or device by
    name, a JSON constant, or a short sequence of those (nothing that names code)."""
    if type(d) is not dict or depth > 8:
        raise UntrustedFileError(f"{where} must be a dict describing one argument")
    keys = set(d)
    if keys == {"shape", "dtype"}:
        if d["dtype"] not in _DTYPES:
            raise UntrustedFileError(f"{where}: dtype must be one of {_DTYPES}, got {d['dtype']!r}")
        check_input_shape(d["shape"], where)
    elif keys == {"repr", "kind"}:
        ok = ((d["kind"] == "dtype" and d["repr"] in {f"torch.{n}" for n in _DTYPES})
              or (d["kind"] == "device" and isinstance(d["repr"], str) and _DEVICE.match(d["repr"])))
        if not ok:
            raise UntrustedFileError(f"{where}: {d!r} is not a dtype or device name")
    elif keys == {"value"}:
        _check_plain(d["value"], where)
    elif keys == {"seq", "tuple"}:
        if type(d["seq"]) is not list or len(d["seq"]) > 64 or type(d["tuple"]) is not bool:
            raise UntrustedFileError(f"{where}: a sequence is {{'seq': [...], 'tuple': true|false}}")
        for i, item in enumerate(d["seq"]):
            _check_inline_value(item, f"{where}[{i}]", depth + 1)
    else:
        raise UntrustedFileError(f"{where}: unknown argument description with fields {sorted(keys)}")


def _check_inline_spec(spec: dict[str, Any], where: str) -> None:
    if set(spec) != {"inline", "npos"} or type(spec["inline"]) is not dict:
        raise UntrustedFileError(f"{where}: an inline trace_example is {{'inline': {{...}}, 'npos': N}}")
    if type(spec["npos"]) is not int or not 0 <= spec["npos"] <= len(spec["inline"]):
        raise UntrustedFileError(f"{where}: npos must be an integer in [0, {len(spec['inline'])}]")
    for name, d in spec["inline"].items():
        if not isinstance(name, str) or not _ARG_NAME.match(name):
            raise UntrustedFileError(f"{where}: {name!r} is not an argument name")
        _check_inline_value(d, f"{where}: trace_example[{name!r}]")


def _rate_slot_attr(module: nn.Module) -> Optional[str]:
    """The rate attribute of a regularizer slot, or None if ``module`` is not one."""
    if isinstance(module, RegularizerModule):
        return "p"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "p"
    if is_drop_path_slot(module):
        for attr in ("drop_prob", "p"):
            if isinstance(getattr(module, attr, None), numbers.Real):
                return attr
    return None


def _check_op(i: int, op: Any, model: Optional[nn.Module], where: str) -> None:
    w = f"{where}: plan op {i}"
    if type(op) is not dict:
        raise UntrustedFileError(f"{w} must be a dict, got {type(op).__name__}")
    unknown = sorted(set(op) - set(_OP_FIELDS))
    if unknown:
        raise UntrustedFileError(f"{w} has unknown field(s) {', '.join(map(repr, unknown))} "
                                 f"(known: {', '.join(_OP_FIELDS)})")
    kind = op.get("kind")
    if kind not in _PARAMS:
        raise UntrustedFileError(f"{w} has unknown kind {kind!r}; a file may ask for {', '.join(_PARAMS)}")
    for name, types in _OP_FIELDS.items():
        if name in op and (type(op[name]) is bool or not isinstance(op[name], types)):  # type: ignore[arg-type]
            raise UntrustedFileError(f"{w} ({kind}): field {name!r} has the wrong type ({op[name]!r})")
    scope = op.get("scope", "")
    if "scope" not in op or not _NAME.match(scope):
        raise UntrustedFileError(f"{w} ({kind}): scope must be a module name, got {scope!r}")
    if op.get("role", "branch") not in _ROLES:
        raise UntrustedFileError(f"{w} ({kind}): unknown role {op.get('role')!r} (known: {', '.join(_ROLES)})")
    params = op.get("params") or {}
    bad = sorted(set(params) - _PARAMS[kind])
    if bad:
        raise UntrustedFileError(f"{w} ({kind}): unknown parameter(s) {', '.join(map(repr, bad))} "
                                 f"(known: {', '.join(sorted(_PARAMS[kind]))})")
    check_rate(f"{w} ({kind}): p", params.get("p", 0.0))
    if params.get("mode", "row") not in ("row", "batch"):
        raise UntrustedFileError(f"{w} ({kind}): mode must be 'row' or 'batch', got {params['mode']!r}")
    for flag in ("scale_by_keep", "skip", "per_channel"):
        if flag in params and type(params[flag]) is not bool:
            raise UntrustedFileError(f"{w} ({kind}): {flag} must be true or false, got {params[flag]!r}")
    if "block_size" in params and (type(params["block_size"]) is not int or not 1 <= params["block_size"] <= 1024):
        raise UntrustedFileError(f"{w} ({kind}): block_size must be an integer in [1, 1024]")
    if "batch_dim" in params and (type(params["batch_dim"]) is not int or not 0 <= params["batch_dim"] <= 8):
        raise UntrustedFileError(f"{w} ({kind}): batch_dim must be an integer in [0, 8], got {params['batch_dim']!r}")
    if params.get("dims", 2) not in (2, 3):
        raise UntrustedFileError(f"{w} ({kind}): dims must be 2 or 3, got {params['dims']!r}")
    if "trace_policy" in params and params["trace_policy"] is not None:
        pol = params["trace_policy"]
        base = pol.split(":", 1)[1] if isinstance(pol, str) and pol.startswith("specialized:") else pol
        inline_ok = (isinstance(pol, str) and is_inline_policy(pol)
                     and all(_NAME.match(leaf) for leaf in inline_leaves(pol)))
        if base not in POLICIES and not inline_ok:
            raise UntrustedFileError(f"{w} ({kind}): unknown trace_policy {pol!r}")
    _check_example_spec(params.get("trace_example"), w)
    if kind != "set_rate":
        if model is not None:
            try:
                get_submodule(model, scope)
            except AttributeError:
                raise PlanMismatchError(f"{w} ({kind}) names scope {scope!r}, which the model does not "
                                        f"have: the plan was made for another model; re-plan it") from None
        return
    module_name, attr = params.get("module"), params.get("attr", "p")
    if not isinstance(module_name, str) or not module_name or not _NAME.match(module_name):
        raise UntrustedFileError(f"{w} (set_rate): 'module' must name a regularizer module, got {module_name!r}")
    if attr not in ("p", "drop_prob"):
        raise UntrustedFileError(f"{w} (set_rate) would set attribute {attr!r} of {module_name!r}; a file may "
                                 f"set only the rate of a regularizer slot (p or drop_prob)")
    if model is None:
        return
    try:
        module = get_submodule(model, module_name)
    except AttributeError:
        raise PlanMismatchError(f"{w} (set_rate) names module {module_name!r}, which the model does not "
                                f"have: the plan was made for another model; re-plan it") from None
    slot = _rate_slot_attr(module)
    if slot is None:
        raise UntrustedFileError(
            f"{w} (set_rate) would change {module_name!r}, a {type(module).__name__}; a file may set only the "
            f"rate of a regularizer slot (regsurgery's, timm DropPath, torchvision StochasticDepth, nn.Dropout)")
    if attr != slot:
        raise UntrustedFileError(f"{w} (set_rate): {module_name!r} ({type(module).__name__}) keeps its rate "
                                 f"in {slot!r}, not {attr!r}")
    if "mode" in params and not isinstance(getattr(module, "mode", None), str):
        raise UntrustedFileError(f"{w} (set_rate): {module_name!r} has no mode to set")


def validate_plan_ops(data: Any, model: Optional[nn.Module] = None, where: str = "plan") -> None:
    """Check a plan dict (``Plan.to_dict()`` form) read from a file. With ``model``, ``set_rate``
    ops are checked against the module they name. Raises :class:`UntrustedFileError` naming the op."""
    if type(data) is not dict:
        raise UntrustedFileError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"format", "meta", "ops"})
    if unknown:
        raise UntrustedFileError(f"{where}: unknown plan field(s) {', '.join(map(repr, unknown))}")
    if data.get("format") != PLAN_FORMAT:
        raise UntrustedFileError(f"{where}: not a regsurgery plan (expected format {PLAN_FORMAT!r}, "
                                 f"got {data.get('format')!r})")
    _check_plain(data.get("meta") or {}, f"{where}: meta")
    ops = data.get("ops") or []
    if type(ops) not in (list, tuple):
        raise UntrustedFileError(f"{where}: 'ops' must be a list")
    for i, op in enumerate(ops):
        _check_op(i, op, model, where)


def validate_plan_dict(data: Any, model: Optional[nn.Module] = None, where: str = "plan") -> Any:
    """:func:`validate_plan_ops`, then the :class:`regsurgery.Plan`."""
    validate_plan_ops(data, model, where)
    return Plan.from_dict(data)
