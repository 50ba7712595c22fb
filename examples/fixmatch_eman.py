"""FixMatch on scikit-learn's digits with a few labels per class, three ways to make pseudo-labels:

  none  - the student labels its own weak view (the original FixMatch)
  ema   - a classic EMA teacher (parameters EMA'd, its BatchNorms in train mode on its own batch,
          buffers its own: Mean Teacher style)
  eman  - the EMAN teacher (eman_fused.EMATeacher: parameters and BN statistics EMA'd, running
          statistics used for normalization)

The student sees the same batches in every arm (labeled + weak + strong views in one forward);
only the source of the pseudo-labels differs. CPU, no download.

  python examples/fixmatch_eman.py --arm eman --seed 0     # one run
  python examples/fixmatch_eman.py --experiment            # 3 arms x 5 seeds -> markdown table
  python examples/fixmatch_eman.py --check                 # fused teacher vs eager reference
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eman_fused  # noqa: E402
from digits import (ReferenceCheck, SmallCNN, accuracy, labeled_subset, load_digits,  # noqa: E402
                    strong_augment, weak_augment)

ARMS = ("none", "ema", "eman")


def teacher_kwargs(arm: str, momentum: float) -> dict:
    if arm == "ema":
        return dict(momentum=momentum, eman=False, buffers="own")
    return dict(momentum=momentum, eman=True)


def run(arm: str, seed: int, steps: int = 1000, per_class: int = 4, batch: int = 32, mu: int = 7,
        threshold: float = 0.95, momentum: float = 0.99, lr: float = 0.03, check: bool = False) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    labeled = labeled_subset(y_train, per_class, seed)
    x_l, y_l = x_train[labeled], y_train[labeled]
    x_u, y_u = x_train, y_train  # labels of the unlabeled set: only to score the pseudo-labels
    student = SmallCNN()
    teacher = checker = None
    if arm != "none":
        teacher = eman_fused.EMATeacher(student, **teacher_kwargs(arm, momentum))
        if check:
            checker = ReferenceCheck(teacher, student, **teacher_kwargs(arm, momentum))
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: math.cos(7 * math.pi * k / (16 * steps)))  # FixMatch's cosine
    g = torch.Generator().manual_seed(3000 + seed)
    masked, correct_masked, seen = 0, 0, 0
    for step in range(steps):
        li = torch.randint(0, len(y_l), (batch,), generator=g)
        ui = torch.randint(0, len(y_u), (batch * mu,), generator=g)
        xl = weak_augment(x_l[li], g)
        xu_w, xu_s = weak_augment(x_u[ui], g), strong_augment(x_u[ui], g)
        logits = student(torch.cat([xl, xu_w, xu_s]))
        logits_l, logits_w, logits_s = logits.split([batch, batch * mu, batch * mu])
        with torch.no_grad():
            source = logits_w if teacher is None else teacher(xu_w)
            if checker is not None:  # a classic teacher's forward moves its own BN statistics
                checker.twin(xu_w)
            conf, pseudo = source.softmax(1).max(1)
            mask = conf >= threshold
        loss = F.cross_entropy(logits_l, y_l[li])
        loss = loss + (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if teacher is not None:
            teacher.update()
        if checker is not None:
            checker.update()
            checker.compare()
        masked += int(mask.sum())
        correct_masked += int((pseudo[mask] == y_u[ui][mask]).sum())
        seen += int(mask.numel())
    out = dict(arm=arm, seed=seed, student_acc=accuracy(student, x_test, y_test),
               mask_rate=masked / seen, pseudo_acc=correct_masked / max(masked, 1))
    out["teacher_acc"] = accuracy(teacher.module, x_test, y_test) if teacher is not None else float("nan")
    if checker is not None:
        out["checked_steps"] = checker.compared
    return out


def mean_std(values) -> str:
    values = list(values)
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 \
        else f"{100 * values[0]:.1f}"


def experiment(seeds: int, steps: int, out: Path | None) -> str:
    rows, start = [], time.time()
    for seed in range(seeds):
        for arm in ARMS:
            r = run(arm, seed, steps=steps)
            rows.append(r)
            print(f"seed {seed} {arm:5s}: student {100 * r['student_acc']:.1f}%  teacher "
                  f"{100 * r['teacher_acc']:.1f}%  mask {100 * r['mask_rate']:.1f}%  pseudo-label acc "
                  f"{100 * r['pseudo_acc']:.1f}%", flush=True)
    by = {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}
    lines = [
        f"FixMatch on digits, 4 labels per class, {steps} steps, {seeds} seeds, threshold 0.95, "
        f"teacher momentum 0.99; torch {torch.__version__}, CPU; {time.time() - start:.0f} s. "
        "Accuracies on the 539 held-out test images, in %; mask rate and pseudo-label accuracy "
        "averaged over all steps.", "",
        "| pseudo-labels from | student test acc | teacher test acc | mask rate | pseudo-label acc (masked) |",
        "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        rs = by[arm]
        teacher = "—" if arm == "none" else mean_std(r["teacher_acc"] for r in rs)
        lines.append(f"| {arm} | {mean_std(r['student_acc'] for r in rs)} | {teacher} | "
                     f"{mean_std(r['mask_rate'] for r in rs)} | {mean_std(r['pseudo_acc'] for r in rs)} |")
    lines += ["", "Paired per-seed differences of student test accuracy (percentage points):", "",
              "| pair | " + " | ".join(f"seed {s}" for s in range(seeds)) + " | mean ± std |",
              "|---|" + "---:|" * (seeds + 1)]
    for a, b in (("eman", "none"), ("eman", "ema"), ("ema", "none")):
        diffs = [x["student_acc"] - y["student_acc"] for x, y in zip(by[a], by[b])]
        lines.append(f"| {a} − {b} | " + " | ".join(f"{100 * d:+.1f}" for d in diffs) + f" | {mean_std(diffs)} |")
    table = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=ARMS, default="eman")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--experiment", action="store_true", help="every arm x --seeds seeds, markdown table")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the experiment's table here")
    ap.add_argument("--check", action="store_true",
                    help="a few steps of the ema and eman arms with the eager reference teacher beside")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.check:
        for arm in ("ema", "eman"):
            r = run(arm, args.seed, steps=min(args.steps, 5), check=True)
            print(f"check {arm}: fused teacher == reference teacher after each of {r['checked_steps']} steps")
        return 0
    if args.experiment:
        print(experiment(args.seeds, args.steps, args.out))
        return 0
    r = run(args.arm, args.seed, steps=args.steps)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
