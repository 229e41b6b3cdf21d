"""Train a small ResNet with DropPath and a scheduled DropBlock, on data made here.

    python examples/train_small_resnet.py [--steps 300] [--batch 32]

The model is regsurgery's built-in example (a ResNet-10-like CNN) on 32x32 images of oriented
gratings (10 classes: orientation x frequency) with noise; nothing is downloaded. The recipe is the
DropBlock paper's: DropBlock on the last two stages, branch and skip, its rate ramped linearly from
0 to the target over training; plus linear-decay stochastic depth. Every 50 steps it prints the
loss and the live rates. Finishes in well under two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import regsurgery
from regsurgery.io.examples_models import tiny_resnet


def make_gratings(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of oriented sine gratings; the class is (orientation, frequency)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    angle = (labels % 5).float() * math.pi / 5 + 0.15 * torch.randn(n, generator=g)
    freq = torch.where(labels < 5, 2.0, 4.0) * 2 * math.pi / size
    phase = 2 * math.pi * torch.rand(n, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]
    img = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    img = img[:, None].expand(n, 3, size, size) + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return img.contiguous(), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--drop-block", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train = make_gratings(4096, seed=1)
    x_test, y_test = make_gratings(1024, seed=2)

    model = tiny_resnet(num_classes=10)
    example = x_train[:2]
    regsurgery.apply_stochastic_depth(model, rate=args.drop_path)
    regsurgery.apply_dropblock(model, rate=args.drop_block, block_size=args.block_size, example_inputs=example)
    print(f"inserted {len(regsurgery.inserted_modules(model))} regularizers:")
    for name, module in regsurgery.inserted_modules(model).items():
        print(f"  {name}: {module}")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    # The paper ramps DropBlock's rate from 0 to its target; DropPath keeps its rate.
    schedule = regsurgery.RateSchedule(model, total_steps=args.steps, kinds=("drop_block",))
    schedule.bind(optimizer)  # every optimizer.step() advances the ramp

    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 1:
            rates = schedule.current_rates()
            db = max((v for k, v in rates.items()), default=0.0)
            print(f"step {step:4d}  loss {loss.item():.3f}  drop_block p {db:.4f}  "
                  f"({time.perf_counter() - start:.1f}s)")

    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    regsurgery.strip(model)
    with torch.no_grad():
        same = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"held-out accuracy {acc:.3f} (after strip: {same:.3f}); {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
