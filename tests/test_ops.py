"""Tests for regsurgery.ops: DropPath, DropBlock2d/3d and the DropBlock rate calibration.

Statistical tests use fixed seeds and tolerances derived from the sample size: 5 sigma of the
exact (or a provably larger) standard deviation of the estimate. The sample sizes are chosen so
that 5 sigma is at most 4% of the requested rate, i.e. well inside the issue's [0.95, 1.05]
realized/requested band.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from tolerances import assert_close_reduced, model_reduction
from torch import nn

from regsurgery.ops.drop import (
    DropBlock2d,
    DropBlock3d,
    DropPath,
    RegularizerModule,
    _traced_gamma,
    calibrate_gamma,
    drop_block2d,
    drop_block3d,
    drop_path,
    expected_drop_fraction,
)

SIGMAS = 5.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# exact moments of DropBlock's drop fraction, computed independently of regsurgery.ops
# ----------------------------------------------------------------------------------------------
def _cover_1d(length: int, k: int) -> torch.Tensor:
    """(length, length - k + 1) float64: 1 where valid seed s covers position i."""
    i = torch.arange(length)[:, None]
    s = torch.arange(length - k + 1)[None, :]
    return ((s <= i) & (i <= s + k - 1)).double()


def exact_moments(spatial: tuple, block_size: int, gamma: float) -> tuple:
    """(E[F], Var[F]) of one sample's drop fraction F, from the brute-force coverage matrices.

    A unit u survives iff none of the seeds covering it fires: P = (1-g)^c(u). Two units u, v
    both survive iff none of the |S_u ∪ S_v| = c(u) + c(v) - o(u, v) seeds fires, so
    Cov(keep_u, keep_v) = (1-g)^(c_u + c_v - o_uv) - (1-g)^(c_u + c_v); it is 0 unless some
    seed covers both (offset < k in every dim), so only those offsets are summed.
    """
    ks = [min(block_size, s) for s in spatial]
    covers = [_cover_1d(s, k) for s, k in zip(spatial, ks)]
    counts = [c.sum(1) for c in covers]  # per-dim c_d(i)
    overlaps = [c @ c.T for c in covers]  # per-dim o_d(i, i')
    lq = math.log1p(-gamma) if gamma < 1 else -math.inf
    c = counts[0]
    for extra in counts[1:]:
        c = c[..., None] * extra  # c(u) = prod_d c_d(u_d)
    mean = 1.0 - torch.exp(c * lq).mean().item()
    numel = c.numel()
    total = 0.0
    for offs in itertools.product(*[range(-(k - 1), k) for k in ks]):
        sl_u, sl_v, o = [], [], None
        for d, (length, delta) in enumerate(zip(spatial, offs)):
            lo, hi = max(0, -delta), min(length, length - delta)
            sl_u.append(slice(lo, hi))
            sl_v.append(slice(lo + delta, hi + delta))
            od = overlaps[d][torch.arange(lo, hi), torch.arange(lo, hi) + delta]
            shape = [1] * len(spatial)
            shape[d] = -1
            od = od.reshape(shape)
            o = od if o is None else o * od
        both = c[tuple(sl_u)] + c[tuple(sl_v)]
        total += (torch.exp((both - o) * lq) - torch.exp(both * lq)).sum().item()
    return mean, total / numel**2


def drop_fraction(fn, n: int, spatial: tuple, p: float, block_size: int, seed: int, **kw) -> float:
    """Fraction of zeroed units over n samples of ones(n, 1, *spatial), in chunks."""
    g = gen(seed)
    per = math.prod(spatial)
    chunk = max(1, 4_000_000 // per)
    zeros = 0
    done = 0
    while done < n:
        m = min(chunk, n - done)
        out = fn(torch.ones((m, 1) + spatial), p, block_size, generator=g, **kw)
        zeros += int((out == 0).sum())
        done += m
    return zeros / (n * per)


def samples_for(var1: float, p: float, rel: float = 0.04) -> int:
    """Samples so that SIGMAS standard deviations of the mean fraction are rel * p."""
    return max(64, math.ceil(SIGMAS**2 * var1 / (rel * p) ** 2))


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
GRID_H = [7, 14, 28, 56]
GRID_BS = [1, 2, 3, 5, 7]
GRID_P = [0.05, 0.1, 0.2]


@pytest.mark.parametrize("spatial,bs", [((7, 7), 7), ((14, 14), 7), ((13, 9), 4), ((56, 56), 2),
                                        ((5, 12), 7), ((6, 7, 8), 3), ((4, 9, 9), 6)])
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9, 0.999])
def test_calibrated_gamma_hits_p_exactly(spatial, bs, p):
    gamma = calibrate_gamma(spatial, bs, p)
    mean, _ = exact_moments(spatial, bs, gamma)  # independent brute-force coverage counts
    assert mean == pytest.approx(p, rel=1e-9, abs=1e-12)
    assert expected_drop_fraction(spatial, bs, gamma) == pytest.approx(p, rel=1e-12)


def test_paper_gamma_is_wrong_and_ours_differs():
    # The paper's gamma = p / k^2 * HW / ((H-k+1)(W-k+1)) under-shoots on 14x14 (overlapping
    # blocks): 0.0929 realized for 0.1 requested, outside the issue's [0.95, 1.05] band.
    paper = 0.1 / 49 * 196 / 64
    assert expected_drop_fraction((14, 14), 7, paper) / 0.1 < 0.95
    assert calibrate_gamma((14, 14), 7, 0.1) != pytest.approx(paper, rel=1e-3)


def test_calibration_edges_and_cache():
    assert calibrate_gamma((14, 14), 7, 0.0) == 0.0
    assert calibrate_gamma((14, 14), 7, 1.0) == 1.0
    assert calibrate_gamma((7, 7), 7, 0.3) == pytest.approx(0.3)  # one seed: gamma == p
    assert calibrate_gamma((7, 7), 9, 0.3) == calibrate_gamma((7, 7), 7, 0.3)  # clipped block
    assert calibrate_gamma((20, 20), 1, 0.2) == pytest.approx(0.2)  # block 1 is dropout
    from regsurgery.ops.drop import _cached_gamma

    before = _cached_gamma.cache_info().hits
    calibrate_gamma((31, 17), 5, 0.123)
    calibrate_gamma((31, 17), 5, 0.123)
    assert _cached_gamma.cache_info().hits == before + 1


@pytest.mark.parametrize("spatial", [(7, 7), (14, 14), (56, 56), (9, 13), (4, 6, 8)])
@pytest.mark.parametrize("bs", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("p", [0.05, 0.2, 0.6, 0.9999, 1.0])
def test_traced_gamma_matches_float_solver(spatial, bs, p):
    kernel = tuple(min(bs, s) for s in spatial)
    traced = _traced_gamma(spatial, kernel, p, torch.device("cpu")).item()
    assert traced == pytest.approx(calibrate_gamma(spatial, bs, p), rel=2e-5)


# ----------------------------------------------------------------------------------------------
# realized drop rate (the acceptance grid)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", GRID_BS)
@pytest.mark.parametrize("H", GRID_H)
def test_realized_rate_grid(H, bs):
    for i, p in enumerate(GRID_P):
        gamma = calibrate_gamma((H, H), bs, p)
        mean, var1 = exact_moments((H, H), bs, gamma)
        assert mean == pytest.approx(p, rel=1e-9)
        n = samples_for(var1, p)
        sigma = math.sqrt(var1 / n)
        realized = drop_fraction(drop_block2d, n, (H, H), p, bs, seed=1000 * H + 10 * bs + i)
        assert abs(realized - p) <= SIGMAS * sigma, (H, bs, p, realized, sigma)
        assert 0.95 <= realized / p <= 1.05, (H, bs, p, realized)


@pytest.mark.parametrize("spatial,bs,p", [((8, 8, 8), 3, 0.1), ((4, 7, 7), 5, 0.2), ((3, 3, 3), 7, 0.1)])
def test_realized_rate_3d(spatial, bs, p):
    gamma = calibrate_gamma(spatial, bs, p)
    mean, var1 = exact_moments(spatial, bs, gamma)
    assert mean == pytest.approx(p, rel=1e-9)
    n = samples_for(var1, p)
    realized = drop_fraction(drop_block3d, n, spatial, p, bs, seed=7)
    assert abs(realized - p) <= SIGMAS * math.sqrt(var1 / n)


def test_realized_rate_per_channel():
    # Per-channel masks: each (sample, channel) map is an independent draw with the same law.
    H, bs, p, c = 14, 5, 0.1, 8
    mean, var1 = exact_moments((H, H), bs, calibrate_gamma((H, H), bs, p))
    n_maps = samples_for(var1, p)
    n = math.ceil(n_maps / c)
    out = drop_block2d(torch.ones(n, c, H, H), p, bs, per_channel=True, generator=gen(3))
    realized = (out == 0).double().mean().item()
    assert abs(realized - p) <= SIGMAS * math.sqrt(var1 / (n * c))
    # and the channels really differ
    assert not torch.equal(out[:, 0], out[:, 1])


@pytest.mark.parametrize("H,W,bs", [(10, 10, 2), (12, 9, 4), (11, 11, 3), (9, 10, 6)])
def test_per_unit_drop_probability_is_exact_and_centred(H, W, bs):
    """Each unit's empirical drop frequency matches 1 - (1-g)^c(u): blocks are placed where the
    coverage counts say (centred, inside the map), for odd and even sizes alike."""
    p, n = 0.2, 40_000
    gamma = calibrate_gamma((H, W), bs, p)
    c = _cover_1d(H, min(bs, H)).sum(1)[:, None] * _cover_1d(W, min(bs, W)).sum(1)[None, :]
    q = 1 - (1 - gamma) ** c  # exact per-unit drop probability
    freq = (drop_block2d(torch.ones(n, 1, H, W), p, bs, generator=gen(11)) == 0).double().mean(0)[0]
    sigma = torch.sqrt(q * (1 - q) / n)  # samples are independent: binomial per unit
    # 5.5 sigma: a Bonferroni margin for <= 132 units at once.
    assert ((freq - q).abs() <= 5.5 * sigma).all()
    assert torch.allclose(q, q.flip(0)) and torch.allclose(q, q.flip(1))  # symmetric = centred


@pytest.mark.parametrize("bs", [1, 2, 3, 4, 5, 6, 7, 8])
def test_dropped_region_is_union_of_full_blocks(bs):
    """Morphological opening with a bs x bs window leaves the dropped set unchanged: it is a
    union of complete blocks lying inside the map (no clipped edge blocks, even for even bs)."""
    H, W = 13, 16
    out = drop_block2d(torch.ones(64, 1, H, W), 0.3, bs, generator=gen(bs))
    dropped = (out == 0).float()
    fully = -F.max_pool2d(-dropped, bs, stride=1)  # windows entirely dropped (valid region)
    opened = F.max_pool2d(F.pad(fully, [bs - 1] * 4), bs, stride=1)
    assert torch.equal(opened, dropped)
    assert dropped.sum() > 0


def test_block_larger_than_map_is_clipped():
    # 9 > 7: clipped to the whole map, one valid seed, so each sample is all-or-nothing.
    n, p = 20_000, 0.1
    out = drop_block2d(torch.ones(n, 2, 7, 7), p, 9, generator=gen(5))
    per_sample = (out == 0).flatten(1).float().mean(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 1.0}
    assert abs(per_sample.mean().item() - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)
    # clipped in one dimension only: 5 x 12 map, 7 -> 5 x 7 blocks
    dropped = (drop_block2d(torch.ones(256, 1, 5, 12), 0.3, 7, generator=gen(6)) == 0)
    cols = dropped.any(2)  # a block spans all 5 rows, so dropped columns are fully dropped
    assert torch.equal(dropped, cols[:, :, None, :].expand_as(dropped))


# ----------------------------------------------------------------------------------------------
# rescaling, expectation, gradients
# ----------------------------------------------------------------------------------------------
def test_dropblock_rescale_by_count_keeps_the_mean():
    x = torch.arange(1.0, 9.0).reshape(1, 8, 1, 1).expand(16, 8, 10, 10).contiguous()
    out = drop_block2d(x, 0.3, 3, generator=gen(0))
    mask = out[:, :1] / x[:, :1]
    kept = mask != 0
    scale = mask.numel() / kept.sum()
    assert torch.allclose(mask[kept], scale.expand(int(kept.sum())))
    # shared mask + channel-constant input: every channel mean is preserved exactly
    assert torch.allclose(out.mean((0, 2, 3)), x.mean((0, 2, 3)))
    ones = drop_block2d(torch.ones(16, 4, 10, 10), 0.3, 3, per_channel=True, generator=gen(1))
    assert ones.mean().item() == pytest.approx(1.0, rel=1e-6)


def test_drop_path_unbiased_mean():
    p, n = 0.3, 1_000_000
    v = torch.tensor([1.0, -2.0, 0.5])
    out = drop_path(v.expand(n, 3), p, generator=gen(2))
    # mean over rows = v * K / (n (1-p)), K ~ Binomial(n, 1-p): relative sd sqrt(p / ((1-p) n))
    rel = out.double().mean(0) / v.double() - 1
    assert (rel.abs() <= SIGMAS * math.sqrt(p / ((1 - p) * n))).all()


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_drop_path_gradient_only_through_kept(mode):
    x = torch.randn(64, 5, 3, requires_grad=True)
    out = drop_path(x, 0.5, mode=mode, generator=gen(4))
    out.backward(torch.ones_like(out))
    kept = out.detach() != 0
    assert torch.all(x.grad[~kept] == 0)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 2.0))


def test_dropblock_gradient_only_through_kept():
    x = torch.randn(8, 3, 12, 12, requires_grad=True)
    out = drop_block2d(x, 0.3, 4, generator=gen(4))
    out.backward(torch.ones_like(out))
    scale = out.detach() / x.detach()
    assert torch.all(x.grad[out.detach() == 0] == 0)
    assert torch.allclose(x.grad, scale)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: drop_path(x, 0.4, generator=gen(0)),
        lambda x: drop_path(x, 0.4, mode="batch", generator=gen(3)),
        lambda x: drop_block2d(x, 0.3, 3, generator=gen(0)),
        lambda x: drop_block2d(x, 0.3, 2, per_channel=True, generator=gen(0)),
    ],
)
def test_gradcheck_2d(fn):
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_3d():
    x = torch.randn(2, 2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: drop_block3d(t, 0.3, 3, generator=gen(0)), (x,))


# ----------------------------------------------------------------------------------------------
# DropPath decisions
# ----------------------------------------------------------------------------------------------
def test_drop_path_row_mode_per_sample_decisions():
    p, n = 0.1, 1_000_000
    out = drop_path(torch.ones(n, 4), p, generator=gen(8))
    rows = out.unique(dim=0)
    assert torch.allclose(rows, torch.tensor([[0.0] * 4, [1 / (1 - p)] * 4]))  # all-or-nothing
    dropped = (out[:, 0] == 0).double().mean().item()
    assert abs(dropped - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)


def test_drop_path_batch_mode_one_decision():
    p, calls = 0.25, 4000
    g = gen(9)
    x = torch.ones(16, 3, 2)
    dropped = 0
    for _ in range(calls):
        out = drop_path(x, p, mode="batch", generator=g)
        assert out.unique().numel() == 1  # same decision for every sample
        dropped += int(out[0, 0, 0] == 0)
    assert abs(dropped / calls - p) <= SIGMAS * math.sqrt(p * (1 - p) / calls)


def test_drop_path_no_scale():
    out = drop_path(torch.ones(1000, 2), 0.5, scale_by_keep=False, generator=gen(0))
    assert set(out.unique().tolist()) == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------
# identity, limits, dtypes, reproducibility
# ----------------------------------------------------------------------------------------------
ALL_MODULES = [
    (lambda: DropPath(0.3), (4, 3, 5)),
    (lambda: DropPath(0.3, mode="batch"), (4, 3, 5)),
    (lambda: DropBlock2d(0.3, 3), (4, 3, 9, 9)),
    (lambda: DropBlock2d(0.3, 4, per_channel=True), (4, 3, 9, 9)),
    (lambda: DropBlock3d(0.3, 3), (2, 3, 5, 6, 7)),
]


@pytest.mark.parametrize("make,shape", ALL_MODULES)
def test_eval_is_identity_and_train_is_not(make, shape):
    m = make()
    x = torch.randn(shape)
    assert isinstance(m, RegularizerModule) and isinstance(m.p, float)
    m.eval()
    assert m(x) is x
    m.train()
    torch.manual_seed(0)
    assert any(not torch.equal(m(x), x) for _ in range(10))
    m.p = 0.0  # schedules assign the plain attribute
    assert torch.equal(m(x), x)
    assert "p=" in repr(m)


@pytest.mark.parametrize("fn,shape", [(drop_path, (3, 4)), (drop_block2d, (2, 3, 5, 5)),
                                      (drop_block3d, (2, 3, 4, 5, 5))])
def test_functional_identity_and_p_one(fn, shape):
    x = torch.randn(shape, requires_grad=True)
    assert fn(x, 0.7, training=False) is x
    assert fn(x, 0.0) is x
    for kw in ({}, {"generator": gen(0)}):
        z = fn(x, 1.0, **kw)
        assert torch.equal(z, torch.zeros(shape)) and torch.isfinite(z).all()
    z.sum().backward()
    assert torch.equal(x.grad, torch.zeros(shape))
    if fn is drop_path:
        assert torch.equal(fn(x, 1.0, mode="batch"), torch.zeros(shape))
        assert torch.equal(fn(x, 1.0, scale_by_keep=False), torch.zeros(shape))
    else:
        assert torch.equal(fn(x, 1.0, per_channel=True), torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_dtypes(dtype):
    p, bs, H = 0.1, 3, 14
    n = 4000
    out = drop_block2d(torch.ones(n, 1, H, H, dtype=dtype), p, bs, generator=gen(12))
    assert out.dtype == dtype
    _, var1 = exact_moments((H, H), bs, calibrate_gamma((H, H), bs, p))
    realized = (out == 0).double().mean().item()
    assert abs(realized - p) <= SIGMAS * math.sqrt(var1 / n)
    assert out.float().mean().item() == pytest.approx(1.0, rel=1e-2)  # rounding of the scale
    dp = drop_path(torch.ones(1000, 3, dtype=dtype), 0.2, generator=gen(13))
    assert dp.dtype == dtype
    assert set(dp.unique().float().tolist()) == {0.0, float(torch.tensor(1 / 0.8, dtype=dtype))}
    assert drop_block3d(torch.ones(2, 2, 4, 4, 4, dtype=dtype), 0.2, 2).dtype == dtype


def test_meta_device_plumbing():
    # No hidden CPU tensors: the whole op runs on the input's device.
    for out in (drop_path(torch.ones(4, 3, device="meta"), 0.2),
                drop_block2d(torch.ones(4, 3, 8, 8, device="meta"), 0.2, 3),
                drop_block3d(torch.ones(2, 3, 4, 8, 8, device="meta"), 0.2, 3)):
        assert out.device.type == "meta"
    assert _traced_gamma((8, 8), (3, 3), 0.2, torch.device("meta")).device.type == "meta"


def test_generator_reproducible():
    x = torch.randn(8, 4, 10, 10)
    for fn in (lambda g: drop_block2d(x, 0.2, 3, generator=g),
               lambda g: drop_block3d(x[:, :, None].expand(8, 4, 3, 10, 10), 0.2, 2, generator=g),
               lambda g: drop_path(x, 0.5, generator=g)):
        assert torch.equal(fn(gen(42)), fn(gen(42)))
        assert not torch.equal(fn(gen(42)), fn(gen(43)))


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        drop_path(torch.ones(3, 2, dtype=torch.long), 0.1)


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True])
def test_bad_p(bad):
    x2, x4, x5 = torch.ones(2, 3), torch.ones(2, 3, 5, 5), torch.ones(2, 3, 4, 5, 5)
    calls = [lambda: drop_path(x2, bad), lambda: drop_block2d(x4, bad), lambda: drop_block3d(x5, bad),
             lambda: DropPath(bad), lambda: DropBlock2d(bad), lambda: DropBlock3d(bad),
             lambda: calibrate_gamma((5, 5), 3, bad)]
    for call in calls:
        with pytest.raises(ValueError, match=r"p=") as err:
            call()
        assert repr(bad) in str(err.value)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_block_size(bad):
    for call in (lambda: drop_block2d(torch.ones(2, 3, 5, 5), 0.1, bad),
                 lambda: drop_block3d(torch.ones(2, 3, 4, 5, 5), 0.1, bad),
                 lambda: DropBlock2d(0.1, bad), lambda: DropBlock3d(0.1, bad)):
        with pytest.raises(ValueError, match=rf"block_size={bad!r}"):
            call()


def test_bad_dims_and_mode():
    with pytest.raises(ValueError, match=r"drop_block2d: x must be 4-D .* got 3-D"):
        drop_block2d(torch.ones(3, 5, 5), 0.1)
    with pytest.raises(ValueError, match=r"drop_block3d: x must be 5-D .* got 4-D"):
        drop_block3d(torch.ones(2, 3, 5, 5), 0.1)
    with pytest.raises(ValueError, match=r"drop_block2d: x must be 4-D .* got 5-D"):
        DropBlock2d(0.1)(torch.ones(2, 3, 4, 5, 5))
    with pytest.raises(ValueError, match=r"0-d"):
        drop_path(torch.tensor(1.0), 0.1)
    with pytest.raises(ValueError, match=r"mode='col'"):
        drop_path(torch.ones(2, 3), 0.1, mode="col")
    with pytest.raises(ValueError, match=r"mode='col'"):
        DropPath(0.1, mode="col")
    # a schedule that assigns a bad rate is caught at the next training step
    m = DropBlock2d(0.1)
    m.p = 1.2
    with pytest.raises(ValueError, match=r"p=1.2"):
        m(torch.ones(2, 3, 8, 8))


# ----------------------------------------------------------------------------------------------
# torch.fx, torch.compile, ONNX
# ----------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.db = DropBlock2d(0.3, 3)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.dp = DropPath(0.5)
        self.db3 = DropBlock3d(0.2, 2)

    def forward(self, x):
        y = self.db(self.conv(x))
        y = y + self.dp(self.branch(y))
        return self.db3(y[:, :, None].expand(-1, -1, 2, -1, -1)).sum(2)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, RegularizerModule) or super().is_leaf_module(m, qualname)


def test_fx_leaf_modules_stay_stochastic():
    net = _Net()
    graph = _LeafTracer().trace(net)
    gm = fx.GraphModule(net, graph)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"db", "dp", "db3"} <= targets
    assert isinstance(gm.get_submodule("dp"), DropPath)
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    outs = [gm(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])
    gm.eval()
    net.eval()
    assert torch.allclose(gm(x), net(x))
    plain = net.conv(x)
    plain = 2 * (plain + net.branch(plain))  # db3 sees two identical depth slices, summed
    reduction, depth = model_reduction(net, x)
    assert_close_reduced(gm(x), plain, reduction, depth)


def _compile_counts(module: nn.Module, shape: tuple, backend: str) -> int:
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for i, p in enumerate((0.1, 0.25, 0.4, 0.05, 0.3)):
        module.p = p  # a schedule changing the rate must not recompile every step
        # a batch size change makes dim 0 dynamic (the last batch of an epoch)
        x = torch.ones((shape[0] + (i >= 3),) + shape[1:], requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        assert out.shape == x.shape
    module.p = 1.0
    assert torch.equal(compiled(x), torch.zeros_like(x))
    module.eval()
    assert torch.equal(compiled(x), x)
    return counter.frame_count


@pytest.mark.parametrize("make,shape", ALL_MODULES)
def test_compile_fullgraph_no_recompile_on_rate_change(make, shape):
    # fullgraph=True raises on any graph break; the first rate specializes, the second makes p
    # dynamic, the batch size change makes dim 0 dynamic, eval adds one graph: 4 frames
    # however often p changes.
    assert _compile_counts(make(), shape, "eager") <= 4


def test_compile_aot_eager_dropblock_rate():
    import torch._dynamo

    torch._dynamo.reset()
    m = DropBlock2d(0.1, 5)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    H, p = 14, 0.2
    n = 6000
    compiled(torch.ones(2, 1, H, H))
    m.p = p
    torch.manual_seed(21)
    out = compiled(torch.ones(n, 1, H, H))
    _, var1 = exact_moments((H, H), 5, calibrate_gamma((H, H), 5, p))
    realized = (out == 0).double().mean().item()
    assert abs(realized - p) <= SIGMAS * math.sqrt(var1 / n)


def test_onnx_eval_export_has_no_random_nodes(tmp_path):
    import onnx
    import onnxruntime as ort

    net = _Net().eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True, external_data=False)
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    random_ops = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
                  "Bernoulli", "Dropout", "Multinomial"}
    assert not ops & random_ops, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    reduction, depth = model_reduction(net, x)  # onnxruntime's kernels sum in their own order
    assert_close_reduced(torch.from_numpy(got), net(x), reduction, depth)
