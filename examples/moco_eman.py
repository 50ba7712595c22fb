"""MoCo on scikit-learn's digits with an EMAN key encoder, then a linear probe. CPU, no download.

The key encoder is eman_fused.EMATeacher of the query encoder (momentum 0.99): its BatchNorms
normalize with running statistics EMA'd from the query encoder's, so the keys do not depend on
which other images share their batch, which is what MoCo's shuffling BN was for; EMAN needs no
shuffling. Keys go into a queue of negatives; the loss is InfoNCE.

  python examples/moco_eman.py             # train, then probe the encoder (vs a random one)
  python examples/moco_eman.py --check     # fused key encoder vs eager reference, a few steps
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


def run(steps: int, batch: int, seed: int, queue_size: int = 1024, temperature: float = 0.2,
        check: bool = False) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    # MoCo v2's head (no BatchNorm); the encoder's BatchNorms are the EMAN ones in the keys.
    query = nn.Sequential(OrderedDict(encoder=SmallCNN().encoder, projector=nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))))
    random_probe = linear_probe(query.encoder, x_train, y_train, x_test, y_test) if not check else None
    keys = eman_fused.EMATeacher(query, momentum=0.99)
    checker = ReferenceCheck(keys, query, momentum=0.99) if check else None
    queue = F.normalize(torch.randn(queue_size, 32), dim=1)
    opt = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = x_train[torch.randint(0, len(x_train), (batch,), generator=g)]
        q = F.normalize(query(strong_augment(x, g)), dim=1)
        k = F.normalize(keys(strong_augment(x, g)), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / temperature
        loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.int64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        keys.update()
        queue = torch.cat([k, queue])[:queue_size]
        if checker is not None:
            checker.update()
            checker.compare()
    if check:
        return dict(checked_steps=checker.compared)
    return probe_results(random_probe, query.encoder, keys.module.encoder, (x_train, y_train, x_test, y_test),
                         loss.item())


def main(argv=None) -> int:
    return ssl_main(argv, __doc__, run, steps=400, batch=128, student="MoCo query encoder", teacher="key encoder")


if __name__ == "__main__":
    sys.exit(main())
