"""One training run of a student + EMATeacher, in pieces: build -> move/cast -> train -> save ->
(new process) -> load -> train on. test_lifecycle.py runs the first half and the uninterrupted
run in its own process and this file as a script for the resumed half:

    python tests/lifecycle_worker.py resume CASES_JSON CKPT_DIR

Every case writes CKPT_DIR/<case>.final.pt: the teacher's and the student's tensors and the
teacher's update count after 2*K steps.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eman_fused import EMATeacher, optim, schedules  # noqa: E402

K = 3  # steps before the checkpoint; the runs end at 2*K

SCHEDULES = {
    "constant": lambda: schedules.Constant(0.9),
    "cosine": lambda: schedules.CosineToOne(0.9, 5),
    "mean_teacher": lambda: schedules.MeanTeacherRamp(0.99),
    "warmup": lambda: schedules.Warmup(gamma=1.0, power=0.75, max_momentum=0.99),
    "cyclical": lambda: schedules.Cyclical(0.5, 0.95, 4),
    "copy_first": lambda: schedules.CopyFirst(schedules.Constant(0.9), updates=2),
    "timm": lambda: schedules.TimmDecay(0.99, min_decay=0.1, update_after_step=1, use_warmup=True),
}
# how the teacher is updated: its own update(), or inside a fused optimizer's step
MODES = ["update", "update_capturable", "sgd", "sgd_capturable", "adamw", "adamw_capturable",
         "lars", "lars_capturable"]


def cases() -> list[str]:
    return [f"{s}-{m}" for s in SCHEDULES for m in MODES]


def build(case: str):
    schedule_name, mode = case.split("-")
    capturable = mode.endswith("_capturable")
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3))
    teacher = EMATeacher(student, schedule=SCHEDULES[schedule_name](), capturable=capturable)
    # moves and casts of a module holding both, after construction (what Lightning does)
    box = nn.ModuleDict({"student": student, "teacher": teacher})
    box.double()
    box.float()
    box.to(memory_format=torch.channels_last)
    box.to("cpu")
    kind = mode.split("_")[0]
    if kind == "update":
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    elif kind == "sgd":
        opt = optim.SGD(student.parameters(), lr=0.05, momentum=0.9, teacher=teacher, capturable=capturable)
    elif kind == "adamw":
        opt = optim.AdamW(student.parameters(), lr=0.01, teacher=teacher, capturable=capturable)
    else:
        opt = optim.LARS(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4,
                         trust_coefficient=0.02, teacher=teacher, capturable=capturable)
    return student, teacher, opt, kind


def train(run, start: int, stop: int) -> None:
    student, teacher, opt, kind = run
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(4, 3, 6, 6, generator=g).to(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(student(x), y).backward()
        opt.step()
        if kind == "update":
            teacher.update()


def save_checkpoint(run, path: str) -> None:
    student, teacher, opt, _ = run
    torch.save({"model": student.state_dict(), "optimizer": opt.state_dict(),
                "teacher": teacher.state_dict()}, path)


def load_checkpoint(run, path: str) -> None:
    student, teacher, opt, _ = run
    # LARS's param groups hold its `exclude` function (1-D params by default), which
    # weights_only loading refuses unless allowed by name.
    with torch.serialization.safe_globals([optim._one_dim]):
        ckpt = torch.load(path, weights_only=True)
    student.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    teacher.load_state_dict(ckpt["teacher"])


def result(run) -> dict:
    student, teacher, _, _ = run
    return {"teacher": {k: v.detach().clone() for k, v in teacher.module.state_dict().items()},
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "num_updates": teacher.num_updates}


def main(argv: list[str]) -> None:
    phase, cases_json, ckpt_dir = argv
    assert phase == "resume"
    torch.set_num_threads(1)
    for case in json.loads(cases_json):
        run = build(case)
        load_checkpoint(run, os.path.join(ckpt_dir, f"{case}.pt"))
        train(run, K, 2 * K)
        torch.save(result(run), os.path.join(ckpt_dir, f"{case}.final.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
