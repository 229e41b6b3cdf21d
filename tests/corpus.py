"""Ground truth for residual-site detection: where the architectures' authors put DropPath.

timm (``drop_path_rate=...``) and torchvision (``stochastic_depth_prob=...``) place stochastic
depth (Huang et al., ECCV 2016, arXiv 1603.09382) by hand on the residual branches of dozens of
architectures. Building a model with it on and watching which module forwards *call* a
drop-path module gives the authors' placement; detection runs on the same architecture built
with it off, and the two are compared as multisets of scopes (the qualified name of the module
whose forward performs the residual add, ``""`` for the root).

How the placement is read (:func:`authors_placement`):

* global forward pre/post hooks keep a stack of the running modules; every call of a drop-path
  module (timm ``DropPath``, torchvision ``StochasticDepth``, any class whose name contains
  ``DropPath`` / ``StochasticDepth``) is credited to the module just below it on the stack,
  skipping plain containers (``nn.Sequential`` with the stock forward, ``ModuleList``,
  ``ModuleDict``): timm's ``ParallelThingsBlock`` keeps its ``drop_path`` inside
  ``nn.Sequential`` branches while the add is in the block.
* calls are counted, not modules: one module can be called twice (Mixer's shared ``drop_path``)
  and some are created but never called (timm ``DepthwiseSeparableConv`` without skip).
* a call is a residual site only if its output meets an add: a ``TorchFunctionMode`` follows the
  output through tensor ops (layer scale, reshapes, ``stack().sum()``) to an ``add`` of two
  tensors made while the calling module still runs. timm byobnet ``BottleneckBlock`` calls
  ``drop_path`` even when it has no shortcut (MobileViT's stride-2 blocks) and RDNet drops
  features that are concatenated: those calls go to ``Placement.no_add``, not to the sites.
* rates do not matter, places do. Linear-decay schedules give the first block a rate of 0, and
  timm then stores ``nn.Identity()`` or ``None`` instead of a ``DropPath`` (ResNet
  ``layer1.0``); torchvision keeps a ``StochasticDepth(p=0)``. On a copy of the model every
  ``None`` / ``nn.Identity`` attribute whose name says drop path (``drop_path``,
  ``drop_path1``, ``mlp_drop_path``, ``stochastic_depth``, ...) is filled with an identity
  marker (:class:`FilledDropPath`) so its calls are seen too. The forward checks the
  attribute (``if self.drop_path is not None``) or calls it unconditionally; either way a
  call shows that the authors route a residual branch through that slot.
* the functional forms (timm ``drop_path``, torchvision ``stochastic_depth``) are patched
  during the forward and a call from outside a drop-path module is credited to its caller. No
  model in :data:`CORPUS` calls them directly (checked on timm 1.0.31 / torchvision 0.29);
  the patch only reaches calls that look the function up on its module at call time.

The forward runs in eval mode with ``torch.no_grad()``: every model in the corpus calls its
drop-path modules in eval mode too (they are the identity there), and eval avoids train-only
paths (distillation heads, auxiliary outputs).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CorpusEntry",
    "CORPUS",
    "HOLDOUT",
    "NEW_FAMILIES",
    "TUNED_FAMILIES",
    "EXCLUDED",
    "Placement",
    "FilledDropPath",
    "authors_placement",
    "authors_sites",
    "score",
    "prf",
    "get_entry",
]

#: Attribute names that hold a drop-path slot in timm / torchvision blocks.
_SLOT_NAME = re.compile(r"drop_?path|stochastic_d", re.IGNORECASE)
_DROP_CLASS = re.compile(r"DropPath|StochasticDepth")


class FilledDropPath(nn.Module):
    """Identity stand-in for a drop-path slot that a rate-0 schedule left as ``None`` / ``Identity``."""

    def forward(self, x: Any) -> Any:
        return x


def _is_drop_module(module: nn.Module) -> bool:
    return bool(_DROP_CLASS.search(type(module).__name__))


def _is_plain_container(module: nn.Module) -> bool:
    # A container's forward never adds; the residual add is in the module that called it.
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return True
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fill_rate_zero_slots(model: nn.Module) -> list[str]:
    """Replace ``None`` / ``nn.Identity`` drop-path slots by :class:`FilledDropPath`; return their names."""
    filled = []
    for scope, module in list(model.named_modules()):
        candidates = dict(module._modules)
        for key, value in vars(module).items():
            if value is None and not key.startswith("_"):
                candidates.setdefault(key, None)
        for key, value in candidates.items():
            if not _SLOT_NAME.search(key):
                continue
            if value is None or type(value) is nn.Identity:
                if key in vars(module) and key not in module._modules:
                    delattr(module, key)  # a plain ``None`` attribute would shadow the submodule
                setattr(module, key, FilledDropPath())
                filled.append(f"{scope}.{key}" if scope else key)
    return filled


@contextlib.contextmanager
def _patched_functionals(on_call) -> Iterator[None]:
    """Route calls of the functional drop-path forms through ``on_call`` while the block runs."""
    targets = []
    try:
        import timm.layers.drop as timm_drop

        targets.append((timm_drop, "drop_path"))
    except Exception:  # timm absent: nothing to patch
        pass
    try:
        # ``torchvision.ops.stochastic_depth`` the attribute is the function; the module is in sys.modules
        tv_sd = importlib.import_module("torchvision.ops.stochastic_depth")
        targets.append((tv_sd, "stochastic_depth"))
    except Exception:  # torchvision absent
        pass
    originals = [(mod, attr, getattr(mod, attr)) for mod, attr in targets]

    def wrap(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            on_call(out)
            return out

        return wrapper

    for mod, attr, fn in originals:
        setattr(mod, attr, wrap(fn))
    try:
        yield
    finally:
        for mod, attr, fn in originals:
            setattr(mod, attr, fn)


@dataclass
class Placement:
    """The authors' placement read from one forward of a drop-path-on model."""

    sites: Counter  # scope -> drop-path calls of that module's forward whose output reaches an add
    modules: Counter  # qualified name of the drop-path module -> number of calls (all calls)
    filled: list[str] = field(default_factory=list)  # rate-0 slots replaced by FilledDropPath
    functional_calls: int = 0  # calls of the functional forms from outside a drop-path module
    no_add: Counter = field(default_factory=Counter)  # scope -> calls whose output reaches no add


_ADD_NAMES = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


@dataclass
class _Call:
    scope: str
    caller: int  # id of the calling module; an add only counts while it is running
    reached_add: bool = False


class _AddReach(TorchFunctionMode):
    """Follows drop-path outputs through tensor ops until they meet an add of two tensors."""

    def __init__(self, calls: list[_Call], running: Callable[[], set[int]]) -> None:
        super().__init__()
        self.calls = calls
        self.running = running
        self.taint: dict[int, frozenset[int]] = {}  # id(tensor) -> indices into calls
        self.keep: list[torch.Tensor] = []  # keeps tainted tensors alive so ids are not reused

    def mark(self, value: Any, indices: frozenset[int]) -> None:
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                self.taint[id(t)] = self.taint.get(id(t), frozenset()) | indices
                self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.taint:
            return result
        indices = frozenset().union(
            *(self.taint.get(id(t), frozenset()) for t in tree_flatten((args, kwargs))[0]
              if isinstance(t, torch.Tensor))
        )
        if not indices:
            return result
        name = getattr(func, "__name__", "")
        if name in _ADD_NAMES and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            running = self.running()
            for i in indices:
                if self.calls[i].caller in running:
                    self.calls[i].reached_add = True
            return result  # a residual add ends the branch
        self.mark(result, indices)
        return result


def authors_placement(
    model: nn.Module, example_input: Any, *, fill_rate_zero_slots: bool = True
) -> Placement:
    """Run one eval forward of a copy of ``model`` and record which modules call drop path.

    ``model`` must be built with drop path on (timm ``drop_path_rate > 0``, torchvision
    ``stochastic_depth_prob > 0``); it is not modified. ``example_input`` is a tensor, or a
    tuple of positional arguments. A call counts as a site when its output, through any tensor
    ops, meets an add of two tensors while the calling module still runs; calls that never do
    (timm byobnet blocks without a shortcut still call ``drop_path``; RDNet concatenates) are
    listed in ``no_add``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"authors_placement needs an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    filled = _fill_rate_zero_slots(model) if fill_rate_zero_slots else []
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)  # a shared module keeps its first name
    modules_by_id = {id(m): m for m in model.modules()}

    stack: list[Optional[int]] = []  # ids of running modules of this model, None for others
    pending: list[int] = []  # call indices of the drop-path modules now running
    calls: list[_Call] = []
    drop_modules: Counter = Counter()
    functional = 0

    def caller() -> Optional[int]:
        for mid in reversed(stack):
            if mid is None:
                continue
            module = modules_by_id[mid]
            if _is_drop_module(module) or _is_plain_container(module):
                continue
            return mid
        return None

    def pre_hook(module: nn.Module, args: Any) -> None:
        mid = id(module) if id(module) in names else None
        if mid is not None and _is_drop_module(module):
            owner = caller()
            if owner is None:
                raise RuntimeError(
                    f"drop-path module {names[mid]!r} was called outside any module of the model; "
                    "call the model itself, not a submodule's forward"
                )
            calls.append(_Call(names[owner], owner))
            pending.append(len(calls) - 1)
            drop_modules[names[mid]] += 1
        stack.append(mid)

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        mid = stack.pop()
        if mid is not None and _is_drop_module(module) and pending:
            reach.mark(output, frozenset((pending.pop(),)))

    def on_functional(output: Any) -> None:
        nonlocal functional
        top = next((m for m in reversed(stack) if m is not None), None)
        if top is not None and _is_drop_module(modules_by_id[top]):
            return  # the module form calling its own functional form: already counted
        owner = caller()
        if owner is not None:
            calls.append(_Call(names[owner], owner))
            reach.mark(output, frozenset((len(calls) - 1,)))
            functional += 1

    reach = _AddReach(calls, lambda: {m for m in stack if m is not None})
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    pre = _module_hooks.register_module_forward_pre_hook(pre_hook)
    post = _module_hooks.register_module_forward_hook(post_hook, always_call=True)
    try:
        with torch.no_grad(), _patched_functionals(on_functional), reach:
            model(*args)
    finally:
        pre.remove()
        post.remove()
        model.train(was_training)
    sites = Counter(c.scope for c in calls if c.reached_add)
    no_add = Counter(c.scope for c in calls if not c.reached_add)
    return Placement(
        sites=sites, modules=drop_modules, filled=filled, functional_calls=functional, no_add=no_add
    )


def authors_sites(model: nn.Module, example_input: Any) -> Counter:
    """``Counter`` {scope: number of drop-path calls in that module's forward}; see :func:`authors_placement`."""
    return authors_placement(model, example_input).sites


def score(found: Counter, truth: Counter) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of two multisets of scopes."""
    found, truth = Counter(found), Counter(truth)
    tp = sum((found & truth).values())
    return tp, sum(found.values()) - tp, sum(truth.values()) - tp


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1; an empty side counts as perfect (nothing found, nothing to find)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ----------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class CorpusEntry:
    """One architecture: how to build it with the authors' drop path on and off."""

    source: str  # "timm" or "torchvision"
    name: str
    family: str
    on: dict = field(default_factory=dict)
    off: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 224, 224)
    note: str = ""
    ctor: str = ""  # "module:callable" when the registered builder hard-codes the rate
    # The authors' placement includes adds that the spec defines as not residual (parallel
    # branches summed in a reparameterizable block): detection disagrees on purpose.
    by_design: bool = False

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"

    def build(self, drop_path: bool) -> nn.Module:
        """The model with pretrained=False / weights=None, in eval mode."""
        kwargs = dict(self.on if drop_path else self.off)
        if self.ctor:
            module_name, _, attr = self.ctor.partition(":")
            model = getattr(importlib.import_module(module_name), attr)(**kwargs)
        elif self.source == "timm":
            import timm

            model = timm.create_model(self.name, pretrained=False, **kwargs)
        elif self.source == "torchvision":
            import torchvision

            model = torchvision.models.get_model(self.name, weights=None, **kwargs)
        else:
            raise ValueError(f"corpus entry {self.name!r}: unknown source {self.source!r}; use 'timm' or 'torchvision'")
        return model.eval()

    def example_input(self, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((1, *self.input_size), generator=gen)


def _timm(name: str, family: str, size: int = 224, note: str = "", by_design: bool = False,
          **extra: Any) -> CorpusEntry:
    return CorpusEntry(
        "timm", name, family, on={"drop_path_rate": 0.1, **extra}, off={"drop_path_rate": 0.0, **extra},
        input_size=(3, size, size), note=note, by_design=by_design,
    )


def _tv(name: str, family: str, size: int = 224, note: str = "", ctor: str = "", **config: Any) -> CorpusEntry:
    return CorpusEntry(
        "torchvision", name, family, on={"stochastic_depth_prob": 0.2, **config},
        off={"stochastic_depth_prob": 0.0, **config}, input_size=(3, size, size), note=note, ctor=ctor,
    )


# swin_t / swin_v2_t / maxvit_t builders pass their own stochastic_depth_prob: build the class with
# the builder's configuration (torchvision 0.29 swin_transformer.py / maxvit.py).
_SWIN_T = dict(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])


def _torchvision_swin_v2(**kwargs: Any) -> nn.Module:
    from torchvision.models import swin_transformer as tv_swin

    return tv_swin.SwinTransformer(
        block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2, **kwargs
    )


CORPUS: list[CorpusEntry] = [
    # ResNets and relatives
    _timm("resnet18", "resnet", 64),
    _timm("resnet50", "resnet", 64),
    _timm("resnext26ts", "resnet", 64),
    _timm("res2net50_26w_4s", "resnet", 64),
    _timm("resnest14d", "resnet", 64),
    _timm("nf_resnet26", "nfnet", 64),
    _timm("dm_nfnet_f0", "nfnet", 64),
    _timm("cspresnet50", "csp", 64),
    _timm("rexnet_100", "mobile", 64),
    # RegNets
    _timm("regnetx_002", "regnet", 64),
    _timm("regnety_002", "regnet", 64),
    _timm("regnetz_005", "regnet", 64),
    # EfficientNets / MobileNets
    _timm("efficientnet_b0", "efficientnet", 64),
    _timm("mobilenetv2_050", "mobilenet", 64),
    _timm("mobilenetv3_small_050", "mobilenet", 64),
    _timm("mobilenetv4_conv_small", "mobilenet", 64),
    # ConvNeXts and other modern convnets
    _timm("convnext_atto", "convnext", 64),
    _timm("convnextv2_atto", "convnext", 64),
    _timm("inception_next_atto", "convnext", 64),
    _timm("edgenext_xx_small", "hybrid", 64),
    _timm("starnet_s050", "convnet", 64),
    _timm("fasternet_t0", "convnet", 64),
    _timm("mambaout_femto", "convnet", 64),
    # plain ViTs
    _timm("vit_tiny_patch16_224", "vit", 224),
    _timm("deit_tiny_patch16_224", "vit", 224),
    _timm("deit3_small_patch16_224", "vit", 224),
    _timm("cait_xxs24_224", "vit", 224),
    _timm("beit_base_patch16_224", "vit", 224),
    _timm("eva02_tiny_patch14_224", "vit", 224),
    _timm("xcit_nano_12_p16_224", "vit", 224),
    _timm("flexivit_small", "vit", 240),
    _timm("vit_relpos_small_patch16_224", "vit", 224),
    _timm("pit_ti_224", "vit", 224),
    _timm("crossvit_tiny_240", "vit", 240),
    # hierarchical transformers
    _timm("swin_tiny_patch4_window7_224", "swin", 224),
    _timm("swinv2_cr_tiny_224", "swin", 224),
    _timm("pvt_v2_b0", "hierarchical-vit", 224),
    _timm("twins_svt_small", "hierarchical-vit", 224),
    _timm("nest_tiny", "hierarchical-vit", 224),
    _timm("davit_tiny", "hierarchical-vit", 224),
    _timm("focalnet_tiny_srf", "hierarchical-vit", 224),
    _timm("hiera_tiny_224", "hierarchical-vit", 224),
    _timm("mvitv2_tiny", "hierarchical-vit", 224),
    # MLPs
    _timm("mixer_s32_224", "mlp", 224),
    _timm("resmlp_12_224", "mlp", 224),
    _timm("gmlp_ti16_224", "mlp", 224),
    # MetaFormers
    _timm("poolformer_s12", "metaformer", 64),
    _timm("poolformerv2_s12", "metaformer", 64),
    _timm("convformer_s18", "metaformer", 64),
    _timm("caformer_s18", "metaformer", 64),
    # hybrids
    _timm("coat_lite_tiny", "hybrid", 224),
    _timm("efficientformer_l1", "hybrid", 224),
    _timm("efficientformerv2_s0", "hybrid", 224),
    _timm("fastvit_t8", "hybrid", 256),
    _timm("tiny_vit_5m_224", "hybrid", 224),
    _timm("mobilevit_xxs", "hybrid", 256),
    _timm("maxvit_pico_rw_256", "hybrid", 256),
    _timm("coatnet_nano_rw_224", "hybrid", 224),
    _timm("levit_128s", "hybrid", 224),
    # torchvision
    _tv("efficientnet_b0", "efficientnet", 64),
    _tv("convnext_tiny", "convnext", 64),
    _tv("swin_t", "swin", 224, ctor="torchvision.models.swin_transformer:SwinTransformer",
        window_size=[7, 7], **_SWIN_T),
    _tv("swin_v2_t", "swin", 256, ctor="corpus:_torchvision_swin_v2", window_size=[8, 8], **_SWIN_T),
    _tv("maxvit_t", "hybrid", 224, ctor="torchvision.models.maxvit:MaxVit", input_size=(224, 224),
        stem_channels=64, partition_size=7, block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2],
        head_dim=32),
]

#: Held-out architectures: never looked at while tuning detection against :data:`CORPUS`, so a
#: rule fitted to the corpus can be checked on families it has not seen. Same ground truth.
HOLDOUT: list[CorpusEntry] = [
    _timm("resnet26d", "resnet", 64),
    _timm("seresnext26d_32x4d", "resnet", 64),
    _timm("resnetv2_50", "resnet", 64),
    _timm("skresnet18", "resnet", 64),
    _timm("halonet26t", "resnet-attn", 256),
    _timm("botnet26t_256", "resnet-attn", 256),
    _timm("lambda_resnet26t", "resnet-attn", 256),
    _timm("gernet_s", "byobnet", 64),
    _timm("repvgg_a0", "byobnet", 64, note="timm adds drop path to the RepVGG identity add "
          "('not in the paper / official impl, experimental'); fastvit's MobileOneBlock has none", by_design=True),
    _timm("mobileone_s0", "byobnet", 64, note="as repvgg_a0: byobnet MobileOneBlock, experimental drop path",
          by_design=True),
    _timm("cs3darknet_s", "csp", 64),
    _timm("regnetv_040", "regnet", 64),
    _timm("ese_vovnet19b_dw", "vovnet", 64),
    _timm("xception41", "xception", 96),
    _timm("hgnetv2_b0", "hgnet", 64),
    _timm("efficientnet_lite0", "efficientnet", 64),
    _timm("efficientnetv2_rw_t", "efficientnet", 64),
    _timm("mnasnet_small", "mobilenet", 64),
    _timm("mixnet_s", "mobilenet", 64),
    _timm("fbnetv3_b", "mobilenet", 64),
    _timm("lcnet_050", "mobilenet", 64),
    _timm("convit_tiny", "vit", 224),
    _timm("visformer_tiny", "hybrid", 224),
    _timm("tnt_s_patch16_224", "vit", 224),
    _timm("gcvit_xxtiny", "hierarchical-vit", 224, note="MbConvBlock residuals in the downsampler and "
          "the global-query generator have no drop path"),
    _timm("twins_pcpvt_small", "hierarchical-vit", 224),
    _timm("nextvit_small", "hybrid", 224),
    _timm("coat_tiny", "hybrid", 224),
    _timm("vitamin_small_224", "hybrid", 224),
    _timm("lowformer_b0", "hybrid", 224),
    _timm("fastvit_sa12", "hybrid", 256),
    _timm("sequencer2d_s", "mlp", 224),
    _timm("gmixer_12_224", "mlp", 224),
]

def _torchvision_swin3d_t(**kwargs: Any) -> nn.Module:
    # swin3d_t's builder passes its own stochastic_depth_prob: build the class with its config
    # (torchvision 0.29 video/swin_transformer.py).
    from torchvision.models.video import swin_transformer as tv_swin3d

    return tv_swin3d.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=96, depths=[2, 2, 6, 2],
                                       num_heads=[3, 6, 12, 24], window_size=[8, 7, 7], **kwargs)

#: Families that neither :data:`CORPUS` nor :data:`HOLDOUT` held before issue 17: a family-level
#: held-out split (one or two models of each architecture family, never used to tune rules).
#: ``family`` names the architecture family; none equals a family of :data:`CORPUS`.
NEW_FAMILIES: list[CorpusEntry] = [
    _timm("volo_d1_224", "volo", 224),
    _timm("tresnet_m", "tresnet", 64),
    _timm("swiftformer_xs", "swiftformer", 224),
    _timm("efficientvim_m1", "efficientvim", 224),
    _timm("iformer_t", "iformer", 224),
    _timm("csatv2", "csatv2", 224),
    _timm("cspnext_tiny", "cspnext", 64),
    _timm("cpubone_b0_bfrobust", "cpubone", 64),
    _timm("samvit_base_patch16_224", "samvit", 224),
    _timm("sam2_hiera_tiny", "hieradet", 224),
    _timm("naflexvit_base_patch16_gap", "naflexvit", 224),
    _timm("mobilevitv2_050", "mobilevitv2", 256),
    _timm("swinv2_tiny_window8_256", "swinv2", 256),
    _timm("maxxvitv2_nano_rw_256", "maxxvit", 256),
    _timm("fastvit_mci0", "mobileclip", 256),
    _tv("efficientnet_v2_s", "efficientnetv2", 64),
    CorpusEntry("torchvision", "swin3d_t", "swin3d", on={"stochastic_depth_prob": 0.2},
                off={"stochastic_depth_prob": 0.0}, input_size=(3, 8, 64, 64),
                ctor="corpus:_torchvision_swin3d_t", note="video: (N, C, T, H, W) input"),
]

#: The family-level split: families tuned on (every family of :data:`CORPUS`) and held out.
TUNED_FAMILIES: frozenset[str] = frozenset(e.family for e in CORPUS)

#: Architectures considered and left out, with the reason.
EXCLUDED: dict[str, str] = {
    "timm:ghostnetv2_100": "no drop_path_rate argument (GhostNet has no stochastic depth)",
    "timm:repvit_m0_9": "no drop_path_rate argument (RepVit has no stochastic depth)",
    "timm:rdnet_tiny": "drop path on DenseNet-style features that are concatenated, never added: "
    "no residual site (every call lands in Placement.no_add)",
    "timm:nat_mini": "not in timm 1.0.31",
    "torchvision:resnet18": "torchvision ResNet / MobileNet / ViT have no stochastic depth",
    "timm:dla34 / inception_v4 / hrnet_w18_small / ghostnetv3_050 / shvit_s1 / efficientvit_b0":
    "no drop_path_rate argument",
    "timm:mobilenetv5_300m": "too slow on CPU for the benchmark (294M parameters, 768 px: ~40 s)",
}


def get_entry(key_or_name: str) -> CorpusEntry:
    """The corpus entry named ``timm:NAME`` / ``torchvision:NAME`` or a bare ``NAME`` (timm first)."""
    for entry in (*CORPUS, *HOLDOUT, *NEW_FAMILIES):
        if key_or_name in (entry.key, entry.name):
            return entry
    raise KeyError(
        f"{key_or_name!r} is not in the residual corpus; names are "
        + ", ".join(e.key for e in (*CORPUS, *HOLDOUT, *NEW_FAMILIES))
    )


def entries(names: Optional[Sequence[str]] = None, holdout: bool = False, split: str = "") -> list[CorpusEntry]:
    """All corpus (or held-out) entries, or the ones named (``timm:NAME``, ``torchvision:NAME``, ``NAME``).

    ``split``: ``"tuned"`` (:data:`CORPUS`), ``"heldout"`` (:data:`HOLDOUT` and
    :data:`NEW_FAMILIES`), ``"all"`` (both); it overrides ``holdout``.
    """
    if names:
        return [get_entry(n) for n in names]
    if split == "tuned":
        return list(CORPUS)
    if split == "heldout":
        return [*HOLDOUT, *NEW_FAMILIES]
    if split == "all":
        return [*CORPUS, *HOLDOUT, *NEW_FAMILIES]
    return list(HOLDOUT if holdout else CORPUS)


def split_of(entry: CorpusEntry) -> str:
    """``"tuned"`` for :data:`CORPUS` entries, ``"heldout"`` for the rest; ``family_heldout`` tells
    whether the family itself was never tuned on (see :func:`family_heldout`)."""
    return "tuned" if any(entry.key == e.key for e in CORPUS) else "heldout"


def family_heldout(entry: CorpusEntry) -> bool:
    """Is ``entry``'s family absent from the tuned families?"""
    return entry.family not in TUNED_FAMILIES
