"""The teacher through a training run's life: build -> move/cast -> train -> save -> a new process
-> load -> train on, bit for bit against an uninterrupted run; and what the update writes after
every kind of move or cast."""
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

import eman_fused
from eman_fused import EMATeacher, schedules
from eman_fused import teacher as teacher_mod

import lifecycle_worker as worker
from conftest import bits


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3))


class Recorder:
    """Wraps the teacher's update calls (eman_fused.ops.ema_update_ and the steps of its
    persistent plan handles): the tensors of every call."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.handle_steps = 0
        real = teacher_mod.ops.ema_update_

        def record(teacher, student, momentum, **kwargs):
            self.calls.append((list(teacher), list(student), momentum))
            return real(teacher, student, momentum, **kwargs)

        def record_step(handle, teacher, student, momentum, backend):
            # straight to the handle: what it writes is what is recorded here
            status = handle.step(momentum)
            if status == handle.CHANGED:
                return status  # nothing written; the teacher re-matches and steps again
            self.handle_steps += 1
            self.calls.append((list(teacher), list(student), momentum))
            if status == handle.USE_OP:
                real(teacher, student, momentum, backend=backend)
            return handle.UPDATED
        monkeypatch.setattr(teacher_mod.ops, "ema_update_", record)
        monkeypatch.setattr(teacher_mod, "_step_handle", record_step)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def current(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def assert_writes_current_tensors(calls, teacher: EMATeacher, student: nn.Module) -> None:
    """One update wrote every teacher tensor once, the teacher module's current objects, each
    from the student's current tensor of the same name."""
    written_t = [t for ts, _, _ in calls for t in ts]
    written_s = [s for _, ss, _ in calls for s in ss]
    t_now, s_now = dict(teacher.module.named_parameters()), dict(student.named_parameters())
    t_now.update(teacher.module.named_buffers())
    s_now.update(student.named_buffers())
    assert len(written_t) == len(t_now), (len(written_t), len(t_now))
    names = {id(v): k for k, v in t_now.items()}
    assert all(id(t) in names for t in written_t), "a write went to a tensor the teacher no longer holds"
    assert sorted(names[id(t)] for t in written_t) == sorted(t_now)
    for t, s in zip(written_t, written_s):
        assert s is s_now[names[id(t)]], f"{names[id(t)]} was read from a stale student tensor"


MOVES = {
    "to_cpu": lambda m: m.to("cpu"),
    "cpu": lambda m: m.cpu(),
    "float": lambda m: m.float(),
    "double": lambda m: m.double(),
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "channels_last": lambda m: m.to(memory_format=torch.channels_last),
    "to_dtype_and_format": lambda m: m.to(torch.float64, memory_format=torch.channels_last),
    "to_empty": lambda m: m.to_empty(device="cpu"),
    "share_memory": lambda m: m.share_memory(),
}


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("target", ["teacher", "student", "both"])
@pytest.mark.parametrize("when", ["before_first_update", "after_first_update"])
def test_moves_and_casts_are_followed(move, target, when, monkeypatch):
    student = small_model()
    teacher = EMATeacher(student, momentum=0.5)
    box = nn.ModuleDict({"student": student, "teacher": teacher})  # a module holding both
    rec = Recorder(monkeypatch)
    if when == "after_first_update":
        teacher.update()
        assert_writes_current_tensors(rec.take(), teacher, student)
    {"teacher": lambda: MOVES[move](teacher), "student": lambda: MOVES[move](student),
     "both": lambda: MOVES[move](box)}[target]()
    for _ in range(2):
        teacher.update()
        assert_writes_current_tensors(rec.take(), teacher, student)
    assert rec.handle_steps > 0  # the persistent-plan path is the one followed here
    # the teacher keeps its own dtype unless it was cast itself
    want = {"double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
            "to_dtype_and_format": torch.float64}.get(move, torch.float32)
    assert teacher.module[0].weight.dtype == (want if target != "student" else torch.float32)
    # and the student's memory format
    assert teacher.module[0].weight.stride() == student[0].weight.stride()


def test_a_cast_student_feeds_its_new_statistics():
    # the reported failure: after student.double() the teacher averaged the dead float32
    # running_mean (it stayed 0 while the student's was 4)
    student = small_model()
    teacher = EMATeacher(student, momentum=0.0)
    student.double()
    student(torch.randn(8, 3, 6, 6, dtype=torch.float64))  # a forward writes the new buffers
    with torch.no_grad():
        student[1].running_mean.fill_(4.0)
    teacher.update()
    assert torch.equal(teacher.module[1].running_mean, torch.full((4,), 4.0))
    assert teacher.module[1].num_batches_tracked.item() == 1


def test_a_channels_last_student_gets_a_channels_last_teacher_with_the_same_bits():
    student = small_model()
    teacher = EMATeacher(student, momentum=0.9)
    student.to(memory_format=torch.channels_last)
    for step in range(3):
        student(torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last))
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)
        # the same update on contiguous copies: elementwise, so the layout must not matter
        expected = [t.detach().contiguous().clone() for t in teacher.ema_tensors]
        eman_fused.ema_update_(expected, [s.contiguous() for s in teacher.ema_sources], 0.9)
        teacher.update()
        for t, e in zip(teacher.ema_tensors, expected):
            assert torch.equal(bits(t.contiguous()), bits(e))
    assert teacher.module[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_unrelated_modules_do_not_trigger_a_rematch():
    student = small_model()
    teacher = EMATeacher(student)
    generation = teacher.refresh()
    others = [nn.Linear(4, 4) for _ in range(10)]  # modules created and changed elsewhere
    others[0].weight = nn.Parameter(torch.zeros(4, 4))
    others[1].register_buffer("b", torch.zeros(1))
    teacher.update()
    assert teacher.refresh() == generation
    student[4] = nn.Linear(4 * 4 * 4, 3)  # the student's own structure: re-matched
    teacher.update()
    assert teacher.refresh() == generation + 1
    assert any(s is student[4].weight for s in teacher.ema_sources)


def test_placement_rules():
    cpu, cuda0, cuda1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    t = EMATeacher(small_model())
    assert t._mirror_wanted(cpu, cuda0) and not t._mirror_wanted(cuda0, cpu)
    assert not t._mirror_wanted(cuda1, cuda0)


def test_a_teacher_pinned_elsewhere_refuses_before_writing(monkeypatch):
    # device= pins the teacher; where no path exists (here: none is allowed at all), the next
    # update names the tensor and writes nothing. (A real CPU teacher of a CUDA student is the
    # GPU test in test_teacher.py.)
    student = small_model()
    teacher = EMATeacher(student, device="cpu", momentum=0.0)
    before = [bits(t) for t in teacher.module.state_dict().values()]
    monkeypatch.setattr(EMATeacher, "_mirror_wanted", lambda self, t, s: False)
    monkeypatch.setattr(teacher_mod, "_single_device",
                        lambda slots, side: torch.device("cuda", 0) if side == "student" else torch.device("cpu"))
    student[1].running_mean = student[1].running_mean.clone()  # any change: re-match
    with torch.no_grad():
        student[0].weight.add_(1.0)
    with pytest.raises(ValueError, match=r"the student's '0\.weight' is on cuda:0 but the teacher is kept on cpu"):
        teacher.update()
    assert all(torch.equal(b, bits(t)) for b, t in zip(before, teacher.module.state_dict().values()))


# -- the CPU teacher of a GPU student: the mirror's bookkeeping, on the CPU --------------------
class _CpuSide:
    """A stand-in for the CUDA side of the mirror: copies happen at once, events are no-ops."""
    allocated = []

    class _Stream:
        def wait_stream(self, other):
            pass

        def wait_event(self, event):
            pass

    class _Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    def __init__(self, device):
        self.device, self.stream = device, self._Stream()

    def current(self):
        return self._Stream()

    def event(self):
        return self._Event()

    def on_side(self):
        import contextlib
        return contextlib.nullcontext()

    def alloc(self, like):
        t = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype)
        _CpuSide.allocated.append(weakref.ref(t))
        return t


def test_one_mirror_per_teacher_reused_over_1000_rematches_and_freed_with_it(monkeypatch):
    monkeypatch.setattr(teacher_mod._HostMirror, "_side_factory", _CpuSide)
    monkeypatch.setattr(EMATeacher, "_mirror_wanted", lambda self, t, s: True)
    monkeypatch.setattr(teacher_mod, "_single_device",
                        lambda slots, side: torch.device("cpu") if side == "teacher" else torch.device("cuda"))
    _CpuSide.allocated.clear()
    live_before = len(teacher_mod._HostMirror._live)
    student = small_model()
    teacher = EMATeacher(student, momentum=0.5, device="cpu")
    mirror = teacher._mirror
    assert mirror is not None and len(teacher_mod._HostMirror._live) == live_before + 1
    n = len(current(student))
    assert mirror.allocations == n
    for i in range(1000):
        # a re-match each time: the student's Linear swapped for a new one of the same shape
        student[4] = nn.Linear(4 * 4 * 4, 3)
        teacher.update()
        assert teacher._mirror is mirror
    teacher.wait()
    assert mirror.allocations == n and len(mirror.staging) == n  # no growth
    assert len(teacher_mod._HostMirror._live) == live_before + 1
    # the staged update is the plain one: the same kernel on the same values
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    expected = [t.clone() for t in teacher.ema_tensors]
    eman_fused.ema_update_(expected, teacher.ema_sources, 0.5)
    teacher.update()
    teacher.wait()
    assert all(torch.equal(a, b) for a, b in zip(teacher.ema_tensors, expected))
    # freed with the teacher: mirror, staging buffers, worker thread
    executor = mirror.executor
    ref_mirror = weakref.ref(mirror)
    del teacher, mirror
    gc.collect()
    assert ref_mirror() is None
    assert len(teacher_mod._HostMirror._live) == live_before
    assert all(r() is None for r in _CpuSide.allocated)
    assert executor._shutdown


# -- checkpoints ---------------------------------------------------------------------------
def test_progress_is_in_the_state_dict_as_its_last_key():
    student = small_model()
    teacher = EMATeacher(student, schedule=schedules.MeanTeacherRamp(0.99))
    for _ in range(5):
        teacher.update()
    sd = teacher.state_dict()
    assert list(sd)[-1] == "_extra_state" and list(sd)[:-1] == list(student.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # safetensors / DCP friendly
    fresh = EMATeacher(small_model(), schedule=schedules.MeanTeacherRamp(0.99))
    fresh.load_state_dict(sd)
    assert fresh.num_updates == 5
    # zip(teacher.state_dict(), student.state_dict()) code still pairs the plain keys
    assert all(a == b for (a, _), b in zip(sd.items(), student.state_dict()))


@pytest.mark.parametrize("capturable", [False, True])
def test_an_old_checkpoint_loads_with_a_warning_and_the_count_can_be_set(capturable):
    student = small_model()
    teacher = EMATeacher(student, schedule=schedules.MeanTeacherRamp(0.99), capturable=capturable)
    for _ in range(4):
        teacher.update()
    old = {k: v for k, v in teacher.state_dict().items() if k != "_extra_state"}
    fresh = EMATeacher(small_model(), schedule=schedules.MeanTeacherRamp(0.99), capturable=capturable)
    with pytest.warns(UserWarning, match="no teacher progress.*count is not restored"):
        fresh.load_state_dict(old)
    assert fresh.num_updates == 0
    fresh.num_updates = 4  # resume at update 4 by hand: momentum min(1 - 1/5, 0.99)
    assert fresh.num_updates == 4
    assert float(fresh.momentum_for_step()) == pytest.approx(0.8)


def _run_first_half_and_uninterrupted(tmp_path):
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs with one thread too: same reductions, same bits
    try:
        for case in worker.cases():
            run = worker.build(case)
            worker.train(run, 0, worker.K)
            worker.save_checkpoint(run, str(tmp_path / f"{case}.pt"))
            full = worker.build(case)
            worker.train(full, 0, 2 * worker.K)
            results[case] = worker.result(full)
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lifecycle")
    uninterrupted = _run_first_half_and_uninterrupted(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, worker.__file__, "resume", json.dumps(worker.cases()), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no teacher progress" not in proc.stderr
    return uninterrupted, {case: torch.load(tmp_path / f"{case}.final.pt", weights_only=True)
                           for case in worker.cases()}


@pytest.mark.parametrize("case", worker.cases())
def test_resumed_in_a_new_process_equals_the_uninterrupted_run_bit_for_bit(resumed, case):
    uninterrupted, after_resume = resumed
    want, got = uninterrupted[case], after_resume[case]
    assert got["num_updates"] == want["num_updates"] == 2 * worker.K
    for side in ("teacher", "student"):
        assert list(got[side]) == list(want[side])
        for k in want[side]:
            assert torch.equal(bits(got[side][k]), bits(want[side][k])), f"{side} {k}"


def test_without_the_progress_a_resumed_schedule_would_differ(tmp_path):
    # the reason the count is saved: MeanTeacherRamp restarted at 0 overwrites the teacher
    run = worker.build("mean_teacher-update")
    worker.train(run, 0, worker.K)
    worker.save_checkpoint(run, str(tmp_path / "c.pt"))
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    del ckpt["teacher"]["_extra_state"]
    torch.save(ckpt, tmp_path / "old.pt")
    resumed = worker.build("mean_teacher-update")
    with pytest.warns(UserWarning, match="no teacher progress"):
        worker.load_checkpoint(resumed, str(tmp_path / "old.pt"))
    worker.train(resumed, worker.K, worker.K + 1)  # first update after resume: momentum 0
    student, teacher = resumed[0], resumed[1]
    for (k, t), s in zip(teacher.module.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), k  # the teacher was overwritten by the student
