"""Run a function on N CPU processes over gloo (loopback), bounded in time.

Every rank joins through a FileStore (no ports to race for) with a collective timeout, and the
harness waits for all ranks with its own deadline: a rank that dies or a collective that hangs
fails the test with a message naming the rank and what happened, never a hung CI job.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import traceback
from pathlib import Path


class RankFailed(RuntimeError):
    pass


def _rank_main(fn, rank: int, world: int, store: str, out: str, collective_timeout: float, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    result = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            result["value"] = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the harness, with the traceback
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    with open(out, "wb") as f:
        pickle.dump(result, f)
    os._exit(1 if "error" in result else 0)


def run_ranks(fn, world: int, tmp_path: Path, *args, timeout: float = 120.0,
              collective_timeout: float = 30.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns each rank's return value, or raises
    RankFailed naming the ranks that failed, died or did not finish within `timeout` seconds."""
    ctx = mp.get_context("spawn")
    store = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pkl" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, str(store), str(outs[r]),
                                                  collective_timeout, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    problems, values = [], []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            problems.append(f"rank {r} did not finish within {timeout:.0f} s (killed)")
            continue
        if not outs[r].exists():
            problems.append(f"rank {r} died (exit code {p.exitcode}) without reporting")
            continue
        result = pickle.loads(outs[r].read_bytes())
        if "error" in result:
            problems.append(f"rank {r} failed: {result['error']}")
        else:
            values.append(result["value"])
    if problems:
        raise RankFailed("; ".join(problems))
    return values
