"""Property-based tests: random residual architectures with planted sites and decoy adds.

A hypothesis-drawn *spec* (nested tuples) describes a model; :class:`SpecModule` builds it into an
``nn.Module`` whose forward interprets the fixed spec with plain Python loops (fx-traceable).

Planted residual adds follow the documented contract of :mod:`regsurgery.analysis`: the branch
holds >= 2 weighted layers (conv / linear) on its longest chain, or 1 weighted layer plus a
normalization and no sum that bypasses the layer (a ``light`` decoy or a fork with a BN identity
path inside it; a nested residual site is no bypass); a projection shortcut is a chain of single-input nodes with at most one weighted
layer (conv1x1, conv1x1 + BN, avgpool, avgpool + conv1x1, linear) and the branch is deeper. They
come in every operand order and add form (``+``, ``torch.add``, ``Tensor.add``, ``+=``, a
layer-scale multiplier on the branch), inline or in child modules, nested inside other branches,
with reused modules (one activation module called everywhere, a conv / linear called twice).

Decoy adds are none of these: learned position embeddings (a parameter operand, or an
``nn.Embedding`` of a buffer), sums of parallel single-layer branches (RepVGG-style, with an
optional BN identity path), attention logits plus a learned bias and a mask buffer, and a
one-layer conditional position encoding ``y + dwconv(y)`` (one weighted layer, no norm).

Properties: every planted site is found (scope, kind, branch operand, graph order) and no decoy
is; ``strip(apply(m))`` computes exactly what ``m`` did (eval bitwise, train bitwise under the same
seed); a rate-0 patch computes the original train forward bitwise (the rewritten graph is
faithful); the state_dict keys (and values) never change.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from regsurgery import (
    NoSitesError,
    apply_dropblock,
    apply_stochastic_depth,
    find_conv_stages,
    find_residual_sites,
    inserted_modules,
    is_patched,
    strip,
)
from regsurgery.api import residual_stages

# Reproducible in CI: the same examples every run, no per-example time limit (tracing is slow-ish
# on a shared core), and a modest count so the whole file stays well under a minute.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

C0 = 4  # channels / features after the stem
H0 = 8  # spatial size (conv family)
N_TOKENS = 4  # sequence length (token family)
BATCH = 2

# ----------------------------------------------------------------------------- spec
# Items (tuples; channels and sizes are implied by the position in the sequence):
#   ("w", k, cout, stride, wid)      conv kxk (conv family) or Linear (token family); wid names it
#   ("reuse", wid)                   call an earlier weighted module of the same module again
#   ("norm", which)                  bn / gn (conv), ln (token)
#   ("act", which)                   relu / gelu modules, the module's shared act, F.relu, tanh, .relu()
#   ("res", form, branch, proj)      planted residual (inline in this module's forward)
#   ("child", items)                 a child module with its own forward (its own scope)
#   ("fork", paths, bn_identity)     decoy: sum of parallel one-layer paths
#   ("light", act, depthwise, order) decoy: y + conv(y), a single weighted layer without norm
#   ("pos", order)                   decoy: y + learned embedding parameter
#   ("emb", order)                   decoy: y + nn.Embedding(positions buffer) (token family)
#   ("attn",)                        decoy: attention logits + learned bias + mask buffer (token)
# proj: () for the identity, else a tuple of steps ("conv1", cout, stride) / ("bn",) / ("pool", 2)
#       / ("linear", cout).

RES_FORMS = ("left", "right", "torch_add_left", "torch_add_right", "method", "iadd",
             "scaled_left", "scaled_right")
# which operand of the add node is the branch, per form
BRANCH_OPERAND = {"left": 0, "right": 1, "torch_add_left": 0, "torch_add_right": 1, "method": 0,
                  "iadd": 0, "scaled_left": 0, "scaled_right": 1}
ACTS = ("relu", "gelu", "shared", "F.relu", "tanh", "method")


class _Gen:
    """Generation state of one module: its family and the weighted modules it owns so far."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.next_wid = 0
        self.square: list[tuple[int, int]] = []  # (wid, channels) of cin == cout, stride-1 layers

    def weighted(self, k: int, cin: int, cout: int, stride: int) -> tuple:
        wid = self.next_wid
        self.next_wid += 1
        if cin == cout and stride == 1:
            self.square.append((wid, cout))
        return ("w", k, cout, stride, wid)


def chain_cost(items: tuple) -> tuple[int, bool, bool]:
    """(weighted layers on the longest chain, holds a norm, holds a layer bypass) of a sequence,
    per the contract. A *bypass* is a sum of a path through a layer with a layer-free path (the
    ``light`` decoy, a fork with a BN identity path): a one-layer branch holding one is a
    reparameterizable block, not a residual branch."""
    weight, norm, bypass = 0, False, False
    for item in items:
        kind = item[0]
        if kind in ("w", "reuse"):
            weight += 1
        elif kind == "light":
            weight += 1
            bypass = True
        elif kind == "norm":
            norm = True
        elif kind == "fork":
            weight += 1  # parallel one-layer paths: the longest chain has one
            norm = norm or item[2] or any(sub[0] == "norm" for path in item[1] for sub in path)
            bypass = bypass or item[2]
        elif kind == "attn":
            weight += 2  # q/k/v linear -> (matmuls of activations) -> output linear
        elif kind == "child":
            # A custom leaf costs its depth: the longest chain of weighted layers through its own
            # graph, at least 1 if it holds a layer that computes (norms and activations do
            # not); its norms are not the branch's normalization, its sums not its bypasses.
            weight += max(chain_cost(item[1])[0], int(_computes(item[1])))
        elif kind == "res":
            # A nested residual site is not a bypass of the enclosing branch; what its own
            # branch holds is.
            bw, bn, bb = chain_cost(item[2])
            pw, pn, _ = chain_cost(tuple(("w",) if s[0] in ("conv1", "linear") else
                                         ("norm",) if s[0] == "bn" else ("act",) for s in item[3]))
            weight += max(bw, pw)
            norm = norm or bn or pn
            bypass = bypass or bb
    return weight, norm, bypass


def _computes(items: tuple) -> bool:
    """Does a child built from ``items`` hold a module other than norms and activations?"""
    return any(item[0] in ("w", "fork", "light", "emb", "attn", "res")
               or (item[0] == "child" and _computes(item[1])) for item in items)


def _draw_act(draw: Any) -> tuple:
    return ("act", draw(st.sampled_from(ACTS)))


def _draw_norm(draw: Any, family: str) -> tuple:
    return ("norm", draw(st.sampled_from(("bn", "gn") if family == "conv" else ("ln",))))


def _draw_items(draw: Any, g: _Gen, c: int, h: int, depth: int, n: int, fixed: bool,
                decoys_only: bool = False) -> tuple[list, int, int]:
    """Draw ``n`` items starting at (channels c, size h); ``fixed`` keeps (c, h) unchanged."""
    items: list = []
    # Residuals first: hypothesis's simplest draw of sampled_from is its first element.
    kinds = ["res", "w", "norm", "act", "fork", "light", "pos"]
    if decoys_only:
        kinds.remove("res")
    elif depth < 3:
        kinds += ["res", "res"]
    if g.family == "token":
        kinds += ["attn", "emb"]
    if depth < 2:
        kinds += ["child"] * (2 - depth)
    for _ in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "w":
            items.append(g.weighted(draw(st.sampled_from((1, 3))), c, c, 1))
            if draw(st.booleans()):
                squares = [wid for wid, ch in g.square if ch == c]
                if squares:
                    items.append(("reuse", draw(st.sampled_from(squares))))
        elif kind == "norm":
            items.append(_draw_norm(draw, g.family))
        elif kind == "act":
            items.append(_draw_act(draw))
        elif kind == "res":
            item, c, h = _draw_res(draw, g, c, h, depth, fixed)
            items.append(item)
        elif kind == "child":
            child_g = _Gen(g.family)
            child_items, c2, h2 = _draw_items(draw, child_g, c, h, depth + 1,
                                              draw(st.integers(1, 3)), fixed, decoys_only)
            items.append(("child", tuple(child_items)))
            c, h = c2, h2
        elif kind == "fork":
            paths = []
            for _ in range(draw(st.integers(2, 3))):
                path = [g.weighted(draw(st.sampled_from((1, 3))), c, c, 1)]
                if draw(st.booleans()):
                    path.append(_draw_norm(draw, g.family))
                if draw(st.booleans()):
                    path.append(_draw_act(draw))
                paths.append(tuple(path))
            bn_identity = g.family == "conv" and draw(st.booleans())
            items.append(("fork", tuple(paths), bn_identity))
        elif kind == "light":
            items.append(("light", draw(st.booleans()), draw(st.booleans()), draw(st.booleans())))
        elif kind == "pos":
            items.append(("pos", draw(st.booleans())))
        elif kind == "emb":
            items.append(("emb", draw(st.booleans())))
        elif kind == "attn":
            items.append(("attn",))
    return items, c, h


def _draw_res(draw: Any, g: _Gen, c: int, h: int, depth: int, fixed: bool) -> tuple[tuple, int, int]:
    form = draw(st.sampled_from(RES_FORMS))
    projection = draw(st.booleans())
    proj: tuple = ()
    branch: list = []
    cout, stride = c, 1
    if projection:
        if not fixed:
            cout = draw(st.sampled_from((c, 2 * c))) if c < 8 else c
            if g.family == "conv" and h >= 4:
                stride = draw(st.sampled_from((1, 2)))
        if g.family == "conv":
            options = [(("conv1", cout, stride),), (("conv1", cout, stride), ("bn",))]
            if stride == 2:
                options.append((("pool", 2), ("conv1", cout, 1)))
                if cout == c:
                    options.append((("pool", 2),))
        else:
            options = [(("linear", cout),)]
        proj = draw(st.sampled_from(options))
        # The branch's first layer does the same change of width and size as the shortcut.
        branch.append(g.weighted(draw(st.sampled_from((1, 3))), c, cout, stride))
    h_out = h // stride
    rest, _, _ = _draw_items(draw, g, cout, h_out, depth + 1, draw(st.integers(0, 3)), fixed=True)
    branch += rest
    # Repair to the contract: identity needs >= 2 weighted, or 1 + norm and no bypass;
    # projection needs >= 2.
    while True:
        weight, norm, bypass = chain_cost(tuple(branch))
        if weight >= 2 or (not projection and weight >= 1 and norm and not bypass):
            break
        branch.append(g.weighted(3, cout, cout, 1))
    return ("res", form, tuple(branch), proj), cout, h_out


@st.composite
def model_specs(draw: Any, decoys_only: bool = False, families: tuple = ("conv", "token")) -> tuple[str, tuple]:
    family = draw(st.sampled_from(families))
    g = _Gen(family)
    items, c, h = _draw_items(draw, g, C0, H0, 0, draw(st.integers(2, 5)), fixed=False,
                              decoys_only=decoys_only)
    if not decoys_only and not _has_res(items):  # every model has something to find
        if draw(st.booleans()):
            items.insert(0, _draw_res(draw, g, C0, H0, 0, fixed=True)[0])
        else:
            items.append(_draw_res(draw, g, c, h, 0, fixed=True)[0])
    return family, tuple(items)


def _has_res(items: Any) -> bool:
    return any(it[0] == "res" or (it[0] == "child" and _has_res(it[1])) for it in items)


# ----------------------------------------------------------------------------- builder
class SpecModule(nn.Module):
    """A module whose forward runs a fixed spec (plain Python over constant data: fx-traceable)."""

    def __init__(self, items: tuple, family: str, c: int, h: int) -> None:
        super().__init__()
        self.family = family
        self.items = items
        self.names: dict[tuple, str] = {}  # item path -> attribute name
        self.wids: dict[int, str] = {}  # weighted id -> attribute name
        self._count = 0
        self.act = nn.ReLU()  # one module called at many sites (reused)
        self.c_out, self.h_out = self._build(items, (), c, h)

    # -- construction
    def _reg(self, path: tuple, value: Any) -> None:
        name = f"m{self._count}"
        self._count += 1
        if isinstance(value, nn.Parameter):
            self.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            self.register_buffer(name, value)
        else:
            self.add_module(name, value)
        self.names[path] = name

    def _weighted(self, k: int, cin: int, cout: int, stride: int) -> nn.Module:
        if self.family == "conv":
            return nn.Conv2d(cin, cout, k, stride, k // 2)
        return nn.Linear(cin, cout)

    def _norm(self, which: str, c: int) -> nn.Module:
        return {"bn": lambda: nn.BatchNorm2d(c), "gn": lambda: nn.GroupNorm(2, c),
                "ln": lambda: nn.LayerNorm(c)}[which]()

    def _act_module(self, which: str) -> nn.Module | None:
        return {"relu": nn.ReLU, "gelu": nn.GELU}.get(which, lambda: None)()

    def _build(self, items: tuple, path: tuple, c: int, h: int) -> tuple[int, int]:
        for i, item in enumerate(items):
            p = path + (i,)
            kind = item[0]
            if kind == "w":
                _, k, cout, stride, wid = item
                self._reg(p, self._weighted(k, c, cout, stride))
                self.wids[wid] = self.names[p]
                c, h = cout, h // stride
            elif kind == "norm":
                self._reg(p, self._norm(item[1], c))
            elif kind == "act":
                module = self._act_module(item[1])
                if module is not None:
                    self._reg(p, module)
            elif kind == "res":
                _, form, branch, proj = item
                c_in, h_in = c, h
                c, h = self._build(branch, p + ("b",), c, h)
                pc, ph = c_in, h_in
                for j, step in enumerate(proj):
                    if step[0] == "conv1":
                        self._reg(p + ("s", j), nn.Conv2d(pc, step[1], 1, step[2]))
                        pc, ph = step[1], ph // step[2]
                    elif step[0] == "bn":
                        self._reg(p + ("s", j), nn.BatchNorm2d(pc))
                    elif step[0] == "pool":
                        self._reg(p + ("s", j), nn.AvgPool2d(step[1]))
                        ph = ph // step[1]
                    elif step[0] == "linear":
                        self._reg(p + ("s", j), nn.Linear(pc, step[1]))
                        pc = step[1]
                assert (pc, ph) == (c, h), (item, pc, ph, c, h)
                if form.startswith("scaled"):
                    shape = (1, c, 1, 1) if self.family == "conv" else (c,)
                    self._reg(p + ("gamma",), nn.Parameter(torch.rand(shape) + 0.5))
            elif kind == "child":
                child = SpecModule(item[1], self.family, c, h)
                self._reg(p, child)
                c, h = child.c_out, child.h_out
            elif kind == "fork":
                for j, sub in enumerate(item[1]):
                    self._build(sub, p + ("f", j), c, h)
                if item[2]:
                    self._reg(p + ("id",), nn.BatchNorm2d(c))
            elif kind == "light":
                _, act, depthwise, _ = item
                if self.family == "conv":
                    self._reg(p, nn.Conv2d(c, c, 3, 1, 1, groups=c if depthwise else 1))
                else:
                    self._reg(p, nn.Linear(c, c))
            elif kind == "pos":
                shape = (1, c, h, h) if self.family == "conv" else (1, N_TOKENS, c)
                self._reg(p, nn.Parameter(torch.randn(shape)))
            elif kind == "emb":
                self._reg(p, nn.Embedding(N_TOKENS, c))
                self._reg(p + ("idx",), torch.arange(N_TOKENS))
            elif kind == "attn":
                for j in range(4):  # q, k, v, out
                    self._reg(p + ("l", j), nn.Linear(c, c))
                self._reg(p + ("bias",), nn.Parameter(torch.randn(N_TOKENS, N_TOKENS)))
                self._reg(p + ("mask",), torch.randn(N_TOKENS, N_TOKENS) * 0.1)
        return c, h

    # -- forward
    def _m(self, path: tuple) -> Any:
        return getattr(self, self.names[path])

    def _act(self, which: str, path: tuple, y: torch.Tensor) -> torch.Tensor:
        if which in ("relu", "gelu"):
            return self._m(path)(y)
        if which == "shared":
            return self.act(y)
        if which == "F.relu":
            return F.relu(y)
        if which == "tanh":
            return torch.tanh(y)
        return y.relu()

    def _run(self, items: tuple, path: tuple, y: torch.Tensor) -> torch.Tensor:
        for i, item in enumerate(items):
            p = path + (i,)
            kind = item[0]
            if kind in ("w", "norm", "child"):
                y = self._m(p)(y)
            elif kind == "reuse":
                y = getattr(self, self.wids[item[1]])(y)
            elif kind == "act":
                y = self._act(item[1], p, y)
            elif kind == "res":
                y = self._residual(item, p, y)
            elif kind == "fork":
                total = self._run(item[1][0], p + ("f", 0), y)
                for j in range(1, len(item[1])):
                    total = total + self._run(item[1][j], p + ("f", j), y)
                if item[2]:
                    total = total + self._m(p + ("id",))(y)
                y = total
            elif kind == "light":
                z = self._m(p)(y)
                if item[1]:
                    z = self.act(z)
                y = y + z if item[3] else z + y
            elif kind == "pos":
                y = y + self._m(p) if item[1] else self._m(p) + y
            elif kind == "emb":
                e = self._m(p)(self._m(p + ("idx",)))
                y = y + e if item[1] else e + y
            elif kind == "attn":
                q, k, v = (self._m(p + ("l", j))(y) for j in range(3))
                logits = q @ k.transpose(-2, -1) * (1.0 / 2.0)
                logits = logits + self._m(p + ("bias",))
                logits = logits + self._m(p + ("mask",))
                y = self._m(p + ("l", 3))(logits.softmax(-1) @ v)
        return y

    def _residual(self, item: tuple, p: tuple, x: torch.Tensor) -> torch.Tensor:
        _, form, branch, proj = item
        f = self._run(branch, p + ("b",), x)
        s = x
        for j in range(len(proj)):
            s = self._m(p + ("s", j))(s)
        if form == "left":
            return f + s
        if form == "right":
            return s + f
        if form == "torch_add_left":
            return torch.add(f, s)
        if form == "torch_add_right":
            return torch.add(s, f)
        if form == "method":
            return f.add(s)
        if form == "iadd":
            f += s
            return f
        gamma = self._m(p + ("gamma",))
        if form == "scaled_left":
            return f * gamma + s
        return s + gamma * f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.items, (), x)


class FuzzNet(SpecModule):
    """The root: stem, the spec (root-level adds included), pooled linear head."""

    def __init__(self, family: str, items: tuple) -> None:
        super().__init__(items, family, C0, H0)
        self.stem = nn.Conv2d(3, C0, 3, 1, 1) if family == "conv" else nn.Linear(6, C0)
        self.head = nn.Linear(self.c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._run(self.items, (), self.stem(x))
        return self.head(y.mean((2, 3)) if self.family == "conv" else y.mean(1))


def build(spec: tuple[str, tuple], seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    family, items = spec
    torch.manual_seed(seed)
    model = FuzzNet(family, items)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norm affines and running stats, so norms are observable
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    shape = (BATCH, 3, H0, H0) if family == "conv" else (BATCH, N_TOKENS, 6)
    return model, torch.randn(shape, generator=g)


def _event_sites(expected: dict[str, list]) -> None:
    n = sum(len(v) for v in expected.values())
    event(f"planted sites: {min(n, 5)}{'+' if n >= 5 else ''}, scopes with sites: {min(len(expected), 3)}")


def expected_sites(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """scope -> [(kind, branch operand)] of the planted adds, in the order the forward runs them."""
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def walk(module: SpecModule, scope: str, items: tuple, path: tuple) -> None:
        for i, item in enumerate(items):
            p = path + (i,)
            if item[0] == "res":
                walk(module, scope, item[2], p + ("b",))  # nested adds run first
                out[scope].append(("projection" if item[3] else "identity", BRANCH_OPERAND[item[1]]))
            elif item[0] == "child":
                name = module.names[p]
                child = getattr(module, name)
                walk(child, f"{scope}.{name}" if scope else name, child.items, ())

    walk(model, "", model.items, ())
    return dict(out)


def found_sites(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s in find_residual_sites(model):
        out[s.scope].append((s.kind, s.branch_operand))
    return dict(out)


def run(model: nn.Module, x: torch.Tensor, train: bool, seed: int = 123) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- properties
@FUZZ
@given(model_specs())
def test_planted_sites_found_and_decoys_ignored(spec):
    model, x = build(spec)
    expected = expected_sites(model)
    _event_sites(expected)
    assert found_sites(model) == expected, spec
    model.eval()
    model(x)  # the generated model runs (sanity of the generator itself)


@FUZZ
@given(model_specs(decoys_only=True))
def test_decoy_only_models_have_no_site_and_are_refused_untouched(spec):
    model, x = build(spec)
    assert expected_sites(model) == {}
    assert find_residual_sites(model) == []
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NoSitesError, match="no residual sites found in FuzzNet"):
        apply_stochastic_depth(model, rate=0.5)
    assert not is_patched(model) and "forward" not in model.__dict__
    assert state_equal(model.state_dict(), before)


@FUZZ
@given(model_specs())
def test_strip_apply_is_exact_and_keys_never_change(spec):
    model, x = build(spec)
    expected = expected_sites(model)
    _event_sites(expected)
    n_sites = sum(len(v) for v in expected.values())
    assert n_sites > 0
    keys = list(model.state_dict())
    reference = copy.deepcopy(model)
    eval_ref = run(reference, x, train=False)
    trained_ref = copy.deepcopy(reference)
    train_ref = run(trained_ref, x, train=True)
    patched = apply_stochastic_depth(model, rate=0.5, schedule="uniform", inplace=False)
    assert not is_patched(model) and is_patched(patched)
    assert list(patched.state_dict()) == keys
    assert len(inserted_modules(patched)) == n_sites  # one DropPath per planted call site
    stripped = strip(copy.deepcopy(patched))
    assert torch.equal(run(patched, x, train=False), eval_ref)  # eval: the class forward
    run(patched, x, train=True)  # the patched train forward runs
    assert not is_patched(stripped)
    assert list(stripped.state_dict()) == keys
    assert torch.equal(run(stripped, x, train=False), eval_ref)
    # Train mode (BatchNorm batch statistics and running-stat updates), same seed: bitwise.
    assert torch.equal(run(stripped, x, train=True), train_ref)
    assert state_equal(stripped.state_dict(), trained_ref.state_dict())


@FUZZ
@given(model_specs())
def test_rate_zero_patch_reproduces_train_forward(spec):
    """With p = 0 every DropPath is the identity: the rewritten train graph must compute the
    original train forward bitwise (BatchNorm statistic updates included)."""
    model, x = build(spec)
    _event_sites(expected_sites(model))
    reference = copy.deepcopy(model)
    patched = apply_stochastic_depth(model, rate=0.0)
    assert torch.equal(run(patched, x, train=True), run(reference, x, train=True))
    assert state_equal(patched.state_dict(), reference.state_dict())


@settings(FUZZ, max_examples=25)
@given(model_specs(families=("conv",)))
def test_dropblock_and_drop_path_strip_exactly(spec):
    # Wrapped in a child module: a site belongs to the conv stage of its module's output, and the
    # root's output is the logits, no feature map.
    model, x = build((spec[0], (("child", spec[1]),)))
    _event_sites(expected_sites(model))
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    stages = residual_stages(find_conv_stages(model, x))  # what stages=(1, ..., n) numbers
    staged = sum(len(stage.sites) for stage in stages)
    event(f"sites in conv stages: {min(staged, 3)}")
    if not staged:  # e.g. only root-level adds, whose output (the logits) is no feature map
        return
    patched = apply_stochastic_depth(model, rate=0.3, inplace=False)
    patched = apply_dropblock(patched, rate=0.3, block_size=3, stages=tuple(range(1, len(stages) + 1)),
                              example_inputs=x)
    assert list(patched.state_dict()) == keys
    assert torch.equal(run(patched, x, train=False), run(reference, x, train=False))
    run(patched, x, train=True)
    fresh = copy.deepcopy(reference)
    stripped = strip(apply_dropblock(
        apply_stochastic_depth(copy.deepcopy(reference), rate=0.3), rate=0.3, block_size=3,
        stages=tuple(range(1, len(stages) + 1)), example_inputs=x))
    assert not is_patched(stripped) and list(stripped.state_dict()) == keys
    assert torch.equal(run(stripped, x, train=True), run(fresh, x, train=True))
    assert torch.equal(run(stripped, x, train=False), run(fresh, x, train=False))


# ----------------------------------------------------------------------------- generator checks
def test_generator_covers_every_case():
    """The strategy reaches every planted form, every decoy and nesting (else the properties
    above would hold vacuously for the missing cases)."""
    seen: set[str] = set()

    def collect(items: tuple, depth: int) -> None:
        for item in items:
            seen.add(item[0])
            if item[0] == "res":
                seen.add(f"form:{item[1]}")
                seen.add("projection" if item[3] else "identity")
                if any(sub[0] in ("res", "child") for sub in item[2]):
                    seen.add("nested")
                collect(item[2], depth + 1)
            elif item[0] == "child":
                collect(item[1], depth + 1)
            elif item[0] == "fork" and item[2]:
                seen.add("bn_identity")

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(model_specs())
    def gather(spec):
        collect(spec[1], 0)

    gather()
    wanted = {"w", "reuse", "norm", "act", "res", "child", "fork", "light", "pos", "emb", "attn",
              "identity", "projection", "nested", "bn_identity"} | {f"form:{f}" for f in RES_FORMS}
    assert wanted <= seen, wanted - seen


def test_contract_examples_by_hand():
    """Hand-picked specs at the edges of the contract (the generator's own expectations)."""
    w = ("w", 3, C0, 1, 0)
    w2 = ("w", 3, C0, 1, 1)
    cases = [
        # 1 weighted + norm: a site; 1 weighted without a norm: a decoy (CPE-like)
        ((("res", "left", (w, ("norm", "bn")), ()),), {"": [("identity", 0)]}),
        ((("light", False, True, True),), {}),
        # projection: 2-layer branch vs conv1x1 shortcut
        ((("res", "right", (("w", 3, 8, 2, 0), ("w", 3, 8, 1, 1)), (("conv1", 8, 2), ("bn",))),),
         {"": [("projection", 1)]}),
        # parallel one-layer branches with BN identity (RepVGG): a decoy
        ((("fork", ((w, ("norm", "bn")), (w2, ("norm", "bn"))), True),), {}),
        # a child holding two parallel convs is one layer deep, not two: no site around it
        ((("res", "left", (("child", (("fork", ((w,), (w2,)), False),)),), ()),), {}),
        ((("res", "left", (w, ("child", (("fork", ((w,), (w2,)), False),))), ()),),
         {"": [("identity", 0)]}),
        # a residual inside a child inside a residual branch
        ((("res", "iadd", (("child", (("res", "method", (w, w2), ()),)), ("w", 1, C0, 1, 2)), ()),),
         {"": [("identity", 0)], "m0": [("identity", 0)]}),
    ]
    for items, expected in cases:
        model, x = build(("conv", items))
        assert found_sites(model) == expected, items
        model(x)
