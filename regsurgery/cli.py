"""``regsurgery inspect | patch | export``: the command-line face of the library.

::

    regsurgery inspect [MODEL] [--input-shape 1,3,224,224] [--format table|json] [--plot FILE]
    regsurgery patch   [MODEL] [--checkpoint IN] --drop-path 0.1 [--schedule linear|uniform]
                               [--drop-block 0.1 --block-size 7 --stages 3,4] [--plan FILE] --out OUT
    regsurgery export  [MODEL-or-OUT] [--checkpoint CKPT] --onnx FILE [--torchscript FILE]
                               [--pt2 FILE] [--input-shape ...] [--opset N] [--static]

A patched file given as MODEL is data: it may name only registered builders (timm, torchvision,
regsurgery, hf:DIR, ``regsurgery.register_builder``) unless ``--trust-code``; its plan may only insert
regsurgery's regularizers and set regularizer rates (``regsurgery/trust.py``).

MODEL is ``timm:NAME``, ``torchvision:NAME``, ``package.module:callable`` (``--kwargs JSON``) or a
patched file written by ``patch``; it defaults to the built-in ``regsurgery:example``, so every
command runs with no files. Nothing is downloaded.

Errors print one line (``regsurgery: error: ...``) and exit with 1, or 2 for bad usage (bad
arguments, an unknown model, an output that would overwrite an input); ``--debug`` adds the
traceback. Outputs are written atomically and only after they were checked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect as pyinspect
import io
import json
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ._version import __version__
from .analysis.residual import residual_report
from .analysis.stages import find_conv_stages
from .api import (
    STAGE_NUMBERING,
    NoSitesError,
    StageIndexError,
    plan_dropblock,
    plan_stochastic_depth,
    residual_stages,
)
from .api_dropout import DROPOUT_WHERE, plan_dropout
from .api_layerdrop import keep_indices, prune_layers
from .capture.examples import check_example_input
from .capture.model import ModelCapture, capture_model
from .io.checkpoint import (
    OutputPathError,
    atomic_output,
    atomic_write_bytes,
    build_from_recipe,
    check_output_path,
    load_patched,
    load_state_dict_file,
    load_weights_into,
    plan_from_recipe,
    read_patched,
    save_patched,
    versions,
)
from .io.export import export_onnx, export_pt2, export_torchscript, onnx_opset_range
from .io.modelspec import (
    DEFAULT_SPEC,
    ModelSpecError,
    build_model,
    default_input_shape,
    parse_kwargs,
)
from .ops import check_rate
from .plan import Plan
from .progress import Progress
from .rewrite.apply import apply_plan

__all__ = ["main", "build_parser", "UsageError"]

PROG = "regsurgery"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage + error and exits; we want one line and the caller's exit handling.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- argument types
def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1], got {text!r}") from None
    try:
        return check_rate("rate", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1], got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,3,224,224, got {text!r}")
    return shape


def _stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        stages = ()
    if not stages or 0 in stages:
        raise argparse.ArgumentTypeError(
            f"expected stage numbers like 3,4 (residual stages, 1-based: ResNet layer3,layer4) or -2,-1 "
            f"(from the last), got {text!r}"
        )
    return stages


def _where(text: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items or any(i not in ("branch", "skip") for i in items):
        raise argparse.ArgumentTypeError(f"expected branch, skip or branch,skip, got {text!r}")
    return items


# --------------------------------------------------------------------------- parser
def _dropout_where(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in DROPOUT_WHERE]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(DROPOUT_WHERE)}, got {text!r}")
    return items


def _keep(text: str) -> Any:
    """--keep: every_other, a fraction in (0, 1], or comma-separated block indices."""
    if text == "every_other":
        return text
    try:
        if "," in text or text.lstrip("-").isdigit():
            return [int(t) for t in text.split(",") if t.strip()]
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be every_other, a fraction in (0, 1] or comma-separated indices, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text!r}")
    return value


def _model_arg(p: argparse.ArgumentParser, patched_ok: bool) -> None:
    extra = " or a file written by 'regsurgery patch'" if patched_ok else ""
    p.add_argument("model", nargs="?", default=DEFAULT_SPEC, metavar="MODEL",
                   help=f"timm:NAME, torchvision:NAME, package.module:callable{extra} "
                        f"(default: the built-in {DEFAULT_SPEC})")
    p.add_argument("--kwargs", metavar="JSON", help='keyword arguments for the model, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (default: the model's own, else 224 px)")
    if patched_ok:
        p.add_argument("--trust-code", action="store_true",
                       help="let a patched file name any package.module:callable as its model builder "
                            "(runs code chosen by the file; by default only timm, torchvision, regsurgery, "
                            "hf:DIR and registered builders are called)")


def _weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="FILE",
                   help=".pt/.pth (weights_only) or .safetensors; weights at the top level or under "
                        "state_dict / model / model_ema; a DDP 'module.' prefix is removed")
    p.add_argument("--checkpoint-key", metavar="KEY", help="take the weights from this entry (e.g. model_ema)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a checkpoint that needs full unpickling (runs code from the file)")


def _plan_args(p: argparse.ArgumentParser, drop_path_default: Optional[float]) -> None:
    g = p.add_argument_group("stochastic depth (DropPath)")
    g.add_argument("--drop-path", type=_rate, default=drop_path_default, metavar="RATE",
                   help="rate of the deepest residual block; 0 turns it off"
                        + (f" (default {drop_path_default})" if drop_path_default else ""))
    g.add_argument("--schedule", choices=("linear", "uniform"), default="linear",
                   help="rate by depth: linear 0 -> RATE (Huang et al. 2016) or uniform RATE (default linear)")
    g.add_argument("--depth", choices=("blocks", "sites"), default="blocks",
                   help="what a depth counts: every stacked block, residual or not, as timm and "
                        "torchvision do (blocks, default), or only blocks with a residual site (sites)")
    g.add_argument("--mode", choices=("row", "batch"), default="row",
                   help="one drop decision per sample (row) or per mini-batch (batch)")
    g.add_argument("--include", action="append", metavar="PATTERN",
                   help="only residual blocks whose scope matches (shell pattern, repeatable); "
                        "SCOPE:ADD names one add and forces in one the rules rejected (see inspect --verbose)")
    g.add_argument("--exclude", action="append", metavar="PATTERN", help="skip matching blocks (repeatable)")
    g = p.add_argument_group("DropBlock")
    g.add_argument("--drop-block", type=_rate, default=0.0, metavar="RATE", help="drop rate; 0 (default) turns it off")
    g.add_argument("--block-size", type=_positive_int, default=7, metavar="N", help="block size (default 7)")
    g.add_argument("--stages", type=_stages, default=None, metavar="LIST",
                   help="residual stages (groups of residual blocks at one resolution; ResNet layer1..layer4 "
                        "are 1..4, the stem is not counted), 1-based or negative from the last "
                        "(default -2,-1); needs --drop-block")
    g.add_argument("--where", type=_where, default=("branch", "skip"), metavar="LIST",
                   help="branch, skip or both (default branch,skip: the paper's placement)")
    g.add_argument("--per-channel", action="store_true", help="one mask per channel instead of one shared")
    g = p.add_argument_group("Dropout (hidden MLP layers)")
    g.add_argument("--dropout", type=_rate, default=0.0, metavar="RATE", help="drop rate; 0 (default) turns it off")
    g.add_argument("--dropout-where", type=_dropout_where, default=("mlp",), metavar="LIST",
                   help="mlp (hidden activations, default) and/or head (classifier input), comma-separated")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")

    parser = _Parser(prog=PROG, description="Structured regularization (DropPath, DropBlock) for any "
                     "PyTorch model, by torch.fx graph surgery.", parents=[common])
    parser.add_argument("--version", action="version",
                        version=f"regsurgery {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="{inspect,patch,export,prune}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", parents=[common], help="residual sites, conv stages and the planned rates",
                       description="List the residual sites (scope, depth, planned rate) and the conv stages.")
    _model_arg(p, patched_ok=True)
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.add_argument("--plot", metavar="FILE", help="write the planned rate per site over depth (.png, .svg or .pdf)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also list every add that was considered and rejected, with the rule and reason")
    _plan_args(p, drop_path_default=0.1)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("patch", parents=[common], help="plan regularizers and write weights + recipe",
                       description="Write OUT: the weights unchanged plus a plain-data recipe (model spec, "
                                   "per-site plan, versions); regsurgery.load(OUT) rebuilds the patched model.")
    _model_arg(p, patched_ok=True)
    _weights_args(p)
    _plan_args(p, drop_path_default=None)
    p.add_argument("--plan", metavar="FILE",
                   help="apply this plan (JSON: what 'inspect --format json' prints, or Plan.to_json()) "
                        "instead of planning from --drop-path / --drop-block; it is validated as data")
    p.add_argument("--out", required=True, metavar="OUT", help="output file (.pt, or .safetensors)")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("export", parents=[common], help="strip regularizers and export (ONNX, TorchScript, PT2)",
                       description="Strip every regularizer, export, verify against torch.")
    _model_arg(p, patched_ok=True)
    _weights_args(p)
    p.add_argument("--onnx", metavar="FILE", help="ONNX file (checked with onnx.checker and onnxruntime)")
    p.add_argument("--opset", type=_positive_int, metavar="N",
                   help="ONNX opset (default: the exporter's; checked against the range it supports)")
    p.add_argument("--static", action="store_true",
                   help="ONNX: fix the batch dimension to the example's (default: a dynamic batch)")
    p.add_argument("--torchscript", metavar="FILE", help="TorchScript file (torch.jit.trace)")
    p.add_argument("--pt2", metavar="FILE", help="torch.export archive (.pt2)")
    p.add_argument("--tolerance", type=_positive_float, default=1e-3, metavar="TOL",
                   help="max abs difference allowed vs torch, relative to max(1, |output|) (default 1e-3)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("prune", parents=[common], help="remove blocks of layer stacks (LayerDrop pruning)",
                       description="Keep a subset of the blocks of every stack of repeated residual blocks "
                                   "(Fan et al. 2020) and write OUT: the smaller model's weights plus a recipe; "
                                   "regsurgery.load(OUT) rebuilds it.")
    _model_arg(p, patched_ok=True)
    _weights_args(p)
    p.add_argument("--keep", type=_keep, default="every_other", metavar="RULE",
                   help="every_other (default), a fraction in (0, 1], or block indices like 0,2,4")
    p.add_argument("--include", action="append", metavar="PATTERN", help="only stacks matching (repeatable)")
    p.add_argument("--out", required=True, metavar="OUT", help="output file (.pt, or .safetensors)")
    p.set_defaults(func=cmd_prune)
    return parser


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--stages -2,-1`` -> ``--stages=-2,-1``: argparse takes ``-2,-1`` for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-\d+(,\s*-?\d+)+", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


# --------------------------------------------------------------------------- model resolution
@dataclass
class _Resolved:
    model: nn.Module
    spec: str
    kwargs: dict[str, Any]
    recipe: Optional[dict[str, Any]]
    patched_file: Optional[str]
    input_shape: tuple[int, ...]
    example: Optional[torch.Tensor] = None  # a model's own example (HF token ids), else random

    @property
    def inputs(self) -> list[Optional[str]]:
        return [self.patched_file]


def _looks_like_file(model: str) -> bool:
    if _is_hf_dir(model):
        return False
    return os.path.exists(model) or (":" not in model and model.lower().endswith(_CHECKPOINT_SUFFIXES))


def _is_hf_dir(model: str) -> bool:
    """A local HuggingFace model directory (``save_pretrained`` output): read as ``hf:DIR``."""
    return os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json"))


def _own_example(model: nn.Module) -> Optional[torch.Tensor]:
    """The main input of a model that declares one (HF ``dummy_inputs[main_input_name]``: token ids,
    pixel values or audio), so that models fed integers get integers."""
    dummy = getattr(model, "dummy_inputs", None)
    name = getattr(model, "main_input_name", None)
    if isinstance(dummy, dict) and isinstance(name, str) and isinstance(dummy.get(name), torch.Tensor):
        return dummy[name].detach().clone()
    return None


def _resolve(args: argparse.Namespace, apply_stored_plan: bool) -> _Resolved:
    """Build the model named by MODEL (a spec or a patched file), with weights and input shape."""
    recipe: Optional[dict[str, Any]] = None
    patched_file: Optional[str] = None
    if _looks_like_file(args.model):
        if not os.path.isfile(args.model):
            raise UsageError(f"{args.model} does not exist (MODEL is a model spec like timm:resnet50 "
                             f"or a file written by 'regsurgery patch')")
        if args.kwargs:
            raise UsageError("--kwargs cannot be combined with a patched file (its recipe holds the kwargs)")
        if getattr(args, "checkpoint", None):
            raise UsageError("--checkpoint cannot be combined with a patched file (it holds its weights)")
        patched_file = args.model
        trust = bool(getattr(args, "trust_code", False))
        if apply_stored_plan:
            model, recipe = load_patched(patched_file, trust_code=trust)
        else:
            state_dict, recipe = read_patched(patched_file)
            model = build_from_recipe(recipe, patched_file, trust, state_dict)
            plan_from_recipe(recipe, model, patched_file)  # refuse a bad plan whatever the command
        spec, kwargs = recipe["model"], dict(recipe.get("kwargs") or {})
    else:
        spec = f"hf:{args.model}" if _is_hf_dir(args.model) else args.model
        kwargs = parse_kwargs(args.kwargs)
        model = build_model(spec, kwargs)
        if getattr(args, "checkpoint", None):
            state_dict = load_state_dict_file(args.checkpoint, trust_pickle=args.trust_pickle,
                                              key=args.checkpoint_key)
            load_weights_into(model, state_dict, source=args.checkpoint)
        elif getattr(args, "checkpoint_key", None):
            raise UsageError("--checkpoint-key needs --checkpoint")
    own = None if args.input_shape else _own_example(model)
    if args.input_shape:
        shape = tuple(args.input_shape)
    elif own is not None:
        shape = tuple(own.shape)
    elif recipe and recipe.get("input_shape"):
        shape = tuple(int(s) for s in recipe["input_shape"])
    else:
        shape = default_input_shape(model, spec)
    return _Resolved(model, spec, kwargs, recipe, patched_file, shape, own)


def _example(shape: tuple[int, ...], batch: Optional[int] = None) -> torch.Tensor:
    if batch is not None:
        shape = (max(batch, shape[0]), *shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _example_of(r: _Resolved, batch: Optional[int] = None) -> torch.Tensor:
    """The model's own example (repeated to ``batch`` rows) or a random one of ``r.input_shape``."""
    if r.example is None:
        return _example(r.input_shape, batch)
    x = r.example
    if batch is not None and x.shape[0] < batch:
        x = x.repeat(-(-batch // x.shape[0]), *([1] * (x.dim() - 1)))[:batch]
    return x


def _checked_example(r: _Resolved) -> torch.Tensor:
    """The example input for ``r.input_shape``, after one eval forward showed the model takes it:
    a wrong ``--input-shape`` fails here, naming the shape given and the one expected."""
    x = _example_of(r)
    check_example_input(r.model, x)
    return x


def _call_accepting(fn: Any, *args: Any, optional: Optional[dict[str, Any]] = None, **kwargs: Any) -> Any:
    """Call ``fn``, passing ``optional`` keywords only where its signature takes them (reuse of
    already-computed analysis results: an optimisation, never a requirement)."""
    params = pyinspect.signature(fn).parameters
    extra = {k: v for k, v in (optional or {}).items() if k in params}
    return fn(*args, **kwargs, **extra)


def _make_plan(model: nn.Module, args: argparse.Namespace, x: torch.Tensor, sites: Any = None,
               notes: Optional[list[str]] = None, capture: Optional[ModelCapture] = None) -> Any:
    """The plan the options ask for (None when every rate is 0). With ``notes`` (inspect), a part
    that finds no place to go is noted there instead of failing the command. DropPath and
    DropBlock plan on one capture of the model (``capture``, made here when not given)."""
    if capture is None and (args.drop_path or args.drop_block):
        capture = capture_model(model, x)
    parts = []
    if args.drop_path:
        parts.append(lambda: _call_accepting(
            plan_stochastic_depth, model, args.drop_path, schedule=args.schedule, mode=args.mode,
            include=args.include, exclude=args.exclude,
            optional={"sites": None if _forces(args.include) else sites, "depth": getattr(args, "depth", "blocks"),
                      "capture": capture},
        ))
    if args.drop_block:
        parts.append(lambda: _call_accepting(
            plan_dropblock, model, args.drop_block, block_size=args.block_size, stages=_stages_of(args),
            where=tuple(args.where), example_inputs=x, optional={"per_channel": args.per_channel, "capture": capture},
        ))
    if getattr(args, "dropout", 0.0):
        parts.append(lambda: plan_dropout(model, args.dropout, where=tuple(args.dropout_where),
                                          include=args.include, exclude=args.exclude))
    plan = None
    for make in parts:
        try:
            part = make()
        except NoSitesError as e:
            if notes is None:
                raise
            notes.append(str(e))
            continue
        plan = part if plan is None else plan + part
    return plan


def _forces(include: Optional[list[str]]) -> bool:
    """Does an --include pattern name one add (SCOPE:ADD)? Then sites are found again with it."""
    return any(":" in p for p in include or [])


def _stages_of(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(args.stages) if args.stages is not None else (-2, -1)


def _check_plan_options(args: argparse.Namespace) -> None:
    """Options that only mean something together (exit 2 when they are not)."""
    if args.stages is not None and not args.drop_block:
        raise UsageError("--stages chooses where DropBlock goes; give --drop-block RATE too")


# --------------------------------------------------------------------------- inspect
def _residual_numbers(stages: list[Any]) -> dict[int, int]:
    """Conv stage index -> the residual stage number ``--stages`` takes."""
    return {st.index: k for k, st in enumerate(residual_stages(stages), 1)}


def _site_rows(sites: list[Any], stages: list[Any], plan: Any) -> list[dict[str, Any]]:
    number = _residual_numbers(stages)
    stage_of: dict[int, int] = {}
    for st in stages:
        for s in st.sites:
            if st.index in number:
                stage_of.setdefault(s.index, number[st.index])
    rows = []
    # Dropout ops (roles hidden / head) are not on residual sites.
    ops = [op for op in plan.ops if op.role not in ("hidden", "head")] if plan is not None else []
    for s in sites:
        mine = [op for op in ops if getattr(op, "site", None) == s.index
                or (getattr(op, "site", None) is None and op.scope == s.scope)]
        dp = [op.params.p for op in mine if op.kind in ("drop_path", "set_rate")]
        db = [op for op in mine if op.kind == "drop_block"]
        rows.append({
            "index": s.index, "scope": s.scope, "depth": s.depth, "kind": s.kind,
            "existing": s.existing, "stage": stage_of.get(s.index),
            "drop_path": dp[0] if dp else None,
            "drop_block": db[0].params.p if db else None,
            "drop_block_ops": len(db),
            "block_size": db[0].params.block_size if db else None,
        })
    return rows


def _stage_rows(stages: list[Any]) -> list[dict[str, Any]]:
    number = _residual_numbers(stages)
    return [{
        "index": st.index, "stage": number.get(st.index), "reduction": st.reduction, "channels": st.channels, "size": list(st.size),
        "layout": getattr(st, "layout", None), "sites": [s.scope for s in st.sites],
        "scopes": list(st.scopes),
    } for st in stages]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _fmt_rate(p: Optional[float]) -> str:
    return "-" if p is None else f"{p:.3f}"


def _plan_summary(args: argparse.Namespace, recipe: Optional[dict[str, Any]]) -> str:
    if recipe is not None:
        return "plan stored in the patched file"
    parts = []
    if args.drop_path:
        parts.append(f"DropPath {args.drop_path:g} ({args.schedule}, {args.mode})")
    if args.drop_block:
        parts.append(f"DropBlock {args.drop_block:g} (block {args.block_size}, residual stages "
                     f"{','.join(str(s) for s in _stages_of(args))}, {'+'.join(args.where)})")
    if getattr(args, "dropout", 0.0):
        parts.append(f"Dropout {args.dropout:g} ({'+'.join(args.dropout_where)})")
    return "planned " + ", ".join(parts) if parts else "nothing planned (all rates 0)"


def _plot_format(path: str) -> str:
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise UsageError(f"--plot {path}: the file must end in .png, .svg or .pdf")
    return fmt


def _write_plot(path: str, rows: list[dict[str, Any]], stage_rows: list[dict[str, Any]], title: str,
                inputs: list[Optional[str]]) -> None:
    fmt = _plot_format(path)
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib; pip install regsurgery[plot]") from e
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    groups: dict[Optional[int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["stage"], []).append(r)
    info = {s["stage"]: s for s in stage_rows if s["stage"] is not None}
    for stage, members in groups.items():
        if stage in info:
            s = info[stage]
            label = f"stage {stage}: stride {s['reduction']}, {s['channels']} ch, {s['size'][0]}x{s['size'][1]}"
        else:
            label = "no conv stage"
        xs = [r["depth"] for r in members]
        line = ax.plot(xs, [r["drop_path"] or 0.0 for r in members], "o-", label=f"{label} (DropPath)")[0]
        blocks = [r for r in members if r["drop_block"] is not None]
        if blocks:
            ax.plot([r["depth"] for r in blocks], [r["drop_block"] for r in blocks], "s", mfc="none",
                    color=line.get_color(), ms=9, label=f"stage {stage} (DropBlock)")
        ax.axvspan(min(xs) - 0.4, max(xs) + 0.4, alpha=0.06, color=line.get_color())
    ax.set_xlabel("residual block depth")
    ax.set_ylabel("planned drop rate")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write_bytes(buf.getvalue(), path, inputs)


def cmd_inspect(args: argparse.Namespace) -> int:
    _check_plan_options(args)
    if args.plot:  # fail before the slow part
        _plot_format(args.plot)
        check_output_path(args.plot, [args.model])
    with Progress(total=4, desc="inspect") as bar:
        bar.step("building the model")
        r = _resolve(args, apply_stored_plan=False)
        x = _checked_example(r)  # a wrong --input-shape fails here, naming the expected one
        bar.step("finding residual sites")
        capture = capture_model(r.model, x)  # one capture: sites, then the plan
        report = residual_report(capture, force=[p for p in args.include or [] if ":" in p])
        sites = report.sites
        bar.step("finding conv stages")
        try:
            stages = _call_accepting(find_conv_stages, r.model, x, optional={"sites": sites})
        except ValueError as e:  # no image input (token ids, audio): no conv stages, say why
            if args.drop_block:
                raise
            stages = []
            stage_note = f"no conv stages: {str(e).splitlines()[0][:160]}"
        else:
            stage_note = ""
        bar.step("planning")
        notes: list[str] = [stage_note] if stage_note else []
        plan = (plan_from_recipe(r.recipe, r.model, r.patched_file or "recipe") if r.recipe
                else _make_plan(r.model, args, x, sites, notes, capture))
    rows = _site_rows(sites, stages, plan)
    stage_rows = _stage_rows(stages)
    shape = "x".join(str(s) for s in r.input_shape)
    title = f"{r.spec}  ({type(r.model).__name__}, input {shape})"
    if args.plot:
        _write_plot(args.plot, rows, stage_rows, f"{title}\n{_plan_summary(args, r.recipe)}", r.inputs)
    if args.format == "json":
        doc = {
            "model": r.spec, "kwargs": r.kwargs, "class": type(r.model).__name__,
            "input_shape": list(r.input_shape), "sites": rows, "stages": stage_rows,
            "plan": plan.to_dict() if plan is not None else None, "notes": notes,
        }
        if args.verbose:
            doc["rejected"] = [x.to_dict() for x in report.rejected]
        print(json.dumps(doc, indent=2))
    else:
        print(title)
        print(f"residual sites: {len(rows)}; {_plan_summary(args, r.recipe)}")
        if rows:
            print(_table(
                ["#", "scope", "depth", "kind", "stage", "drop_path", "drop_block", "existing slot"],
                [[str(x["index"]), x["scope"] or "<root>", str(x["depth"]), x["kind"],
                  "-" if x["stage"] is None else str(x["stage"]), _fmt_rate(x["drop_path"]),
                  "-" if x["drop_block"] is None else f"{x['drop_block']:.3f} x{x['drop_block_ops']}",
                  x["existing"] or "-"] for x in rows],
            ))
        print(f"conv stages: {len(stage_rows)}; 'stage' is the number --stages takes ({STAGE_NUMBERING})")
        if stage_rows:
            print(_table(
                ["stage", "conv stage", "reduction", "channels", "size", "sites"],
                [["-" if s["stage"] is None else str(s["stage"]), str(s["index"]), str(s["reduction"]), str(s["channels"]), f"{s['size'][0]}x{s['size'][1]}",
                  ", ".join(s["sites"]) if len(s["sites"]) <= 4
                  else f"{s['sites'][0]} .. {s['sites'][-1]} ({len(s['sites'])})"] for s in stage_rows],
            ))
        if args.verbose:
            print(f"rejected adds: {len(report.rejected)} (force one in with --include SCOPE:ADD)")
            if report.rejected:
                print(_table(
                    ["add", "rule", "layers", "reason"],
                    [[x.key, x.rule + ("" if x.forceable else " (not forceable)"), f"{x.branch_weight:g}", x.reason]
                     for x in report.rejected],
                ))
        forced = [s for s in sites if getattr(s, "forced", False)]
        if forced:
            print("forced sites: " + ", ".join(f"{s.scope}:{s.add}" for s in forced))
        for note in notes:
            print(f"note: {note}")
        if args.plot:
            print(f"wrote {args.plot}")
    return EXIT_OK


# --------------------------------------------------------------------------- patch
def _read_plan_file(path: str) -> dict[str, Any]:
    """A plan file: ``Plan.to_json()``, or the document ``inspect --format json`` prints (its
    ``plan`` entry). Only JSON is read; the plan is validated against the model later."""
    if not os.path.isfile(path):
        raise UsageError(f"--plan {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--plan {path} is not a JSON file: {e}") from None
    if isinstance(data, dict) and "ops" not in data and isinstance(data.get("plan"), dict):
        data = data["plan"]  # inspect --format json
    if not isinstance(data, dict):
        raise UsageError(f"--plan {path} must hold a JSON object (a plan), got {type(data).__name__}")
    return data


def cmd_patch(args: argparse.Namespace) -> int:
    _check_plan_options(args)
    if args.plan and (args.drop_path or args.drop_block or args.dropout):
        raise UsageError("--plan gives the whole plan; do not combine it with --drop-path / --drop-block / --dropout")
    if not args.plan and not args.drop_path and not args.drop_block and not args.dropout:
        raise UsageError("nothing to do: give --drop-path RATE, --drop-block RATE and/or --dropout RATE (> 0), "
                         "or --plan FILE")
    plan_data = _read_plan_file(args.plan) if args.plan else None
    inputs = [args.model, args.checkpoint, args.plan]
    check_output_path(args.out, inputs)  # fail before the slow part
    with Progress(total=4, desc="patch") as bar:
        bar.step("building the model")
        r = _resolve(args, apply_stored_plan=False)
        x = _checked_example(r)
        bar.step("planning")
        if plan_data is not None:
            plan = plan_from_recipe({"plan": plan_data}, r.model, args.plan)
            if not plan.ops:
                raise UsageError(f"--plan {args.plan} holds no ops")
        else:
            plan = _make_plan(r.model, args, x)
        bar.step("checking the patched model")
        state_dict = r.model.state_dict()
        # Apply to a copy and run one training step's forward: a plan that does not fit fails
        # here, before anything is written. Batch >= 2 keeps BatchNorm happy in train mode.
        trial = copy.deepcopy(r.model)
        apply_plan(trial, plan)
        trial.train()
        with torch.no_grad():
            trial(_example_of(r, batch=2))
        del trial
        bar.step("writing")
        recipe = {
            "model": r.spec, "kwargs": r.kwargs, "plan": plan.to_dict(),
            "input_shape": list(r.input_shape), "versions": versions(),
        }
        save_patched(args.out, state_dict, recipe, inputs=inputs)
    counts: dict[str, int] = {}
    for op in plan.ops:
        counts[op.kind] = counts.get(op.kind, 0) + 1
    dropout_ops = [op for op in plan.ops if op.role in ("hidden", "head")]
    dp = [op.params.p for op in plan.ops if op.kind in ("drop_path", "set_rate")
          and op.role not in ("hidden", "head")]
    parts = []
    if dp:
        slots = counts.get("set_rate", 0) - sum(op.kind == "set_rate" for op in dropout_ops)
        how = "from --plan" if args.plan else args.schedule
        parts.append(f"DropPath on {len(dp)} residual sites, rate {min(dp):.3g} -> {max(dp):.3g} ({how})"
                     + (f", {slots} existing slots reused" if slots else ""))
    if counts.get("drop_block"):
        parts.append(f"DropBlock {counts['drop_block']} places "
                     f"(residual stages {','.join(str(s) for s in _stages_of(args))})")
    if dropout_ops:
        reused = sum(op.kind == "set_rate" for op in dropout_ops)
        rate = f" {args.dropout:g}" if args.dropout else ""
        parts.append(f"Dropout{rate} at {len(dropout_ops)} places"
                     + (f" ({'+'.join(args.dropout_where)})" if args.dropout else "")
                     + (f", {reused} existing slots reused" if reused else ""))
    print(f"{r.spec}: " + "; ".join(parts))
    print(f"wrote {args.out} ({len(state_dict)} tensors, weights unchanged); "
          f"rebuild with regsurgery.load({args.out!r})")
    return EXIT_OK


# --------------------------------------------------------------------------- prune
def cmd_prune(args: argparse.Namespace) -> int:
    inputs = [args.model, args.checkpoint]
    check_output_path(args.out, inputs)  # fail before the slow part
    with Progress(total=3, desc="prune") as bar:
        bar.step("building the model")
        r = _resolve(args, apply_stored_plan=False)
        if r.recipe and Plan.from_dict(r.recipe["plan"]).ops:
            raise UsageError(f"{args.model} holds a regularizer plan; prune the plain model (its spec and "
                             "--checkpoint), then patch the pruned file")
        x = _checked_example(r)
        bar.step("finding layer stacks")
        before = {k for k in r.model.state_dict()}
        sizes = {name: len(m) for name, m in r.model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
        try:
            prune_layers(r.model, args.keep, include=args.include, example_inputs=x)
        except ValueError as e:
            if isinstance(e, NoSitesError):
                raise
            raise UsageError(str(e)) from None
        kept = {name: len(m) for name, m in r.model.named_modules()
                if isinstance(m, (nn.ModuleList, nn.Sequential)) and sizes.get(name, len(m)) != len(m)}
        prior = dict((r.recipe or {}).get("prune") or {})
        bar.step("writing")
        state_dict = r.model.state_dict()
        recipe = {
            "model": r.spec, "kwargs": r.kwargs, "plan": Plan().to_dict(),
            "prune": _compose_prune(prior, _kept_indices(args.keep, sizes, kept)),
            "input_shape": list(r.input_shape), "versions": versions(),
        }
        save_patched(args.out, state_dict, recipe, inputs=inputs)
    shrunk = ", ".join(f"{name or '<root>'} {sizes[name]} -> {n}" for name, n in kept.items())
    print(f"{r.spec}: kept blocks {shrunk}; {len(before)} -> {len(state_dict)} tensors")
    print(f"wrote {args.out}; rebuild with regsurgery.load({args.out!r})")
    return EXIT_OK


def _kept_indices(keep: Any, sizes: dict[str, int], kept: dict[str, int]) -> dict[str, list[int]]:
    from_rule = {}
    for name in kept:
        from_rule[name] = keep_indices(keep, sizes[name], name)
    return from_rule


def _compose_prune(prior: dict[str, list[int]], new: dict[str, list[int]]) -> dict[str, list[int]]:
    """Indices into the original stacks, when a pruned file is pruned again."""
    out = {k: list(v) for k, v in prior.items()}
    for name, idx in new.items():
        base = out.get(name)
        out[name] = [base[i] for i in idx] if base is not None else list(idx)
    return out


# --------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    targets = [(name, path) for name, path in (("onnx", args.onnx), ("torchscript", args.torchscript),
                                               ("pt2", args.pt2)) if path]
    if not targets:
        raise UsageError("nothing to export: give --onnx FILE, --torchscript FILE and/or --pt2 FILE")
    inputs = [args.model, args.checkpoint]
    paths = [os.path.abspath(p) for _, p in targets]
    if len(set(paths)) != len(paths):
        raise UsageError("--onnx, --torchscript and --pt2 must name different files")
    for _, path in targets:
        check_output_path(path, inputs)
    if args.onnx and args.opset is not None:
        low, high = onnx_opset_range()
        if not low <= args.opset <= high:
            raise UsageError(f"--opset {args.opset}: the installed ONNX exporter supports opsets {low} to {high}")
    with Progress(total=1, desc="export: loading") as bar:
        bar.step("building the model")
        r = _resolve(args, apply_stored_plan=True)
        x = _checked_example(r)
    reports = []
    # All or nothing: every artifact is staged next to its destination and the renames happen only
    # once every export has passed its checks; a failure removes all staged files.
    with contextlib.ExitStack() as stack:
        for name, path in targets:
            staged = stack.enter_context(atomic_output(path, inputs))
            with Progress(total=4, desc=f"export {name}") as bar:
                if name == "onnx":
                    report = export_onnx(r.model, x, staged, opset=args.opset, tolerance=args.tolerance,
                                         inputs=inputs, progress=bar, dynamic_batch=not args.static)
                elif name == "torchscript":
                    report = export_torchscript(r.model, x, staged, tolerance=args.tolerance, inputs=inputs,
                                                progress=bar)
                else:
                    report = export_pt2(r.model, x, staged, tolerance=args.tolerance, inputs=inputs,
                                        progress=bar)
            report.path = path
            reports.append(report)
    for report in reports:
        for line in report.lines():
            print(line)
    return EXIT_OK


# --------------------------------------------------------------------------- main
def _usage_errors() -> tuple[type, ...]:
    return (UsageError, ModelSpecError, OutputPathError, StageIndexError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if not text:
        text = type(e).__name__
    elif not type(e).__module__.startswith("regsurgery") and not isinstance(e, (ValueError, RuntimeError)):
        text = f"{type(e).__name__}: {text}"
    if len(text) > 1000:
        text = text[:1000] + "... (--debug for the whole message)"
    return text


@contextlib.contextmanager
def _quiet_warnings(debug: bool) -> Iterator[None]:
    # Library deprecation chatter (torch.jit, legacy exporters, timm) is not the user's problem;
    # --debug shows everything.
    def one_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: Optional[str] = None) -> None:
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.showwarning = one_line  # restored by catch_warnings
        yield


def _ignore_file_size_signal() -> None:
    """Past a file-size limit (``ulimit -f``) the kernel sends SIGXFSZ, which kills the process
    before any cleanup (torch's C++ writers then abort with a backtrace and leave temp files).
    Ignored, the write fails with EFBIG instead: one error line, exit 1, the temp file removed."""
    import signal
    import threading

    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _ignore_file_size_signal()
    try:
        args = build_parser().parse_args(_join_negative_values(argv))
        with _quiet_warnings(debug):
            return int(args.func(args))
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001  (the CLI's job: one line, an exit code)
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, _usage_errors()) else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
