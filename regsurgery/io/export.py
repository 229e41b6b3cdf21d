"""Export a (patched) model for inference: strip every regularizer, export, verify.

Each exporter works on a deep copy, so the caller's model keeps its regularizers:
``regsurgery.rewrite.strip`` removes the inserted DropPath / DropBlock modules and restores existing
slot rates, the copy goes to eval mode, and the exported artifact is checked before it is moved
into place (so a failed check leaves no file):

* ONNX: ``torch.onnx.export`` with the dynamo exporter (torch's default since 2.9; the legacy
  TorchScript exporter is used only if the dynamo one fails, and the report says so),
  ``onnx.checker.check_model(full_check=True)``, onnxruntime vs torch on a seeded random input
  (max abs difference), op-type histogram, and a scan (subgraphs and functions included) for
  random or dropout nodes (RandomUniform(Like), RandomNormal(Like), Bernoulli, Dropout,
  Multinomial): an inference graph must hold none.
* TorchScript: ``torch.jit.trace``, saved, reloaded, compared.
* PT2: ``torch.export.export`` + ``torch.export.save``, reloaded, compared.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..progress import Progress
from ..rewrite.apply import strip
from .checkpoint import PathLike, atomic_output

__all__ = [
    "ExportError",
    "ExportReport",
    "RANDOM_ONNX_OPS",
    "strip_for_export",
    "export_onnx",
    "export_torchscript",
    "export_pt2",
    "onnx_random_nodes",
    "onnx_opset_range",
]

#: ONNX op types that draw random numbers or implement dropout; none belongs in an inference graph.
RANDOM_ONNX_OPS = frozenset({
    "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
    "Bernoulli", "Dropout", "Multinomial",
})
#: Substrings of aten / TorchScript op names that draw random numbers or implement dropout.
_RANDOM_ATEN = ("bernoulli", "dropout", "rand", "normal", "multinomial", "poisson", "exponential_",
                "geometric_", "cauchy_", "log_normal_", "uniform_")

Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]


class ExportError(RuntimeError):
    """Export or its verification failed (nothing was written)."""


@dataclass
class ExportReport:
    """What an export produced and how it was checked."""

    format: str
    path: str
    exporter: str
    seconds: float
    max_abs_diff: float
    node_count: int
    op_histogram: dict[str, int] = field(default_factory=dict)
    random_nodes: list[str] = field(default_factory=list)
    opset: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line (what the CLI prints)."""
        head = f"{self.format}: wrote {self.path} ({self.node_count} nodes"
        head += f", opset {self.opset}" if self.opset is not None else ""
        head += f", {self.exporter} exporter, {self.seconds:.1f}s)"
        ops = ", ".join(f"{k} {v}" for k, v in self.op_histogram.items())
        out = [head, f"  max abs diff vs torch: {self.max_abs_diff:.3g}", f"  ops: {ops}",
               f"  random/dropout nodes: {', '.join(self.random_nodes) if self.random_nodes else 'none'}"]
        out += [f"  note: {n}" for n in self.notes]
        return out


# --------------------------------------------------------------------------- helpers
def strip_for_export(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every regsurgery insertion removed, in eval mode."""
    clone = copy.deepcopy(model)
    strip(clone)
    return clone.eval()


def _as_tuple(example_input: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_input):
        return tuple(example_input)
    raise TypeError(f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")


def _flatten(out: Any) -> Iterator[torch.Tensor]:
    """Output tensors in the order exporters flatten them (tuples, lists, dict values)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _flatten(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _flatten(o)
    elif out is not None and not isinstance(out, (int, float, bool, str)):
        raise ExportError(f"cannot compare a model output of type {type(out).__name__}")


def _max_abs_diff(expected: Any, actual: Any, what: str) -> tuple[float, float]:
    """(max |expected - actual|, max |expected|) over all output tensors."""
    exp = [t.detach().float().cpu() for t in _flatten(expected)]
    act = [torch.as_tensor(a).detach().float().cpu() for a in (actual if isinstance(actual, list) else list(_flatten(actual)))]
    if len(exp) != len(act):
        raise ExportError(f"{what} returned {len(act)} outputs, torch returned {len(exp)}")
    diff, scale = 0.0, 0.0
    for i, (e, a) in enumerate(zip(exp, act)):
        if tuple(e.shape) != tuple(a.shape):
            raise ExportError(f"{what} output {i} has shape {tuple(a.shape)}, torch gives {tuple(e.shape)}")
        if e.numel():
            diff = max(diff, float((e - a).abs().max()))
            scale = max(scale, float(e.abs().max()))
    return diff, scale


def _check_close(diff: float, scale: float, tolerance: Optional[float], what: str) -> None:
    # Relative to the output's magnitude (at least 1): logits of a few hundred legitimately differ
    # by ~1e-4 in float32 between runtimes.
    if tolerance is not None and not diff <= tolerance * max(1.0, scale):
        raise ExportError(
            f"{what} disagrees with torch: max abs diff {diff:.3g} > {tolerance:g} x max(1, |output| "
            f"{scale:.3g}); nothing was written"
        )


def _reference(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad():
        return model(*args)


def _histogram(names: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(names).items(), key=lambda kv: (-kv[1], kv[0])))


def _step(progress: Optional[Progress], status: str) -> None:
    if progress is not None:
        progress.step(status)


def _random_aten(names: Iterable[str]) -> list[str]:
    return sorted({n for n in names if any(r in n.lower() for r in _RANDOM_ATEN)})


# --------------------------------------------------------------------------- ONNX
def onnx_opset_range() -> tuple[int, int]:
    """``(lowest, highest)`` ONNX opset the installed torch exporter and onnx package support."""
    try:
        from torch.onnx import _constants as c

        low, high = int(c.ONNX_MIN_OPSET), int(c.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        low, high = 7, 20
    try:
        import onnx

        high = min(high, int(onnx.defs.onnx_opset_version()))
    except ImportError:
        pass
    return low, high


def _onnx_nodes(graph: Any) -> Iterator[Any]:
    """Every node of an ONNX graph, descending into If / Loop / Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _onnx_nodes(attr.g)
            for g in attr.graphs:
                yield from _onnx_nodes(g)


def _onnx_false_constants(model_proto: Any) -> set[str]:
    """Names of scalar boolean constants that are false (initializers and Constant nodes)."""
    from onnx import numpy_helper

    out: set[str] = set()
    tensors = [(t.name, t) for t in model_proto.graph.initializer]
    tensors += [(n.output[0], a.t) for n in _onnx_nodes(model_proto.graph) if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for name, t in tensors:
        try:
            arr = numpy_helper.to_array(t)
        except Exception:  # noqa: BLE001
            continue
        if arr.size == 1 and not bool(arr.reshape(-1)[0]):
            out.add(name)
    return out


def _inactive_dropout(node: Any, false_names: set[str]) -> bool:
    """An ONNX Dropout that is the identity at inference: no ``training_mode`` input (or a
    constant false one), so it draws no random numbers."""
    if node.op_type != "Dropout":
        return False
    return len(node.input) < 3 or not node.input[2] or node.input[2] in false_names


def onnx_random_nodes(model_proto: Any) -> list[str]:
    """``"name (OpType)"`` of every node that draws random numbers at inference, in the graph, its
    subgraphs and its local functions. A Dropout in inference mode (no ``training_mode`` input, or
    a constant false one) is the identity and is not listed."""
    false_names = _onnx_false_constants(model_proto)
    nodes = list(_onnx_nodes(model_proto.graph))
    for fn in model_proto.functions:
        nodes += list(fn.node)
    found = [n for n in nodes if n.op_type in RANDOM_ONNX_OPS and not _inactive_dropout(n, false_names)]
    return [f"{n.name or '?'} ({n.op_type})" for n in found]


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); "
                          f"pip install regsurgery[onnx]") from e
    return onnx, onnxruntime


def _torch_onnx_export(model: nn.Module, args: tuple[torch.Tensor, ...], path: str,
                       opset: Optional[int], dynamo: bool, dynamic_batch: bool = False) -> None:
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    kwargs: dict[str, Any] = dict(input_names=names, opset_version=opset, dynamo=dynamo, verbose=False)
    if dynamo:
        kwargs.update(external_data=False, optimize=True)
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1)
            kwargs["dynamic_shapes"] = tuple({0: batch} if a.dim() else None for a in args)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n, a in zip(names, args) if a.dim()}
    with warnings.catch_warnings():
        # The legacy exporter is deprecated; using it is our decision, reported in the notes.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(model, args, path, **kwargs)


def export_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: PathLike,
    opset: Optional[int] = None,
    *,
    tolerance: Optional[float] = 1e-3,
    inputs: Iterable[Optional[PathLike]] = (),
    progress: Optional[Progress] = None,
    dynamic_batch: bool = True,
) -> ExportReport:
    """Strip, export to ONNX at ``path``, check, and compare with torch.

    Args:
        model: the model (patched or not; it is not modified).
        example_input: a tensor (or tuple) with the export shape; its values are replaced by a
            seeded standard normal draw for the comparison.
        opset: ONNX opset (``None``: the exporter's default).
        tolerance: allowed max abs difference relative to ``max(1, max |output|)``; ``None``
            disables the check.
        inputs: paths that must not be overwritten.
        progress: optional bar, advanced once per step (4 steps).
        dynamic_batch: the first dimension of every input (and output) is a symbolic ``batch``;
            onnxruntime is checked at two batch sizes. ``False`` fixes the example's batch.

    Raises ExportError (nothing written) when the checker fails, the graph holds a random or
    dropout node, or onnxruntime disagrees with torch beyond ``tolerance``.
    """
    onnx, ort = _require_onnx()
    start = time.monotonic()
    _step(progress, "stripping")
    clone = strip_for_export(model)
    args = _random_like(example_input)
    if dynamic_batch and any(a.dim() for a in args):
        # A batch of 1 is specialised by the tracer (0/1 specialisation): export at batch >= 2.
        args = _random_like(tuple(_with_batch(a, max(2, a.shape[0] if a.dim() else 1)) for a in args))
    expected = _reference(clone, args)
    notes: list[str] = []
    path = os.fspath(path)
    with atomic_output(path, inputs) as tmp:
        _step(progress, "exporting to ONNX")
        exporter = "dynamo"
        try:
            _torch_onnx_export(clone, args, tmp, opset, dynamo=True, dynamic_batch=dynamic_batch)
        except Exception as e:  # noqa: BLE001  (any exporter failure: try the legacy one, say so)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            notes.append(f"the dynamo exporter failed ({type(e).__name__}: {first}); "
                         f"used the legacy TorchScript exporter (dynamo=False)")
            exporter = "legacy"
            try:
                _torch_onnx_export(clone, args, tmp, opset, dynamo=False, dynamic_batch=dynamic_batch)
            except Exception as e2:
                raise ExportError(f"ONNX export failed with both exporters: dynamo: {first}; "
                                  f"legacy: {type(e2).__name__}: {str(e2).strip()[:200]}") from e2
        _step(progress, "checking")
        proto = onnx.load(tmp)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported graph: {str(e).strip()[:300]}") from e
        random_nodes = onnx_random_nodes(proto)
        if random_nodes:
            raise ExportError(f"the exported graph holds random/dropout nodes ({', '.join(random_nodes[:5])}); "
                              f"nothing was written")
        _step(progress, "running onnxruntime")
        try:
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
            actual = session.run(None, feeds)
        except Exception as e:
            raise ExportError(f"onnxruntime cannot run the exported graph: {str(e).strip()[:300]}") from e
        diff, scale = _max_abs_diff(expected, list(actual), "onnxruntime")
        _check_close(diff, scale, tolerance, "onnxruntime")
        if dynamic_batch and any(a.dim() for a in args):
            # A second batch size: the batch dimension must really be free.
            other = _random_like(tuple(_with_batch(a, a.shape[0] + 1) if a.dim() else a for a in args))
            expected2 = _reference(clone, other)
            try:
                feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), other)}
                actual2 = session.run(None, feeds)
            except Exception as e:
                raise ExportError(f"the exported ONNX graph does not take a batch of {other[0].shape[0]} "
                                  f"({str(e).strip()[:200]}); export with --static (dynamic_batch=False)") from e
            diff2, scale2 = _max_abs_diff(expected2, list(actual2), "onnxruntime")
            _check_close(diff2, scale2, tolerance, "onnxruntime")
            diff = max(diff, diff2)
            notes.append(f"dynamic batch: checked with onnxruntime at batch {args[0].shape[0]} and "
                         f"{other[0].shape[0]}")
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return ExportReport(
        format="onnx", path=path, exporter=exporter, seconds=time.monotonic() - start,
        max_abs_diff=diff, node_count=len(proto.graph.node),
        op_histogram=_histogram(n.op_type for n in proto.graph.node), random_nodes=random_nodes,
        opset=opset_found, notes=notes,
    )


def _with_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t[:1].expand(batch, *t.shape[1:]).contiguous() if t.shape[0] >= 1 else t


def _live_random_ts(nodes: Iterable[Any]) -> list[str]:
    """Random / dropout TorchScript ops that still draw numbers (a dropout with a constant
    ``train=False`` is the identity and is left out)."""
    found = []
    for n in nodes:
        kind = n.kind()
        if not kind.startswith("aten::") or not any(r in kind.lower() for r in _RANDOM_ATEN):
            continue
        if "dropout" in kind:
            ins = list(n.inputs())
            train = ins[-1].toIValue() if ins else None
            if train is False:
                continue
        found.append(kind)
    return sorted(set(found))


def _live_random_fx(nodes: Iterable[Any]) -> list[str]:
    """Random / dropout ops of an exported program that still draw numbers at inference."""
    found = []
    for n in nodes:
        if n.op != "call_function":
            continue
        name = str(getattr(n.target, "__name__", n.target))
        if not any(r in name.lower() for r in _RANDOM_ATEN):
            continue
        if "dropout" in name:
            train = n.kwargs.get("train", n.args[2] if len(n.args) > 2 else None)
            if train is False or (len(n.args) > 1 and n.args[1] == 0):
                continue
        found.append(name)
    return sorted(set(found))


def _write_buffer(save: Any, tmp: str, what: str) -> None:
    """Serialise into memory, then write the bytes with Python: a full disk or a file-size limit
    then fails as an OSError (the temp file is removed by atomic_output) instead of aborting in
    torch's C++ writer."""
    import io

    buf = io.BytesIO()
    save(buf)
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
    except OSError as e:
        raise ExportError(f"cannot write the {what}: {e.strerror or e} ({len(buf.getbuffer())} bytes)") from e


def _random_like(example_input: Inputs) -> tuple[torch.Tensor, ...]:
    # Seeded, so a reported difference can be reproduced; integer inputs (token ids) are kept.
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in _as_tuple(example_input):
        if t.is_floating_point():
            out.append(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device))
        else:
            out.append(t)
    return tuple(out)


# --------------------------------------------------------------------------- TorchScript / PT2
def export_torchscript(
    model: nn.Module,
    example_input: Inputs,
    path: PathLike,
    *,
    tolerance: Optional[float] = 1e-4,
    inputs: Iterable[Optional[PathLike]] = (),
    progress: Optional[Progress] = None,
) -> ExportReport:
    """Strip, ``torch.jit.trace`` in eval mode, save to ``path``, reload and compare with torch."""
    start = time.monotonic()
    _step(progress, "stripping")
    clone = strip_for_export(model)
    args = _random_like(example_input)
    expected = _reference(clone, args)
    notes: list[str] = []
    path = os.fspath(path)
    with atomic_output(path, inputs) as tmp:
        _step(progress, "tracing (TorchScript)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                traced = torch.jit.trace(clone, args, check_trace=False)
            _step(progress, "saving")
            _write_buffer(lambda buf: torch.jit.save(traced, buf), tmp, "TorchScript file")
            _step(progress, "verifying")
            loaded = torch.jit.load(tmp, map_location="cpu")
            with torch.no_grad():
                actual = loaded(*args)
        for w in caught:
            text = str(w.message).splitlines()[0][:160] if str(w.message) else ""
            if isinstance(w.message, torch.jit.TracerWarning):  # data-dependent Python, frozen
                notes.append(f"tracer: {text}")
            elif issubclass(w.category, FutureWarning) and "torch.jit" in text:
                notes.append(f"torch {torch.__version__} deprecates TorchScript; --pt2 (torch.export) is its successor")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        diff, scale = _max_abs_diff(expected, actual, "the TorchScript module")
        _check_close(diff, scale, tolerance, "the TorchScript module")
        kinds = [n.kind() for n in loaded.inlined_graph.nodes()]
        random_nodes = _live_random_ts(loaded.inlined_graph.nodes())
        if random_nodes:
            raise ExportError(f"the TorchScript graph holds random/dropout ops ({', '.join(random_nodes)})")
    ops = [k.split("::", 1)[1] for k in kinds if k.startswith("aten::")]
    return ExportReport(
        format="torchscript", path=path, exporter="torch.jit.trace", seconds=time.monotonic() - start,
        max_abs_diff=diff, node_count=len(ops), op_histogram=_histogram(ops),
        random_nodes=random_nodes, notes=list(dict.fromkeys(notes)),
    )


def export_pt2(
    model: nn.Module,
    example_input: Inputs,
    path: PathLike,
    *,
    tolerance: Optional[float] = 1e-4,
    inputs: Iterable[Optional[PathLike]] = (),
    progress: Optional[Progress] = None,
) -> ExportReport:
    """Strip, ``torch.export.export`` in eval mode, ``torch.export.save`` to ``path`` (a ``.pt2``
    archive), reload and compare with torch."""
    start = time.monotonic()
    _step(progress, "stripping")
    clone = strip_for_export(model)
    args = _random_like(example_input)
    expected = _reference(clone, args)
    path = os.fspath(path)
    with atomic_output(path, inputs) as tmp:
        _step(progress, "torch.export")
        try:
            program = torch.export.export(clone, args)
        except Exception as e:
            raise ExportError(f"torch.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
        _step(progress, "saving")
        _write_buffer(lambda buf: torch.export.save(program, buf), tmp, "torch.export archive")
        _step(progress, "verifying")
        with open(tmp, "rb") as f:  # a file object: the temp name does not end in .pt2
            loaded = torch.export.load(f)
        with torch.no_grad():
            actual = loaded.module()(*args)
        diff, scale = _max_abs_diff(expected, actual, "the torch.export program")
        _check_close(diff, scale, tolerance, "the torch.export program")
        ops = [
            str(getattr(n.target, "__name__", n.target))
            for n in loaded.graph_module.graph.nodes if n.op == "call_function"
        ]
        random_nodes = _live_random_fx(loaded.graph_module.graph.nodes)
        if random_nodes:
            raise ExportError(f"the exported program holds random/dropout ops ({', '.join(random_nodes)})")
    return ExportReport(
        format="pt2", path=path, exporter="torch.export", seconds=time.monotonic() - start,
        max_abs_diff=diff, node_count=len(ops), op_histogram=_histogram(ops), random_nodes=random_nodes,
    )
