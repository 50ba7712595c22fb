"""Post-hoc EMA benchmark (EDM2 profiles): K power-function EMA profiles updated per step.

For each model's parameter + buffer shapes and K (the number of profiles):
  eman_fused_posthoc  posthoc_ema_update_: one pass, the student read once, each profile read
                      and written once (2K + 1 tensor passes)
  k_ema_update        K calls of ema_update_ (FusedEMA.step), one per profile (3K passes)
  k_foreach_lerp      K torch._foreach_lerp_ passes (+ _foreach_copy_ of the counters), the way
                      per-profile EMA code runs today (3K passes)
Bytes moved count every pass (profile read + write, student read per pass); GB/s is each
method's own bytes over its time; "x" = that method's time / the fused time.
  ema_pytorch         ema-pytorch's PostHocEMA.update() over a module of the same shapes (K
                      KarrasEMA copies, each updated on its own: 3K passes), when ema-pytorch is
                      installed (`pip install ema-pytorch`, in the [bench] extra) and the
                      profiles have the student's dtype (it keeps them in the model's dtype);
                      else its row says why it was not measured.
CPU numbers are CPU numbers.

  python benchmarks/bench_posthoc.py [--model resnet50,vit_b16] [--k 2,3] [--dtypes fp32:fp32]
      [--device cpu|cuda] [--json out.json] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch

import eman_fused
from eman_fused import reference
from eman_fused.bench import shapes
from eman_fused.bench.common import (DTYPES, copy_bandwidth, environment, header, measure, prepare,
                                     write_result)
from eman_fused.ops.posthoc import posthoc_ema_update_

SIGMA_RELS = (0.05, 0.10, 0.15)
START_STEP = 10_000  # coefficients of a run well under way (beta_t near 1, never exactly)


def ema_pytorch_update(table, k, p_dtype, s_dtype, device, workdir):
    """ema-pytorch's PostHocEMA over a module of the table's shapes, its K profiles well under
    way (step START_STEP, so every call is a moving-average update): its update(), or the reason
    it cannot be measured here (raised as RuntimeError)."""
    try:
        from ema_pytorch import PostHocEMA
    except ImportError as exc:
        raise RuntimeError(f"ema-pytorch is not installed (pip install ema-pytorch): {exc}") from None
    if p_dtype != s_dtype:
        raise RuntimeError(f"ema-pytorch keeps profiles in the model's dtype ({s_dtype}), not {p_dtype}")
    model = shapes.ShapeModel(table, device, DTYPES[s_dtype])
    ema = PostHocEMA(model, sigma_rels=SIGMA_RELS[:k], update_every=1, checkpoint_every_num_steps="manual",
                     checkpoint_folder=str(workdir))
    for profile in ema.ema_models:
        profile.step.fill_(START_STEP)
        profile.initted.fill_(True)
    return ema.update


def run_case(name, table, k, p_dtype, s_dtype, device, workdir):
    profiles, student = [], None
    for j in range(k):
        teacher, student_j = shapes.make_model_tensors(table, DTYPES[p_dtype], DTYPES[s_dtype], device)
        profiles.append(teacher)
        student = student_j if student is None else student
    gammas = [reference.sigma_rel_to_gamma(s) for s in SIGMA_RELS[:k]]
    betas = [reference.power_beta(START_STEP, g) for g in gammas]
    step = torch.tensor(START_STEP, dtype=torch.int64, device=device)
    fused_emas = [eman_fused.FusedEMA(p, student) for p in profiles]
    floats = [i for i, t in enumerate(student) if t.is_floating_point()]
    ints = [i for i, t in enumerate(student) if not t.is_floating_point()]
    sf, si = [student[i] for i in floats], [student[i] for i in ints]
    pf = [[p[i] for i in floats] for p in profiles]
    pi = [[p[i] for i in ints] for p in profiles]

    def fused():
        step.fill_(START_STEP)  # the same coefficients every repeat
        posthoc_ema_update_(profiles, student, step, gammas)

    def k_ema_update():
        for f, b in zip(fused_emas, betas):
            f.step(b)

    def k_foreach_lerp():
        for j, b in enumerate(betas):
            torch._foreach_lerp_(pf[j], sf, 1.0 - b)
            if si:
                torch._foreach_copy_(pi[j], si)

    profile_bytes = sum(t.nbytes for t in profiles[0])
    student_bytes = sum(t.nbytes for t in student)
    separate = k * (2 * profile_bytes + student_bytes)
    moved = {"eman_fused_posthoc": k * 2 * profile_bytes + student_bytes,
             "k_ema_update": separate, "k_foreach_lerp": separate, "ema_pytorch": separate}
    rows = {}
    for method, fn in (("eman_fused_posthoc", fused), ("k_ema_update", k_ema_update),
                       ("k_foreach_lerp", k_foreach_lerp), ("ema_pytorch", None)):
        try:
            if fn is None:
                fn = ema_pytorch_update(table, k, p_dtype, s_dtype, device, workdir)
            seconds = measure(fn, device)
            rows[method] = {"ms": seconds * 1e3, "bytes": moved[method],
                            "GB/s": moved[method] / seconds / 1e9}
        except Exception as exc:
            rows[method] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    fused_ms = rows["eman_fused_posthoc"]["ms"]
    for row in rows.values():
        if "ms" in row:
            row["time_vs_fused"] = row["ms"] / fused_ms
    return {"case": f"{name} K={k} p={p_dtype} s={s_dtype}", "model": name, "K": k,
            "tensors": len(table), "elements": sum(math.prod(s) for _, s, _ in table),
            "bytes_ratio_fused_vs_separate": moved["eman_fused_posthoc"] / moved["k_ema_update"],
            "methods": rows}


def markdown(result):
    lines = [header("Post-hoc EMA update (K EDM2 profiles)", result), "",
             f"Machine load while measuring (uptime): {result['load']}.", ""]
    # Results written before ema-pytorch was measured have no ema_pytorch rows.
    methods = [m for m in ("eman_fused_posthoc", "k_ema_update", "k_foreach_lerp", "ema_pytorch")
               if any(m in case["methods"] for case in result["cases"])]
    lines.append("| case | MB moved fused / separate | " + " | ".join(methods) + " |")
    lines.append("|---|---:|" + "---:|" * len(methods))
    for case in result["cases"]:
        cells = []
        for m in methods:
            row = case["methods"][m]
            if "error" in row:
                cells.append("not measured" if m == "ema_pytorch" else "fails")
            elif m == "eman_fused_posthoc":
                cells.append(f"**{row['ms']:.2f} ms** ({row['GB/s']:.1f} GB/s)")
            else:
                cells.append(f"{row['ms']:.2f} ms ({row['GB/s']:.1f} GB/s, {row['time_vs_fused']:.2f}x)")
        fm = case["methods"]["eman_fused_posthoc"].get("bytes", 0) / 1e6
        sm = case["methods"]["k_ema_update"].get("bytes", 0) / 1e6
        lines.append(f"| {case['case']} | {fm:.0f} / {sm:.0f} ({case['bytes_ratio_fused_vs_separate']:.3f}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / the fused time. Bytes: fused (2K+1) tensor passes, "
              "separate 3K (ema-pytorch: its K KarrasEMA updates, counted as 3K passes)."
              + ("" if "ema_pytorch" in methods else " ema-pytorch's PostHocEMA: not measured in this run.")]
    for c in result["cases"]:
        for m, r in c["methods"].items():
            if "error" in r:
                lines.append(f"- {m} on {c['case']}: {r['error']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50,vit_b16")
    ap.add_argument("--k", default="2,3")
    ap.add_argument("--dtypes", default="fp32:fp32", help="profile:student pairs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    prepare(device)
    result = {"op": "posthoc", "environment": environment(device), "cases": [],
              "load": "load average %.2f, %.2f, %.2f" % os.getloadavg()}
    biggest = 0
    with tempfile.TemporaryDirectory(prefix="eman_fused_bench_posthoc_") as workdir:  # ema-pytorch's folder
        for spec in args.model.split(","):
            name, table = shapes.load_table(spec)
            for k in (int(x) for x in args.k.split(",")):
                for pair in args.dtypes.split(","):
                    p_dtype, s_dtype = pair.split(":")
                    case = run_case(name, table, k, p_dtype, s_dtype, device, Path(workdir))
                    biggest = max(biggest, case["methods"]["k_ema_update"].get("bytes", 0))
                    result["cases"].append(case)
    result["copy_GBps"] = copy_bandwidth(device, max(biggest // 6, 1 << 20))
    result["load_after"] = "load average %.2f, %.2f, %.2f" % os.getloadavg()
    write_result(result, markdown(result), args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
