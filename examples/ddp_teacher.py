"""An EMAN teacher under DistributedDataParallel, on CPU processes (gloo), launched by torchrun:

  torchrun --standalone --nproc-per-node 2 examples/ddp_teacher.py [--steps 200]

Each rank trains the DDP student on its slice of the batch and calls teacher.update(); with
sync_buffers='mean' the student's BatchNorm statistics are averaged over the ranks (one
all_reduce) before the update, so every rank holds the same teacher. The script checks that at
the end (all ranks compare a checksum of the teacher's state).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from digits import SmallCNN, load_digits, weak_augment  # noqa: E402

from eman_fused import EMATeacher, schedules  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    args = ap.parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits(0)
    student = nn.parallel.DistributedDataParallel(SmallCNN())
    teacher = EMATeacher(student, schedule=schedules.CosineToOne(0.9, args.steps), sync_buffers="mean")
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        idx = torch.randint(0, len(y_train), (args.batch // world,), generator=g)
        loss = nn.functional.cross_entropy(student(weak_augment(x_train[idx], g)), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update()
    checksum = torch.stack([t.double().sum() for t in teacher.state_dict().values()])
    gathered = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    same = all(torch.equal(gathered[0], c) for c in gathered)
    with torch.no_grad():
        acc = (teacher(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"{world} ranks, {args.steps} steps: teacher test accuracy {100 * acc:.1f}%, "
              f"teachers identical on every rank: {same}")
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
