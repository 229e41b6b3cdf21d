"""Small hand-written models, one per tricky case of residual detection and surgery."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BranchLeft(nn.Module):
    """out = f(x) + x"""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + x)


class BranchRight(BranchLeft):
    """out = x + f(x), the branch in the second operand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(x + y)


class ProjectionBlock(nn.Module):
    """Downsampling block: f(x) + proj(x), proj = 1x1 conv + BN."""

    def __init__(self, cin: int = 8, cout: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, 2), nn.ReLU(), conv_bn(cout, cout))
        self.proj = conv_bn(cin, cout, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.proj(x))


class ReusedModules(nn.Module):
    """One ReLU called three times, one norm twice: insertion must be per call site."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm(self.conv1(self.relu(x))))
        y = self.conv2(y)
        return self.relu(x + y)


class TwoResiduals(nn.Module):
    """A transformer-style block: two residuals sharing one depth."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Nested(nn.Module):
    """A residual around a stage that itself holds residual blocks."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.inner = nn.Sequential(BranchLeft(c), BranchRight(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class PosEmbed(nn.Module):
    """Decoy: a learned position embedding added to tokens (a parameter operand)."""

    def __init__(self, n: int = 4, d: int = 16) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n, d))
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos


class AttentionBias(nn.Module):
    """Decoys: an attention bias from a table and a mask from an argument, added to logits."""

    def __init__(self, n: int = 4, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(n, n))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.bias
        attn = attn + mask
        return self.proj(attn.softmax(-1) @ v)


class ParallelBranches(nn.Module):
    """Decoy: RepVGG-style sum of parallel conv branches with a BN identity branch."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense = conv_bn(c, c, 3)
        self.pointwise = conv_bn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x) + self.pointwise(x) + self.identity(x))


class AttentionTerms(nn.Module):
    """Decoy: a sum of two attention terms computed from the same q, k, v (CoaT style)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.crpe = nn.Conv1d(d, d, 3, padding=1, groups=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        factor = q @ (k.softmax(1).transpose(-2, -1) @ v)
        crpe = q * self.crpe(v.transpose(1, 2)).transpose(1, 2)
        return factor + crpe


class ConvPosEnc(nn.Module):
    """Decoy: a conditional position encoding x + dwconv(x) (one weighted layer, no norm)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + x


class FPNMerge(nn.Module):
    """Decoy: a feature-pyramid top-down merge lateral(c4) + upsample(p5)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.down = nn.Sequential(conv_bn(c, c, 3, 2), nn.ReLU(), conv_bn(c, c, 3))
        self.lateral4 = nn.Conv2d(c, c, 1)
        self.lateral5 = nn.Conv2d(c, c, 1)

    def forward(self, c4: torch.Tensor) -> torch.Tensor:
        p5 = self.lateral5(self.down(c4))
        return self.lateral4(c4) + F.interpolate(p5, scale_factor=2.0)


class Untraceable(nn.Module):
    """A block with data-dependent control flow: fx cannot trace it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.inner = BranchLeft(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 1e9:  # data-dependent: a TraceError under fx
            return x
        return self.inner(x) + x


class TrainingBranch(nn.Module):
    """A block that reads self.training and a buffer in its own forward."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.register_buffer("offset", torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.training:
            y = y * 1.0 + 0.0
        return x + y + self.offset


class Net(nn.Module):
    """A small CNN mixing the cases above; its root forward is data-dependent (untraceable)."""

    def __init__(self, c: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn(3, c)
        self.stage1 = nn.Sequential(BranchLeft(c), BranchRight(c), ReusedModules(c))
        self.stage2 = nn.Sequential(ProjectionBlock(c, 2 * c), BranchLeft(2 * c), Untraceable(2 * c))
        self.stage3 = nn.Sequential(ProjectionBlock(2 * c, 4 * c), TrainingBranch(4 * c), ParallelBranches(4 * c))
        self.head = nn.Linear(4 * c, num_classes)
        self.alias = self.stage1[0]  # one module registered under two names

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(self.stage2(self.stage1(F.relu(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # shape-dependent: the root does not trace as a whole
            return x.new_zeros(0, self.head.out_features)
        return self.head(self.forward_features(x).mean((2, 3)))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial affine parameters (many inits zero the last norm of a branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


class LayerScale(nn.Module):
    """A learned per-channel scale (CaiT's LayerScale): parameters, no children, no layer."""

    def __init__(self, c: int, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((c, *shape), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PoolMixer(nn.Module):
    """PoolFormer / EfficientFormer token mixer: pool(x) - x, no weights."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class LayerScaledPool(nn.Module):
    """Site: x + ls(pool_mixer(x)), a one-layer branch without a norm, marked by its layer scale
    (EfficientFormer's Meta4D token mixer)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.mixer = PoolMixer()
        self.ls = LayerScale(c, (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls(self.mixer(x))


class LayerScaledLinear(nn.Module):
    """Site: x + gamma * fc(x)^T over tokens (ResMLP's token mixing, gamma a parameter)."""

    def __init__(self, n: int = 4, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.gamma = nn.Parameter(torch.full((d,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc(x.transpose(1, 2)).transpose(1, 2)


class RepMixerLike(nn.Module):
    """Decoy: FastViT RepMixer, x + gamma * (mixer(x) - norm(x)): two parallel one-layer paths
    of a reparameterizable block, combined and scaled."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.mixer = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.norm = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * (self.mixer(x) - self.norm(x))


class BatchNormOnly(nn.Module):
    """A custom module holding only a BN (FastViT's MobileOneBlock with no conv branch)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.identity(x)


class CustomNormRepMixer(nn.Module):
    """Decoy: FastViT's RepMixer as timm builds it, x + gamma * (mixer(x) - norm(x)) with the
    ``norm`` path a custom module of a BN only: a normalization, not a layer."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.mixer = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.norm = BatchNormOnly(c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * (self.mixer(x) - self.norm(x))


class ForkedOneLayer(nn.Module):
    """Site: x + (bn_a(conv_a(x)) + bn_b(conv_b(x))), parallel one-layer paths that all pass a
    layer (no layer-free path around it): one normalized layer, reparameterized."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)
        self.conv_b, self.bn_b = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))


class NestedOneLayer(nn.Module):
    """Two sites: y = x + conv(bn(x)) nested in the branch of x + y."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.conv(self.bn(x))
        return x + y


class GatedOneLayer(nn.Module):
    """Site: x + bn(conv(x)) * sigmoid(fc(mean(x))): a product (a gate) is not a bypass."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return x + self.bn(self.conv(x)) * gate


class ResScaleShortcut(nn.Module):
    """Site: res_scale(x) + ls(pool_mixer(norm(x))) (PoolFormerV2): the shortcut is a learned
    scale of x, an identity in disguise, and the branch is one layer with a norm."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, c)
        self.mixer = PoolMixer()
        self.res_scale = LayerScale(c, (1, 1))
        self.ls = LayerScale(c, (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale(x) + self.ls(self.mixer(self.norm(x)))


class SplitChunks(nn.Module):
    """Decoy: Res2Net's hierarchical adds, conv(chunk 0) + chunk 1: the two operands are different
    channels of one split tensor, not a value and a function of it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv0 = conv_bn(c // 2, c // 2)
        self.conv1 = conv_bn(c // 2, c // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        y0 = F.relu(self.conv0(a))
        y1 = F.relu(self.conv1(y0 + b))
        return torch.cat([y0, y1], dim=1)


class KxKShortcut(nn.Module):
    """Decoy: attention-like branch (a product of two activations) + a 3x3 stride-2 conv of the
    input (EfficientFormerV2's downsampler): two computations merged, not a residual unit."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.q = conv_bn(c, 2 * c, 3, 2)
        self.v = conv_bn(c, 2 * c, 3, 2)
        self.proj = conv_bn(2 * c, 2 * c, 1)
        self.conv = conv_bn(c, 2 * c, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, v = self.q(x), self.v(x)
        qf, vf = q.flatten(2), v.flatten(2)
        attn = (qf.transpose(1, 2) @ qf).softmax(-1)
        y = (vf @ attn).reshape(q.shape)
        return self.proj(F.relu(y)) + self.conv(x)


class StridedConvShortcut(nn.Module):
    """A residual unit whose shortcut is a strided 3x3 conv + BN (not only 1x1 / pooling)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn(c, 2 * c, 3, 2), nn.ReLU(), conv_bn(2 * c, 2 * c, 3))
        self.shortcut = conv_bn(c, 2 * c, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class ConvNormAct(nn.Sequential):
    """conv, norm and activation in one ``nn.Sequential`` subclass."""

    def __init__(self, c: int) -> None:
        super().__init__(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class OneConvBranch(nn.Module):
    """out = x + block(x), block = Sequential(Conv2d, BatchNorm2d, ReLU): a one-conv residual."""

    def __init__(self, c: int = 8, subclass: bool = False) -> None:
        super().__init__()
        self.block = ConvNormAct(c) if subclass else nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class LoopBlocks(nn.Module):
    """Residual adds performed in one forward loop: ``for blk in self.blocks: x = x + blk(x)``."""

    def __init__(self, c: int = 8, n: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return x


class MBStack(nn.Module):
    """An EfficientNet-like stack: blocks with and without a residual (stride / width changes)."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.res = cin == cout and stride == 1
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return y + x if self.res else y

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        cfg = [(8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1)]
        self.features = nn.Sequential(*(MBStack.Block(*c) for c in cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2)
        self.conv = conv_bn(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(self.up(x)))


class UNetAddDecoder(nn.Module):
    """A U-Net that *adds* the upsampled deeper path to the encoder skip (``x = up(x) + skip``),
    the upsampling inside a wrapper module: a merge, not a residual site."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn(3, c)
        self.downs = nn.ModuleList([nn.Sequential(conv_bn(c, c, 3, 2), nn.ReLU(), conv_bn(c, c)) for _ in range(2)])
        self.ups = nn.ModuleList([_Up(c, c) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        skips = []
        for d in self.downs:
            skips.append(x)
            x = d(x)
        for i, u in enumerate(self.ups):
            x = u(x) + skips[-1 - i]
        return x


class Res3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.proj = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x if self.proj is None else self.proj(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + s)


class Net3d(nn.Module):
    """A 3-D conv net on (N, C, D, H, W) volumes (video / medical)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c), nn.ReLU())
        self.layer1 = nn.Sequential(Res3d(c, c, 1), Res3d(c, c, 1))
        self.layer2 = nn.Sequential(Res3d(c, 2 * c, 2), Res3d(2 * c, 2 * c, 1))
        self.layer3 = nn.Sequential(Res3d(2 * c, 4 * c, 2), Res3d(4 * c, 4 * c, 1))
        self.head = nn.Linear(4 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))).mean((2, 3, 4)))


class Res1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net1d(nn.Module):
    """A 1-D conv net on (N, C, L) audio."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, c, 5, 2, 2)
        self.blocks = nn.Sequential(Res1d(c), Res1d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class ShapeOnlyMerge(nn.Module):
    """Decoy: TNT's outer += proj(norm(inner.reshape(B, N, -1))): the outer tokens lend only their
    shape to the projected inner tokens, so the add merges two different values."""

    def __init__(self, d: int = 16, inner: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d * inner)
        self.proj = nn.Linear(d * inner, d)

    def forward(self, inner: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = outer.shape
        return inner, outer + self.proj(self.norm(inner.reshape(B, N, -1)))


class _Mix(nn.Module):
    """A residual block that also reads a context tensor: x + fc2(relu(fc1(norm(x)) + ctx))."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x)) + ctx))


class _CtxRes(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class ContextGenerator(nn.Module):
    """GCViT-like: a residual block computes a context (global query) that the stacked blocks read
    as an extra argument; the stream that continues is ``x``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ctx = _CtxRes(d)
        self.blocks = nn.ModuleList([_Mix(d) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ctx(x)
        for blk in self.blocks:
            x = blk(x, q)
        return x
