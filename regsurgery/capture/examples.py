"""Example inputs for a model, and the recording forward that capture and analysis build on.

An example input is either given (a Tensor or a tuple of forward arguments) or inferred from what
the model declares (timm ``pretrained_cfg``, ``img_size``, the first ``nn.Conv2d``). A recording
forward runs it once in eval mode with hooks on every module and lists each call's shapes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..ops.slots import training_flags

__all__ = [
    "ModuleCall",
    "DEFAULT_IMAGE_SIZE",
    "as_args",
    "infer_example_input",
    "record_module_shapes",
    "check_example_input",
    "run_recorded",
    "describe_args",
    "expected_hint",
]

#: Side of the example input when only the first conv's in_channels is known.
DEFAULT_IMAGE_SIZE = 224

@dataclass
class ModuleCall:
    """One call of one module during the recording forward, in the order outputs were produced.

    ``call_index`` counts calls of the same module (a ReLU reused three times per torchvision
    Bottleneck has calls 0, 1, 2). Shapes are those of the first tensor argument and the first
    tensor of the output (depth-first through tuples, lists and dicts); None when there is none.
    ``start`` numbers calls in the order they began; ``parent`` is the ``start`` of the call
    that was running when this one began (None for the outermost call).
    """

    name: str
    type_name: str
    call_index: int
    input_shape: Optional[tuple[int, ...]]
    output_shape: Optional[tuple[int, ...]]
    start: int = 0
    parent: Optional[int] = None



# ----------------------------------------------------------------------------- example input


def as_args(example_inputs: Any, model: Optional[nn.Module] = None) -> tuple[Any, ...]:
    """Positional forward arguments from a Tensor, a tuple, or (with ``model``) a dict of keyword
    arguments (``{"pixel_values": x}``), bound to ``model``'s forward with the defaults of the
    parameters before the last one given."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping) and model is not None:
        try:
            bound = inspect.signature(type(model).forward).bind_partial(model, **example_inputs)
        except TypeError as exc:
            raise TypeError(f"example_inputs must be a Tensor or a tuple of forward arguments (or a dict of "
                            f"keyword arguments {type(model).__name__}.forward takes): {exc}") from None
        bound.apply_defaults()
        if bound.kwargs:  # keyword-only or **kwargs parameters cannot be passed by position
            raise TypeError(f"example_inputs must be a Tensor or a tuple of forward arguments: keys "
                            f"{sorted(bound.kwargs)} are keyword-only in {type(model).__name__}.forward")
        return tuple(bound.args[1:])
    raise TypeError(
        f"example_inputs must be a Tensor or a tuple of forward arguments (or a dict of keyword "
        f"arguments), got {type(example_inputs).__name__}"
    )


def _first_tensor(obj: Any, depth: int = 0) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    if depth > 4:
        return None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = _first_tensor(item, depth + 1)
            if t is not None:
                return t
    return None


def _pair(value: Any) -> Optional[tuple[int, int]]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    return None


def _first_conv2d(model: nn.Module) -> Optional[nn.Conv2d]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            return m
    return None


def _declared_input(model: nn.Module) -> tuple[Optional[tuple[int, int, int]], str]:
    """(C, H, W) the model declares, and where that came from; (None, reason) if nothing."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    chw: Optional[tuple[int, int, int]] = None
    source = ""
    if isinstance(cfg, Mapping):
        size = cfg.get("input_size")
        if (
            isinstance(size, (tuple, list))
            and len(size) == 3
            and all(isinstance(v, int) and v > 0 for v in size)
        ):
            chw = (int(size[0]), int(size[1]), int(size[2]))
            source = "pretrained_cfg['input_size']"
    declared = getattr(model, "default_input_size", None)  # plain models (regsurgery:example)
    if chw is None and isinstance(declared, (tuple, list)) and len(declared) == 3:
        chw = (int(declared[0]), int(declared[1]), int(declared[2]))
        source = "default_input_size"
    conv = _first_conv2d(model)
    # A model built with another image size (timm's img_size=, torchvision's image_size) keeps
    # the pretrained cfg of the default one; the size its patch embedding was built for wins.
    for name, m in model.named_modules():
        hw = _pair(getattr(m, "img_size", None)) or _pair(getattr(m, "image_size", None))
        if hw is None:
            continue
        channels = chw[0] if chw else (conv.in_channels if conv is not None else None)
        if channels is None:
            break
        if chw is None or (chw[1], chw[2]) != hw:
            chw = (channels, hw[0], hw[1])
            source = f"the img_size of {name or type(model).__name__}"
        break
    if chw is None and conv is not None:
        chw = (conv.in_channels, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        source = f"the first Conv2d's in_channels at {DEFAULT_IMAGE_SIZE} px"
    if chw is None:
        return None, (
            "it has no timm pretrained_cfg/default_cfg input_size, no img_size and no nn.Conv2d"
        )
    return chw, source


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def infer_example_input(model: nn.Module) -> torch.Tensor:
    """A ``(1, C, H, W)`` input for ``model``: timm's ``pretrained_cfg``/``default_cfg``
    ``input_size`` (or the ``img_size`` a patch embedding was built for), else the first
    ``nn.Conv2d``'s ``in_channels`` at 224 px; a ValueError asking for ``example_inputs``
    otherwise. Values are standard normal from a private generator (the global RNG is untouched),
    on the device and dtype of the model's first floating parameter."""
    chw, source = _declared_input(model)
    if chw is None:
        raise ValueError(
            f"cannot infer an example input for {type(model).__name__}: {source}; pass "
            "example_inputs, e.g. example_inputs=torch.randn(1, 3, 224, 224)"
        )
    device, dtype = _device_dtype(model)
    g = torch.Generator().manual_seed(0)
    return torch.randn((1, *chw), generator=g).to(device=device, dtype=dtype)


def describe_args(args: Sequence[Any]) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"Tensor{tuple(a.shape)}")
        else:
            parts.append(type(a).__name__)
    return "(" + ", ".join(parts) + ")"


def expected_hint(model: nn.Module) -> str:
    chw, source = _declared_input(model)
    if chw is None:
        return "pass example_inputs the model's forward accepts"
    return f"it expects e.g. a tensor of shape {(1, *chw)} ({source})"


# ----------------------------------------------------------------------------- recording


def _shape(t: Optional[torch.Tensor]) -> Optional[tuple[int, ...]]:
    return None if t is None else tuple(int(s) for s in t.shape)


def run_recorded(model: nn.Module, args: tuple[Any, ...]) -> list[ModuleCall]:
    """One eval-mode no-grad forward with hooks on every module; raises what forward raises."""
    calls: list[ModuleCall] = []
    counts: dict[str, int] = {}
    stack: list[int] = []  # start ids of the calls running now, outermost first
    started = [0]

    def pre_hook(module: nn.Module, h_args: Any) -> None:
        stack.append(started[0])
        started[0] += 1

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, h_args: Any, h_kwargs: Any, output: Any) -> None:
            start = stack.pop()
            k = counts.get(name, 0)
            counts[name] = k + 1
            calls.append(
                ModuleCall(
                    name=name,
                    type_name=type(module).__name__,
                    call_index=k,
                    input_shape=_shape(_first_tensor((h_args, h_kwargs))),
                    output_shape=_shape(_first_tensor(output)),
                    start=start,
                    parent=stack[-1] if stack else None,
                )
            )

        return hook

    handles = []
    try:
        # named_modules() yields a module registered under two names once, under its first name.
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(make_hook(name), with_kwargs=True))
        with training_flags(model, False), torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


def record_module_shapes(model: nn.Module, example_inputs: Any = None) -> list[ModuleCall]:
    """Run one forward (eval mode, no grad) and record every module call's shapes.

    ``example_inputs`` is a Tensor or a tuple of forward arguments; None infers one
    (:func:`infer_example_input`). Calls are listed in the order their outputs were produced.
    The model's training flags are restored and the hooks removed, also on error; a forward
    that fails on the example input is a ValueError naming the input and the expected one.
    """
    inferred = example_inputs is None
    args = (infer_example_input(model),) if inferred else as_args(example_inputs, model)
    try:
        return run_recorded(model, args)
    except Exception as exc:
        raise _example_failure(model, args, inferred, exc) from exc


def _example_failure(model: nn.Module, args: tuple[Any, ...], inferred: bool, exc: Exception) -> ValueError:
    what = "the inferred example input" if inferred else "example_inputs"
    return ValueError(
        f"{type(model).__name__} failed on {what} {describe_args(args)} "
        f"({type(exc).__name__}: {str(exc).strip()[:300]}); {expected_hint(model)}"
        + ("; pass example_inputs explicitly" if inferred else "")
    )


def check_example_input(model: nn.Module, example_inputs: Any) -> None:
    """Run one eval-mode, no-grad forward of ``example_inputs`` (a Tensor or a tuple of forward
    arguments); a failure is a ValueError naming the input given and the one the model expects.
    The model's training flags are restored."""
    args = as_args(example_inputs, model)
    try:
        with training_flags(model, False), torch.no_grad():
            model(*args)
    except Exception as exc:
        raise _example_failure(model, args, False, exc) from exc
