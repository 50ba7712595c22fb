"""Lightning's own EMA (EMAWeightAveraging, an AveragedModel updated tensor by tensor, and its
validation weight swap) against eman_fused's EMATeacherCallback (one fused EMA call per update,
a multi-tensor copy swap), on a torchvision ResNet-18 or ResNet-50 held by a LightningModule.
Both are timed on the callbacks' own update and swap code, in the same run, alternating,
median of repeats.

  PYTHONPATH=. python benchmarks/bench_lightning.py [--model resnet18,resnet50] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torchvision
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from eman_fused.bench.common import device_name, environment, measure, prepare
from eman_fused.integrations.lightning import EMATeacherCallback


class Holder(LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net


def nbytes(module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])


def run(model_name: str, rounds: int):
    device = torch.device("cpu")
    torch.manual_seed(0)
    pl_module = Holder(getattr(torchvision.models, model_name)())
    # Lightning's callback, its AveragedModel built as its setup('fit') builds it.
    theirs = EMAWeightAveraging(decay=0.999)
    theirs._average_model = AveragedModel(model=pl_module, device=device, use_buffers=True,
                                          avg_fn=get_ema_avg_fn(decay=0.999))
    ours = EMATeacherCallback(momentum=0.999, eman=False, buffers="ema")  # the same EMA (buffers too)
    ours._ensure_teacher(pl_module)

    step = iter(range(10**9))
    cases = {
        "update": {"lightning": lambda: theirs._average_model.update_parameters(pl_module),
                   "eman_fused": lambda: ours.teacher.update(step=next(step))},
        # In and out again: what one validation loop costs.
        "swap": {"lightning": lambda: (theirs._swap_models(pl_module), theirs._swap_models(pl_module)),
                 "eman_fused": lambda: (ours._swap_in("validate", pl_module), ours._swap_out("validate"))},
    }
    size = nbytes(pl_module)
    # Bytes each moves: update reads student and teacher and writes the teacher (3x);
    # a swap in and out is three copies of the model (read + write: 6x).
    moved = {"update": 3 * size, "swap": 6 * size}
    out = {}
    for case, methods in cases.items():
        times = {m: [] for m in methods}
        for _ in range(rounds):  # alternating: a noisy neighbour hits both alike
            for m, fn in methods.items():
                times[m].append(measure(fn, device, min_time=0.3, warmup=2))
        med = {m: statistics.median(v) for m, v in times.items()}
        out[case] = {m: {"ms": med[m] * 1e3, "GBps": moved[case] / med[m] / 1e9} for m in methods}
        out[case]["ratio"] = med["lightning"] / med["eman_fused"]
    return {"model": model_name, "tensors": len([*pl_module.parameters(), *pl_module.buffers()]),
            "MB": size / 1e6, "cases": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18,resnet50")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    prepare(device)
    env = environment(device)
    rows = [run(m, args.rounds) for m in args.model.split(",")]
    lines = [f"# Lightning EMAWeightAveraging vs eman_fused EMATeacherCallback ({device_name(device)})", "",
             f"torch {env.get('torch')}, lightning {__import__('lightning').__version__}; "
             f"{args.rounds} alternating rounds, median. CPU numbers (no GPU).", "",
             "| model | tensors | MB | op | Lightning ms | eman_fused ms | Lightning GB/s | eman_fused GB/s | ratio |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for case, res in r["cases"].items():
            lines.append(f"| {r['model']} | {r['tensors']} | {r['MB']:.0f} | {case} | {res['lightning']['ms']:.2f} | "
                         f"{res['eman_fused']['ms']:.2f} | {res['lightning']['GBps']:.1f} | "
                         f"{res['eman_fused']['GBps']:.1f} | {res['ratio']:.2f}x |")
    lines += ["", "update: one EMA update at decay 0.999 of every parameter and buffer (Lightning: "
              "AveragedModel.update_parameters, per tensor; eman_fused: EMATeacher.update, one fused call). "
              "swap: the validation weight swap in and back out (Lightning: _swap_models twice, a clone and two "
              "copies per tensor; eman_fused: a stash and three torch._foreach_copy_ calls)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
