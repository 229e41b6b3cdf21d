"""Model specs: a short string that names a model, turned into a freshly initialised ``nn.Module``.

* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)``;
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``;
* ``package.module:callable`` (the callable may be dotted, ``pkg.mod:Class.build``): imported and
  called with ``**kwargs``; the current directory is searched too, so a user's own file works;
* ``regsurgery:example``: the built-in TinyResNet (``regsurgery/examples_models.py``).

Nothing is ever downloaded: weights come from a checkpoint file (``regsurgery.checkpoint``).
A spec is stored verbatim in patched checkpoints, so ``regsurgery.load`` can rebuild the model.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import sys
from typing import Any, Callable, Optional

from torch import nn

from .examples_models import EXAMPLES

__all__ = [
    "ModelSpecError",
    "MissingDependencyError",
    "DEFAULT_SPEC",
    "build_model",
    "parse_spec",
    "parse_kwargs",
    "default_input_shape",
]

#: The built-in model the README's main command uses.
DEFAULT_SPEC = "regsurgery:example"

_FORMS = "timm:NAME, torchvision:NAME, hf:DIR, package.module:callable or regsurgery:example"

#: Builders registered in code (``regsurgery.register_builder``): spec -> callable(**kwargs).
_REGISTRY: dict[str, Any] = {}


class ModelSpecError(ValueError):
    """The spec, its model name or its kwargs are wrong (a usage error: fix the command line)."""


class MissingDependencyError(ImportError):
    """A package the spec needs is not installed; the message says which extra to install."""


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not close:
        # Prefix matches catch "resnet" -> "resnet18", which difflib ranks low.
        close = sorted(c for c in candidates if c.startswith(name))[:5]
    return f"; did you mean {', '.join(close)}?" if close else ""


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``spec`` into ``(source, name)``; ``source`` is ``timm``, ``torchvision``,
    ``regsurgery`` or a module path. Raises :class:`ModelSpecError` for a malformed spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec; use one of {_FORMS}")
    spec = spec.strip()
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        hint = ""
        if sep == "" and spec.replace("_", "").replace(".", "").isalnum():
            hint = f" (for a timm model: timm:{spec}; for torchvision: torchvision:{spec})"
        raise ModelSpecError(f"model spec {spec!r} must look like {_FORMS}{hint}")
    if source in ("timm", "torchvision", "regsurgery", "hf"):
        return source, name
    parts = source.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ModelSpecError(
            f"unknown model source {source!r} in {spec!r}: use {_FORMS} "
            f"(a module path is dotted Python identifiers)"
        )
    if not all(p.isidentifier() for p in name.split(".")):
        raise ModelSpecError(f"{name!r} in {spec!r} is not a Python attribute path (e.g. make_model or Class.build)")
    return source, name


def parse_kwargs(text: Optional[str]) -> dict[str, Any]:
    """Parse the ``--kwargs`` JSON object (``None`` or empty: ``{}``)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"--kwargs is not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ModelSpecError(f"--kwargs must be a JSON object like '{{\"num_classes\": 10}}', got {text!r}")
    return value


def _require(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{spec!r} needs the {module} package, which is not installed ({e}); "
            f"install it with: pip install regsurgery[models]"
        ) from e


def _call(factory: Any, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as e:
        # A bad keyword is the usual cause; the original message names it.
        raise ModelSpecError(f"{spec!r} rejected the keyword arguments {kwargs!r}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_timm(name: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ModelSpecError(
            f"{spec!r} would fetch a config or weights from outside; use timm:ARCH with --checkpoint"
        )
    timm = _require("timm", spec)
    if not timm.is_model(name):
        raise ModelSpecError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    if "pretrained" in kwargs and kwargs["pretrained"]:
        raise ModelSpecError(f"{spec!r}: pretrained=True would download weights; pass --checkpoint instead")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    return _call(lambda **kw: timm.create_model(name, pretrained=False, **kw), spec, kwargs)


def _build_torchvision(name: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    _require("torchvision", spec)
    import torchvision.models as tvm

    available = tvm.list_models()
    if name not in available:
        raise ModelSpecError(f"unknown torchvision model {name!r}{_suggest(name, available)}")
    for key in ("weights", "weights_backbone", "pretrained"):
        if kwargs.get(key):
            raise ModelSpecError(f"{spec!r}: {key}={kwargs[key]!r} would download weights; pass --checkpoint instead")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}
    if "weights_backbone" in inspect.signature(tvm.get_model_builder(name)).parameters:
        kwargs.setdefault("weights_backbone", None)  # detection/segmentation: no backbone download
    return _call(lambda **kw: tvm.get_model(name, weights=None, **kw), spec, kwargs)


def check_kwargs_signature(fn: Callable[..., Any], kwargs: dict[str, Any], spec: str) -> None:
    """Refuse a keyword ``fn`` does not take (when its signature says; ``**kwargs`` accepts all)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = {n for n, p in params.items()
             if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    unknown = [k for k in kwargs if k not in named]
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise ModelSpecError(f"{spec!r} got an unexpected keyword argument{s} {', '.join(map(repr, unknown))} "
                             f"(it takes: {', '.join(sorted(named)) or 'none'})")



def _build_example(name: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    if name not in EXAMPLES:
        raise ModelSpecError(
            f"unknown built-in model {name!r}{_suggest(name, sorted(EXAMPLES))} "
            f"(built-in: {', '.join('regsurgery:' + n for n in sorted(EXAMPLES))})"
        )
    check_kwargs_signature(EXAMPLES[name], kwargs, spec)
    return _call(EXAMPLES[name], spec, kwargs)


def _build_hf(directory: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """A local HuggingFace model directory: its config.json, ``AutoModel.from_config`` with
    ``trust_remote_code=False`` (no code from the directory runs; weights come from the checkpoint)."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelSpecError(f"{spec!r}: {directory} is not a local HuggingFace model directory (no config.json)")
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(f"{spec!r} needs the transformers package, which is not installed; "
                                     f"pip install transformers") from e
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False,
                                                         local_files_only=True, **kwargs)
        return transformers.AutoModel.from_config(config, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ModelSpecError(f"{spec!r}: cannot build the model from {directory}/config.json: "
                             f"{' '.join(str(e).split())[:300]}") from e


def _import_module(module: str, spec: str) -> Any:
    def missing_is_spec(e: ModuleNotFoundError) -> bool:
        # The module named by the spec (or a parent package) is missing: a spec error.
        # A dependency missing *inside* that module is an environment problem instead.
        return e.name is not None and (module == e.name or module.startswith(e.name + "."))

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not missing_is_spec(e):
            raise
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise ModelSpecError(f"cannot import {module!r} (from {spec!r}): {e}") from e
    # The console script does not put the working directory on sys.path (python -m does);
    # a user's own model file next to them should still be found.
    sys.path.append(cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        sys.path.remove(cwd)
        if not missing_is_spec(e):
            raise
        raise ModelSpecError(f"cannot import {module!r} (from {spec!r}): {e}") from e


def _build_callable(module: str, attr: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    obj: Any = _import_module(module, spec)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module if i == 0 else f"{module}:{'.'.join(attr.split('.')[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelSpecError(f"{where} has no attribute {part!r}{_suggest(part, names)}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        # Modules are callable too; calling one would run its forward, never what was meant.
        raise ModelSpecError(
            f"{spec!r} is a module instance, not a callable that builds one; name a class or factory"
        )
    if not callable(obj):
        raise ModelSpecError(f"{spec!r} is a {type(obj).__name__}, not a callable that builds a model")
    return _call(obj, spec, kwargs)


def build_model(spec: str, kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """Build the model named by ``spec`` with ``kwargs``, randomly initialised, in train mode.

    Raises:
        ModelSpecError: malformed spec, unknown model (with close names suggested), bad kwargs.
        MissingDependencyError: timm / torchvision not installed.
    """
    kwargs = dict(kwargs or {})
    if not all(isinstance(k, str) for k in kwargs):
        raise ModelSpecError(f"kwargs keys must be strings, got {list(kwargs)!r}")
    if isinstance(spec, str) and spec in _REGISTRY:
        check_kwargs_signature(_REGISTRY[spec], kwargs, spec)
        return _call(_REGISTRY[spec], spec, kwargs).train()
    source, name = parse_spec(spec)
    if source == "hf":
        model = _build_hf(name, spec, kwargs)
    elif source == "timm":
        model = _build_timm(name, spec, kwargs)
    elif source == "torchvision":
        model = _build_torchvision(name, spec, kwargs)
    elif source == "regsurgery":
        model = _build_example(name, spec, kwargs)
    else:
        model = _build_callable(source, name, spec, kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.train()


def _torchvision_crop(name: str) -> Optional[int]:
    try:
        import torchvision.models as tvm

        weights = tvm.get_model_weights(name)
    except (ImportError, ValueError, KeyError, AttributeError):
        return None
    transforms = getattr(weights.DEFAULT, "transforms", None)
    crop = getattr(transforms, "keywords", {}).get("crop_size")
    if isinstance(crop, (tuple, list)):
        crop = crop[0] if len(set(crop)) == 1 else None
    return int(crop) if isinstance(crop, int) else None


def default_input_shape(model: nn.Module, spec: Optional[str] = None) -> tuple[int, ...]:
    """The input shape (batch 1) a model is meant for, when the user gives none.

    In order: a ``default_input_size`` attribute (the built-in example: 3x64x64); timm's
    ``pretrained_cfg`` / ``default_cfg`` ``input_size``; for ``torchvision:NAME`` the crop size of
    its weights' transforms (no download); else the first conv's ``in_channels`` at 224 px
    (3D convs: 16x112x112), or the first linear layer's ``in_features``.
    """
    size = getattr(model, "default_input_size", None)
    if size is None:
        for attr in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(model, attr, None)
            if isinstance(cfg, dict) and cfg.get("input_size"):
                size = cfg["input_size"]
                break
    if size is not None:
        return (1, *(int(s) for s in size))
    crop = None
    if spec is not None and spec.startswith("torchvision:"):
        crop = _torchvision_crop(spec.partition(":")[2])
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            return (1, m.in_channels, 224)
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, crop or 224, crop or 224)
        if isinstance(m, nn.Conv3d):
            return (1, m.in_channels, 16, crop or 112, crop or 112)
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    raise ModelSpecError(
        f"cannot guess an input shape for {spec or type(model).__name__}; pass --input-shape, e.g. 1,3,224,224"
    )
