"""Checkpoints: safe loading, key normalisation, atomic writes, and patched-model recipe files.

Loading never runs code from a file unless asked: ``.pt``/``.pth`` go through
``torch.load(weights_only=True)``, which unpickles only tensors and plain containers; a pickled
whole ``nn.Module`` is refused with a message saying why (``trust_pickle=True`` /
``--trust-pickle`` overrides it). ``.safetensors`` files hold only tensors by construction.

A *patched* file (``regsurgery patch --out``) holds the weights unchanged plus a recipe in plain
data, so it too loads with ``weights_only=True``::

    {"format": "regsurgery.patched/1",
     "state_dict": {name: tensor},
     "recipe": {"model": "timm:resnet50", "kwargs": {...}, "plan": Plan.to_dict(),
                "input_shape": [1, 3, 224, 224], "versions": {"torch": ..., "regsurgery": ...}}}

``load(path)`` rebuilds the model from its spec, loads the weights and re-applies the plan. A
``.safetensors`` output stores the same recipe as JSON in the file's metadata.

Writes are atomic: a temporary file in the destination directory, fsync, then ``os.replace``; a
failure leaves the destination as it was, and a path given as an input is never overwritten.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .._version import __version__
from ..api_layerdrop import keep_blocks
from ..rewrite.apply import PlanMismatchError, apply_plan
from .modelspec import build_model
from .trust import (
    UntrustedFileError,
    check_file_kwargs,
    check_file_spec,
    check_input_shape,
    validate_plan_dict,
)

__all__ = [
    "PATCHED_FORMAT",
    "CheckpointError",
    "UnsafeCheckpointError",
    "KeyMismatchError",
    "OutputPathError",
    "load_state_dict_file",
    "extract_state_dict",
    "load_weights_into",
    "check_output_path",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_save",
    "versions",
    "save_patched",
    "read_patched",
    "load_patched",
    "apply_recipe_prune",
    "build_from_recipe",
    "plan_from_recipe",
    "load",
]

PATCHED_FORMAT = "regsurgery.patched/1"

#: Where training scripts nest the weights, tried in this order (timm, DeiT, Lightning, EMA).
WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")
#: Prefixes added by wrappers around the model: DDP / DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or holds no usable weights."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs full unpickling (arbitrary code) and ``trust_pickle`` was not given."""


class KeyMismatchError(CheckpointError):
    """The weights do not fit the model (missing / unexpected keys, shape mismatches)."""


class OutputPathError(ValueError):
    """An output path is unusable: it is one of the inputs, a directory, or in no directory."""


# --------------------------------------------------------------------------- reading
def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_torch_header(path: str) -> bytes:
    """Fail early, and say so, for files that are not torch checkpoints at all; the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty (an interrupted write?)")
    # torch.save writes a zip archive; files from torch < 1.6 (and raw pickles) start with a
    # pickle PROTO opcode.
    if not (head.startswith(b"PK") or head[0] == 0x80):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (unrecognised header {head!r}); "
                              f"expected a torch.save file (.pt/.pth) or a .safetensors file")
    return head


def _check_zip_crc(path: str) -> None:
    """torch.load does not verify the zip's CRC32s: flipped bytes inside a tensor load silently as
    wrong weights. Read every member once and compare (about 1 s per GB)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                              f"({type(e).__name__}: {_short(e)})") from e
    if bad is not None:
        raise CheckpointError(f"{path}: the checkpoint is corrupt: the CRC32 of {bad!r} does not match "
                              f"its data (damaged in transfer or on disk); get an intact copy")


def _torch_load(path: str, trust_pickle: bool) -> Any:
    if _check_torch_header(path).startswith(b"PK"):
        _check_zip_crc(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        opcode = re.search(r"Unsupported operand (\d+)", text)
        if found is None and opcode is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt?): {_short(e)}") from e
        if not trust_pickle:
            what = (f" (it references {found.group(1)})" if found
                    else f" (it uses pickle opcode {opcode.group(1) if opcode else '?'}, which the safe loader does not read)")
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects, not just weights{what}; loading it means "
                f"unpickling, which can run arbitrary code from the file, so torch.load(weights_only=True) "
                f"refused it. Save only the weights (torch.save(model.state_dict(), ...)) or, if you "
                f"trust where the file came from, pass --trust-pickle (trust_pickle=True)"
            ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                              f"({type(e).__name__}: {_short(e) or 'unexpected end of file'})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot unpickle checkpoint: {type(e).__name__}: {_short(e)}") from e


def _safetensors_load(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a .safetensors file and the safetensors package is not installed; "
            f"pip install safetensors"
        ) from e
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {_short(e)}") from e


def _is_weights(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            # Only when every key has it: a model may have a child genuinely named "module".
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def extract_state_dict(obj: Any, source: str = "checkpoint", key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Find the weights in a loaded checkpoint object and normalise their names.

    Weights are a mapping of names to tensors at the top level or under ``key`` (default: the
    first of ``state_dict``, ``model``, ``model_ema``, ``state_dict_ema``, ``module`` present,
    unwrapped repeatedly). A ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by
    every key is removed. A whole ``nn.Module`` (only from a trusted pickle) gives its state_dict.
    """
    path: list[str] = []
    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if _is_weights(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source}: expected a dict of weights, found {type(obj).__name__}")
        if key is not None and not path:
            if key not in obj:
                raise CheckpointError(f"{source}: no {key!r} entry; top-level keys: {_names(obj)}")
            nxt = key
        else:
            nxt = next((k for k in WRAPPER_KEYS if k in obj and obj[k] is not None), None)  # type: ignore[assignment]
        if nxt is None:
            raise CheckpointError(
                f"{source}: no weights found; expected tensors at the top level or under "
                f"{', '.join(repr(k) for k in WRAPPER_KEYS[:3])}, found keys {_names(obj)}"
            )
        path.append(nxt)
        obj = obj[nxt]
    else:
        raise CheckpointError(f"{source}: no weights found under {'/'.join(path)}")
    sd = {str(k): v for k, v in obj.items()}
    return _strip_prefixes(sd)


def _names(obj: Mapping[Any, Any], limit: int = 8) -> str:
    keys = [str(k) for k in obj]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def load_state_dict_file(
    path: PathLike, trust_pickle: bool = False, key: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint file as ``{name: tensor}`` on the CPU.

    ``.safetensors`` files go through safetensors; anything else (``.pt``, ``.pth``, ``.bin``, a
    regsurgery patched file) through ``torch.load(weights_only=True)``. A file that needs full
    unpickling raises :class:`UnsafeCheckpointError` unless ``trust_pickle``. See
    :func:`extract_state_dict` for where weights are looked for and how names are normalised.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if path.endswith(".safetensors"):
        obj: Any = _safetensors_load(path)
    else:
        obj = _torch_load(path, trust_pickle)
    return extract_state_dict(obj, source=path, key=key)


def _list(items: list[str], limit: int = 5) -> str:
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_weights_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; on a mismatch raise :class:`KeyMismatchError`
    naming a few missing, unexpected and wrongly shaped keys, with their counts.

    Shapes are checked before anything is copied; the key check runs after torch's own loading
    hooks (which accept, e.g., old checkpoints without BatchNorm's ``num_batches_tracked``).
    """
    own = model.state_dict()
    bad_shapes = [
        f"{k}: {tuple(v.shape)} in {source}, {tuple(own[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise KeyMismatchError(
            f"{source} does not fit the model: {len(bad_shapes)} shape mismatch"
            f"{'es' if len(bad_shapes) > 1 else ''} ({_list(bad_shapes, 3)}); "
            f"check the model spec and --kwargs (e.g. num_classes)"
        )
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} ({_list(missing)})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''} ({_list(unexpected)})"
            )
        raise KeyMismatchError(
            f"{source} does not fit the model: {'; '.join(parts)}; is it the right model and --kwargs?"
        )
    return model


# --------------------------------------------------------------------------- writing
def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> str:
    """Refuse an output that is one of ``inputs``, a directory, or in a missing directory."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError("empty output path")
    for inp in inputs:
        if inp is not None and os.path.exists(os.fspath(inp)) and _same_file(path, os.fspath(inp)):
            raise OutputPathError(f"refusing to overwrite the input {os.fspath(inp)}; write to another path")
    if os.path.isdir(path):
        raise OutputPathError(f"output {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputPathError(f"cannot write {path}: directory {parent} does not exist")
    return path


_UMASK: Optional[int] = None


def _file_mode() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``,
    on any exception it is deleted and ``path`` is left untouched. For writers that want a file name
    (``torch.onnx.export``, ``torch.jit.save``); the temporary name keeps ``path``'s suffix."""
    path = check_output_path(path, inputs)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    suffix = os.path.splitext(base)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=directory)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e} in {directory}; "
                              "choose a writable directory") from e
    os.close(fd)
    try:
        yield tmp
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            raise OSError(f"writing {path} produced no data")
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the usual permissions
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; best-effort (not every filesystem allows it)
        _fsync_path(directory)
    except OSError:
        pass


def atomic_write_bytes(data: bytes, path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, inputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return os.fspath(path)


def atomic_save(obj: Any, path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> str:
    """``torch.save(obj, path)`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, inputs) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return os.fspath(path)


# --------------------------------------------------------------------------- recipes
_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is plain data that ``torch.load(weights_only=True)`` and
    JSON both accept (None, bool, int, float, str, and lists / tuples / str-keyed dicts of them)."""
    # Exact types: str / int subclasses (torch's TorchVersion, enums) are refused by weights_only.
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{where} has a non-string key {k!r}; recipes hold plain JSON-able data")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; recipes hold plain "
                    f"JSON-able data only (None, bool, int, float, str, list, dict)")


def versions() -> dict[str, str]:
    """Versions of the packages that shape a patched model (stored in recipes)."""
    out = {"torch": str(torch.__version__), "regsurgery": str(__version__)}
    for name in ("timm", "torchvision"):
        try:
            out[name] = str(__import__(name).__version__)
        except ImportError:
            pass
    return out


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors for safetensors, which refuses views of shared storage: tied weights are cloned."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_patched(
    out_path: PathLike,
    model_state_dict: Mapping[str, torch.Tensor],
    recipe: dict[str, Any],
    inputs: Iterable[Optional[PathLike]] = (),
) -> str:
    """Write a patched-model file: the weights plus ``recipe`` (plain data: ``model`` spec,
    ``kwargs``, ``plan`` as ``Plan.to_dict()``, ``versions``...). ``.safetensors`` paths get the
    recipe as JSON metadata; anything else is a ``torch.save``'d dict loadable with
    ``weights_only=True``. Atomic; never overwrites a path listed in ``inputs``."""
    out_path = os.fspath(out_path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), str) or "plan" not in recipe:
        raise ValueError("recipe must be a dict with at least 'model' (a spec string) and 'plan'")
    recipe = {**recipe, "versions": recipe.get("versions") or versions()}
    _check_plain(recipe, "recipe")
    bad = [k for k, v in model_state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors; not for {_list(bad)}")
    state_dict = {k: v.detach() for k, v in model_state_dict.items()}
    if out_path.endswith(".safetensors"):
        try:
            from safetensors.torch import save as st_save
        except ImportError as e:
            raise CheckpointError("writing .safetensors needs the safetensors package; pip install safetensors") from e
        meta = {"format": PATCHED_FORMAT, "recipe": json.dumps(recipe)}
        return atomic_write_bytes(st_save(_unshared(state_dict), metadata=meta), out_path, inputs)
    # Round-trip the recipe through the safe loader now, so a file that `load` would refuse is
    # never written (the state_dict is tensors only, which weights_only always accepts).
    buf = io.BytesIO()
    torch.save(recipe, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as e:
        raise TypeError(f"the recipe would not load with weights_only=True: {_short(e)}") from e
    return atomic_save({"format": PATCHED_FORMAT, "state_dict": state_dict, "recipe": recipe}, out_path, inputs)


def _check_format(found: Any, path: str) -> None:
    if found == PATCHED_FORMAT:
        return
    if isinstance(found, str) and found.startswith("regsurgery.patched/"):
        raise CheckpointError(f"{path} is in format {found}, newer than this regsurgery reads "
                              f"({PATCHED_FORMAT}); upgrade regsurgery")
    raise CheckpointError(f"{path} is not a regsurgery patched file (no {PATCHED_FORMAT!r} format tag); "
                          f"for plain weights use MODEL --checkpoint {path}")


def read_patched(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a patched-model file: ``(state_dict, recipe)``; nothing is unpickled beyond plain data."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"patched file {path} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise CheckpointError(f"{path} needs the safetensors package; pip install safetensors") from e
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {_short(e)}") from e
        _check_format(meta.get("format"), path)
        try:
            recipe = json.loads(meta["recipe"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the recipe in its metadata is missing or not JSON") from e
        state_dict = _safetensors_load(path)
    else:
        obj = _torch_load(path, trust_pickle=False)
        _check_format(obj.get("format") if isinstance(obj, dict) else None, path)
        state_dict, recipe = obj.get("state_dict"), obj.get("recipe")
        if not isinstance(state_dict, Mapping) or not isinstance(recipe, dict):
            raise CheckpointError(f"{path}: patched file lacks its 'state_dict' or 'recipe' entry")
        state_dict = dict(state_dict)
    if not isinstance(recipe.get("model"), str) or not isinstance(recipe.get("plan"), dict):
        raise CheckpointError(f"{path}: the recipe has no model spec or no plan")
    return state_dict, recipe


def apply_recipe_prune(model: nn.Module, recipe: dict[str, Any], path: str) -> None:
    """Remove the blocks a ``regsurgery prune`` recipe dropped (``recipe["prune"]``: stack scope ->
    kept indices), before the weights are loaded."""
    prune = recipe.get("prune")
    if not prune:
        return
    if not isinstance(prune, dict):
        raise CheckpointError(f"{path}: the recipe's 'prune' entry is not a mapping of stack -> kept indices")
    try:
        keep_blocks(model, {str(k): list(v) for k, v in prune.items()})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the stored pruning does not fit the model {recipe['model']!r}: {e}") from e


def build_from_recipe(
    recipe: dict[str, Any], source: str, trust_code: bool = False,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> nn.Module:
    """Build the model a recipe read from ``source`` names, as data: only registered builders (timm,
    torchvision, regsurgery, hf:DIR, :func:`regsurgery.register_builder`) unless ``trust_code``;
    kwargs must be plain JSON data the builder's signature takes. Loads ``state_dict`` if given."""
    spec = check_file_spec(recipe.get("model"), source, trust_code)
    kwargs = check_file_kwargs(spec, recipe.get("kwargs"), source)
    check_input_shape(recipe.get("input_shape"), source)
    model = build_model(spec, kwargs)
    apply_recipe_prune(model, recipe, source)  # before the weights: they are the kept blocks'
    if state_dict is not None:
        load_weights_into(model, state_dict, source=source)
    return model


def plan_from_recipe(recipe: dict[str, Any], model: Optional[nn.Module], source: str) -> Any:
    """The plan stored in a recipe, validated as data (:func:`regsurgery.trust.validate_plan_ops`)."""
    try:
        return validate_plan_dict(recipe.get("plan"), model, where=source)
    except UntrustedFileError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: the stored plan is not valid: {e}") from e


def load_patched(path: PathLike, trust_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a patched model: ``(model, recipe)``. See :func:`load`."""
    path = os.fspath(path)
    state_dict, recipe = read_patched(path)
    model = build_from_recipe(recipe, path, trust_code, state_dict)
    plan = plan_from_recipe(recipe, model, path)
    try:
        apply_plan(model, plan)  # in place; the model object stays the one built above
    except PlanMismatchError as e:
        raise CheckpointError(f"{path}: the stored plan does not fit the model {recipe['model']!r} "
                              f"it names: {e}") from e
    return model.train(), recipe


def load(path: PathLike, trust_code: bool = False) -> nn.Module:
    """Rebuild the patched model saved by ``regsurgery patch --out PATH`` (or :func:`save_patched`):
    build it from its spec and kwargs (no download), load the weights, re-apply the plan. The model
    is returned in train mode, ready to fine-tune.

    The file is data: its model spec may name only timm / torchvision / regsurgery models, a local
    HuggingFace directory or a builder registered with :func:`regsurgery.register_builder`, and its
    plan may only insert regsurgery's regularizers and set the rate of regularizer slots. Any other
    callable named in the file raises :class:`regsurgery.trust.UntrustedFileError` unless
    ``trust_code=True`` (which runs it: trust the file first)."""
    return load_patched(path, trust_code=trust_code)[0]
