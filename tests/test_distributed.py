"""EMATeacher under torch.distributed, on 2 CPU processes over gloo (loopback): DDP, the coalesced
BatchNorm-statistics average, FSDP2 sharded teachers with a distributed checkpoint, and a harness
that fails fast when a rank dies or a collective hangs.

The single-process reference simulates the ranks: one replica per rank, each on its slice of
the global batch, gradients averaged (as DDP/FSDP reduce them), then the EMAN update from
replica 0 with the official state_dict loop. BatchNorm in train mode normalizes with each
rank's own batch, which is why the ranks are simulated rather than merged into one batch.
"""
import copy
import time

import pytest
import torch
from torch import nn

from eman_fused.reference import official_eman_update_ as official_eman_update

from dist_harness import RankFailed, run_ranks

WORLD = 2
STEPS = 6
MOMENTUM = 0.9

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def make_model() -> nn.Module:
    torch.manual_seed(0)  # odd sizes: FSDP2 shards 7 rows as 4 + 3, 3 rows as 2 + 1
    return nn.Sequential(nn.Linear(6, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4 * WORLD, 6, generator=g), torch.randn(4 * WORLD, 3, generator=g)


def reference_teacher(steps: int, average_buffers: bool) -> dict:
    replicas = [make_model() for _ in range(WORLD)]
    opts = [torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9) for r in replicas]
    teacher = copy.deepcopy(replicas[0])
    for step in range(steps):
        x, y = batch(step)
        for r, model in enumerate(replicas):
            nn.functional.mse_loss(model(x[r::WORLD]), y[r::WORLD]).backward()
        with torch.no_grad():
            for params in zip(*(m.parameters() for m in replicas)):
                mean = torch.stack([p.grad for p in params]).mean(0)
                for p in params:
                    p.grad.copy_(mean)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if average_buffers:
            with torch.no_grad():
                for bufs in zip(*(m.buffers() for m in replicas)):
                    if bufs[0].is_floating_point():
                        mean = torch.stack(bufs).mean(0)
                        for b in bufs:
                            b.copy_(mean)
        official_eman_update(teacher, replicas[0], MOMENTUM)
    return teacher.state_dict()


def assert_state_close(actual: dict, expected: dict) -> None:
    # The teacher's state_dict ends with its progress (format 1, the update count): every rank
    # made STEPS updates, and the plain keys before it match the reference's.
    actual = dict(actual)
    assert actual.pop("_extra_state").tolist() == [1, STEPS]
    assert list(actual) == list(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


# ---- code that runs on every rank (module level: spawned processes import it) ----------------

def ddp_rank(rank, world, steps, sync):
    from eman_fused import EMATeacher
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    teacher = EMATeacher(ddp, momentum=MOMENTUM, sync_buffers=sync)
    for step in range(steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(ddp(x[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update()
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def bn_average_rank(rank, world):
    from eman_fused import EMATeacher
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(5.0) * (rank + 1))
        bn.running_var.copy_(torch.full((5,), float(rank + 1) ** 2))
        bn.num_batches_tracked.fill_(7)
    teacher = EMATeacher(bn, momentum=0.0, sync_buffers="mean")
    teacher.update()
    return {"teacher": {k: v.clone() for k, v in teacher.state_dict().items()},
            "student": {k: v.clone() for k, v in bn.state_dict().items()}}


def fsdp_rank(rank, world, steps, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from eman_fused import EMATeacher
    from eman_fused.nn import convert_to_eman
    student = make_model()
    teacher_model = convert_to_eman(copy.deepcopy(student))  # before sharding: same layout
    fully_shard(student)
    fully_shard(teacher_model)
    teacher = EMATeacher(student, teacher=teacher_model, momentum=MOMENTUM, sync_buffers="mean")
    local_shapes = [tuple(t.shape) for t in teacher.ema_tensors]
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(student(x[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update()

    def full(sd):
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in sd.items()}

    after = full(teacher.state_dict())
    dcp.save({"teacher": teacher.state_dict()}, checkpoint_id=ckpt)
    teacher.reset()  # overwrite with the student's values, then restore from the checkpoint
    changed = any(not torch.equal(a, b) for a, b in zip(after.values(), full(teacher.state_dict()).values()))
    state = {"teacher": teacher.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    teacher.load_state_dict(state["teacher"])
    return {"teacher": after, "restored": full(teacher.state_dict()), "reset_changed": changed,
            "local_shapes": local_shapes}


def dies_rank(rank, world):
    import os
    if rank == 1:
        os._exit(3)
    torch.distributed.all_reduce(torch.ones(1))


def hangs_rank(rank, world):
    if rank == 1:
        time.sleep(3600)
    torch.distributed.all_reduce(torch.ones(1))


# ---- the tests ------------------------------------------------------------------------------

def test_ddp_teacher_equals_the_simulated_single_process_run(tmp_path):
    results = run_ranks(ddp_rank, WORLD, tmp_path, STEPS, "mean")
    expected = reference_teacher(STEPS, average_buffers=True)
    for r, state in enumerate(results):
        assert_state_close(state, expected)
    for k in results[0]:  # identical on every rank, bit for bit
        assert torch.equal(results[0][k], results[1][k]), k


def test_ddp_without_buffer_sync_lets_the_ranks_teachers_drift(tmp_path):
    # Documented behaviour: DDP broadcasts rank 0's buffers before each forward, then every rank
    # updates its BatchNorm statistics with its own batch; without sync_buffers='mean' the EMAN
    # teachers' statistics differ across ranks (their weights do not).
    results = run_ranks(ddp_rank, WORLD, tmp_path, 2, None)
    assert not torch.equal(results[0]["1.running_mean"], results[1]["1.running_mean"])
    assert torch.equal(results[0]["0.weight"], results[1]["0.weight"])


def test_buffer_average_matches_the_hand_computed_mean(tmp_path):
    results = run_ranks(bn_average_rank, WORLD, tmp_path)
    mean = torch.arange(5.0) * (1 + 2) / 2
    var = torch.full((5,), (1.0 + 4.0) / 2)
    for r in results:
        for side in ("teacher", "student"):  # the student's statistics are averaged in place
            torch.testing.assert_close(r[side]["running_mean"], mean)
            torch.testing.assert_close(r[side]["running_var"], var)
            assert r[side]["num_batches_tracked"].item() == 7


def test_fsdp2_sharded_teacher_equals_the_unsharded_reference_and_checkpoints(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    results = run_ranks(fsdp_rank, WORLD, tmp_path, STEPS, str(tmp_path / "ckpt"))
    expected = reference_teacher(STEPS, average_buffers=True)
    for r in results:
        assert_state_close(r["teacher"], expected)
        assert r["reset_changed"]  # the restore below is not vacuous
        for k in r["teacher"]:
            assert torch.equal(r["restored"][k], r["teacher"][k]), k
    # uneven shards: the local pieces of the 7x6 weight are 4 and 3 rows
    assert results[0]["local_shapes"][0] == (4, 6) and results[1]["local_shapes"][0] == (3, 6)


def test_a_dead_rank_fails_fast_with_a_message(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed|rank 1 died"):
        run_ranks(dies_rank, WORLD, tmp_path, timeout=60, collective_timeout=5)
    assert time.monotonic() - start < 60


def test_a_hung_collective_times_out_instead_of_hanging(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 did not finish"):
        run_ranks(hangs_rank, WORLD, tmp_path, timeout=25, collective_timeout=5)
    assert time.monotonic() - start < 40
