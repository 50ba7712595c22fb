"""BYOL on scikit-learn's digits with an EMAN target network, then a linear probe. CPU, no download.

The online network (encoder + projector, predictor on top) learns to predict the target's
projection of another augmented view; the target is eman_fused.EMATeacher of the online
encoder + projector, with BYOL's cosine momentum schedule (0.99 -> 1). Its BatchNorms are EMAN:
they normalize with running statistics EMA'd from the online network's.

  python examples/byol_eman.py             # train, then probe the encoder (vs a random one)
  python examples/byol_eman.py --check     # fused target vs eager reference target, a few steps
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eman_fused  # noqa: E402
from digits import ReferenceCheck, SmallCNN, linear_probe, load_digits, strong_augment  # noqa: E402
from eman_fused import schedules  # noqa: E402


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim_out))


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def run(steps: int, batch: int, seed: int, check: bool = False) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    online = nn.Sequential(OrderedDict(encoder=SmallCNN().encoder, projector=mlp(64, 128, 32)))
    predictor = mlp(32, 128, 32)
    random_probe = linear_probe(online.encoder, x_train, y_train, x_test, y_test) if not check else None
    schedule = schedules.CosineToOne(0.99, steps)
    target = eman_fused.EMATeacher(online, schedule=schedule)
    checker = ReferenceCheck(target, online, schedule=schedule) if check else None
    params = [*online.parameters(), *predictor.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = x_train[torch.randint(0, len(x_train), (batch,), generator=g)]
        v1, v2 = strong_augment(x, g), strong_augment(x, g)
        p1, p2 = predictor(online(v1)), predictor(online(v2))
        z1, z2 = target(v1), target(v2)
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update()
        if checker is not None:
            checker.update()
            checker.compare()
    if check:
        return dict(checked_steps=checker.compared)
    return dict(random_encoder_probe=random_probe,
                online_probe=linear_probe(online.encoder, x_train, y_train, x_test, y_test),
                target_probe=linear_probe(target.module.encoder, x_train, y_train, x_test, y_test),
                final_loss=loss.item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="fused vs reference target for a few steps")
    args = ap.parse_args(argv)
    if args.check:
        r = run(min(args.steps, 5), 64, args.seed, check=True)
        print(f"check: fused target == reference target after each of {r['checked_steps']} steps")
        return 0
    r = run(args.steps, args.batch, args.seed)
    print(f"linear probe test accuracy: random encoder {100 * r['random_encoder_probe']:.1f}%, "
          f"BYOL online encoder {100 * r['online_probe']:.1f}%, EMAN target encoder "
          f"{100 * r['target_probe']:.1f}% (final loss {r['final_loss']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
