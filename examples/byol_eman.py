"""BYOL on scikit-learn's digits with an EMAN target network, then a linear probe. CPU, no download.

The online network (encoder + projector, predictor on top) learns to predict the target's
projection of another augmented view; the target is eman_fused.EMATeacher of the online
encoder + projector, with BYOL's cosine momentum schedule (0.99 -> 1). Its BatchNorms are EMAN:
they normalize with running statistics EMA'd from the online network's.

  python examples/byol_eman.py             # train, then probe the encoder (vs a random one)
  python examples/byol_eman.py --check     # fused target vs eager reference target, a few steps
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eman_fused  # noqa: E402
from digits import (ReferenceCheck, SmallCNN, linear_probe, load_digits, probe_results,  # noqa: E402
                    ssl_main, strong_augment)
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
    return probe_results(random_probe, online.encoder, target.module.encoder, (x_train, y_train, x_test, y_test),
                         loss.item())


def main(argv=None) -> int:
    return ssl_main(argv, __doc__, run, steps=1000, batch=256, student="BYOL online encoder", teacher="target")


if __name__ == "__main__":
    sys.exit(main())
