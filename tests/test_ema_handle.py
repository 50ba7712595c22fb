"""The persistent plan handles (csrc/ema/handle.h) behind FusedEMA and EMATeacher: every way a
tensor can change under a handle re-plans before any write, nothing stale is ever written, the
handle's table outlives the shared cache, and what the handle cannot run goes through the op."""
import copy
import io
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eman_fused
from eman_fused import _backends, reference
from conftest import bits

pytestmark = pytest.mark.skipif(_backends._C_ERROR is not None, reason="needs the C++ extension")

ops = torch.ops.eman_fused


def pair(shape=(6, 5), t_value=2.0, s_value=1.0, dtype=torch.float32):
    return torch.full(shape, t_value, dtype=dtype), torch.full(shape, s_value, dtype=dtype)


def _realloc(t):
    t.data = torch.full_like(t, 3.0)


def _resize_larger(t):
    t.resize_(t.numel() * 4)
    t.fill_(3.0)


def _resize_smaller(t):
    t.resize_(t.numel() // 2)
    t.fill_(3.0)


def _storage_resize(t):
    # The same TensorImpl and StorageImpl, sizes unchanged: only the data pointer moves.
    n = t.untyped_storage().nbytes()
    t.untyped_storage().resize_(n * 64)
    t.fill_(3.0)


def _dtype(t):
    t.data = torch.full_like(t, 3.0, dtype=torch.float64)


def _channels_last(t):
    t.data = torch.full((2, 3, 5, 1), 3.0).contiguous(memory_format=torch.channels_last)


def _set_storage(t):
    t.set_(torch.full((t.numel(),), 3.0).untyped_storage(), 0, t.shape, t.stride())


def _as_strided(t):
    t.as_strided_((t.shape[1], t.shape[0]), (1, t.shape[1]))  # a transposed view of the same memory
    t.fill_(3.0)


def _swap(t):
    other = torch.full_like(t, 3.0)
    torch.utils.swap_tensors(t, other)


CHANGES = {"realloc": _realloc, "resize_larger": _resize_larger, "resize_smaller": _resize_smaller,
           "storage_resize": _storage_resize, "dtype": _dtype, "channels_last": _channels_last,
           "set_": _set_storage, "as_strided_": _as_strided, "swap_tensors": _swap}


def _apply_to_student(change, s):
    # The student must stay a valid partner: the same change with the student's own values.
    change(s)
    s.fill_(1.0)


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("side", ["teacher", "student", "both"])
def test_every_change_replans_and_writes_only_current_memory(change, side):
    shape = (2, 3, 5, 1) if change == "channels_last" else (6, 5)
    t0, s0 = pair(shape)
    t1, s1 = pair((7,))
    ema = eman_fused.FusedEMA([t0, t1], [s0, s1])
    ema.step(0.5)
    assert ema.plans_built == 1
    old_t = t0.detach().clone() if change in ("swap_tensors",) else t0.data
    old_s_bits = bits(s0.data)
    old_bits = bits(old_t)
    if side in ("teacher", "both"):
        CHANGES[change](t0)
    if side in ("student", "both"):
        _apply_to_student(CHANGES[change], s0)
    if side != "both" and change in ("resize_larger", "resize_smaller", "channels_last", "as_strided_"):
        # one side's shape or layout no longer matches the other's: refused before any write
        snapshot = [bits(t0), bits(t1)]
        with pytest.raises(ValueError, match="differ at index 0"):
            ema.step(0.5)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, [bits(t0), bits(t1)]))
        return
    expected = [t0.detach().clone(), t1.detach().clone()]
    reference.ema_update_(expected, [s0, s1], 0.25)
    ema.step(0.25)
    assert ema.plans_built == 2
    for t, e in zip((t0, t1), expected):
        torch.testing.assert_close(t, e, rtol=0, atol=0)
    if change != "swap_tensors" and side != "student":
        assert torch.equal(bits(old_t), old_bits), "the stale teacher memory was written"
    if side == "teacher":
        assert torch.equal(bits(s0), old_s_bits)
    ema.step(0.25)
    assert ema.plans_built == 2  # steady again: no re-plan


def test_an_unchanged_handle_never_replans_and_bumps_versions():
    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])
    v, vs = t._version, s._version
    for _ in range(10):
        ema.step(0.5)
    assert ema.plans_built == 1
    assert t._version == v + 10  # autograd sees every in-place write
    assert s._version == vs


def test_handle_table_outlives_the_shared_cache():
    t, s = pair((1000,))
    ema = eman_fused.FusedEMA([t], [s])
    table = ema._handle.table
    address = table.data_ptr()
    del table
    ops._clear_ema_plan_cache()
    others = [pair((i + 1,)) for i in range(100)]  # more distinct plans than the cache holds
    for a, b in others:
        eman_fused.ema_update_([a], [b], 0.5)
    cached, _, _ = _backends._C.ema_plan_cache_info()
    assert cached <= 64
    expected = [t.clone()]
    reference.ema_update_(expected, [s], 0.5)
    ema.step(0.5)
    assert ema.plans_built == 1 and ema._handle.table.data_ptr() == address
    torch.testing.assert_close(t, expected[0], rtol=0, atol=0)


def test_a_dispatch_mode_sees_the_op():
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])
    with Record():
        ema.step(0.5)
    assert any("ema_update_" in name for name in seen), seen
    torch.testing.assert_close(t, torch.full_like(t, 1.5))


def test_inference_mode_and_autocast_go_through_the_op():
    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])
    with torch.inference_mode():
        ema.step(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ema.step(0.5)
    torch.testing.assert_close(t, torch.full_like(t, 1.25))


def test_compiled_step_traces_the_op():
    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        ema.step(m)

    step(torch.tensor(0.5))
    torch.testing.assert_close(t, torch.full_like(t, 1.5))


def test_momentum_types():
    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])
    ema.step(1)  # an int is a number
    ema.step(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(t, torch.full_like(t, 1.5))
    for bad, exc in ((True, TypeError), ("0.5", TypeError), (torch.tensor([0.5]), ValueError),
                     (1.5, ValueError), (torch.tensor(2.0), ValueError)):
        before = bits(t)
        with pytest.raises(exc):
            ema.step(bad)
        assert torch.equal(bits(t), before)


def test_steps_from_two_threads():
    t, s = pair((4096,), t_value=0.0, s_value=1.0)
    ema = eman_fused.FusedEMA([t], [s])
    expected = [t.clone()]

    def run():
        for _ in range(200):
            ema.step(0.99)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for _ in range(400):
        reference.ema_update_(expected, [s], 0.99)
    torch.testing.assert_close(t, expected[0])


def test_deepcopy_and_save_build_new_handles():
    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])
    twin = copy.deepcopy(ema)
    twin.step(0.5)
    assert torch.equal(t, torch.full_like(t, 2.0)) and torch.equal(twin.teacher[0], torch.full_like(t, 1.5))
    buf = io.BytesIO()
    torch.save(ema, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.step(0.0)
    assert torch.equal(loaded.teacher[0], loaded.student[0]) and torch.equal(t, torch.full_like(t, 2.0))

    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    teacher = eman_fused.EMATeacher(student, 0.5)
    twin = copy.deepcopy(teacher)
    with torch.no_grad():
        twin._student[0].weight.fill_(1.0)
    before = teacher.module[0].weight.detach().clone()
    twin.update()
    assert torch.equal(teacher.module[0].weight, before)
    torch.testing.assert_close(twin.module[0].weight, (before + 1.0) / 2)


def test_fused_ema_lists_are_fixed():
    t, s = pair()
    ema = eman_fused.FusedEMA([t], [s])
    assert isinstance(ema.teacher, tuple) and isinstance(ema.student, tuple)


@pytest.mark.skipif(not torch.cuda.is_available() or not _backends._AVAILABLE.get("cuda"),
                    reason="needs a GPU and the CUDA backend")
def test_cuda_graph_replays_after_the_cache_evicted_its_plan():
    t, s = pair((5000,))
    t, s = t.cuda(), s.cuda()
    t2, s2 = pair((300,))
    t2, s2 = t2.cuda(), s2.cuda()
    m = torch.tensor(0.5, device="cuda")
    ema = eman_fused.FusedEMA([t], [s])
    ema.step(m)
    eman_fused.ema_update_([t2], [s2], m)  # warm-up of the functional path
    kept = _backends._C.ema_plan_cache_info()[1]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.step(m)
        eman_fused.ema_update_([t2], [s2], m)
    assert _backends._C.ema_plan_cache_info()[1] >= kept + 2
    ops._clear_ema_plan_cache()
    for i in range(100):
        a, b = pair((i + 1,))
        eman_fused.ema_update_([a.cuda()], [b.cuda()], 0.5)
    expected = [t.clone(), t2.clone()]
    for value in (0.9, 0.0):
        m.fill_(value)
        graph.replay()
        reference.ema_update_(expected, [s, s2], value)
    torch.cuda.synchronize()
    for a, e in zip((t, t2), expected):
        torch.testing.assert_close(a, e)


def small_student():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_teacher_refresh_sees_a_storage_change_through_its_handles():
    student = small_student()
    teacher = eman_fused.EMATeacher(student, 0.5)
    generation = teacher.refresh()
    assert teacher.refresh() == generation  # nothing changed
    student[0].weight.data = student[0].weight.data.clone()  # same object, new storage
    assert teacher.refresh() == generation + 1


@pytest.mark.parametrize("where", ["ema_list", "copy_list"])
def test_teacher_update_after_a_change_in_either_list_rematches_and_writes_current_tensors(where):
    # buffers='copy' puts the BatchNorm statistics in a second handle (copied at momentum 0)
    student = small_student()
    teacher = eman_fused.EMATeacher(student, 0.5, buffers="copy")
    assert len(teacher._handles) == 2
    teacher.update()
    generation = teacher.refresh()
    if where == "ema_list":
        student[0].weight.data = torch.full_like(student[0].weight, 2.0)
    else:
        student[1].running_mean = torch.full((3,), 5.0)  # a new object: the watch sees it
        student[1].running_var.data = torch.full((3,), 7.0)  # a new storage: the handle sees it
    expected_w = [teacher.module[0].weight.detach().clone()]
    reference.ema_update_(expected_w, [student[0].weight.detach()], 0.5)
    teacher.update()
    assert teacher.refresh() > generation
    # every value comes from the student's current tensors
    torch.testing.assert_close(teacher.module[0].weight, expected_w[0], rtol=0, atol=0)
    torch.testing.assert_close(teacher.module[1].running_mean, student[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(teacher.module[1].running_var, student[1].running_var, rtol=0, atol=0)


def test_a_refused_handle_leaves_the_tensors_sound():
    # The handle borrows its tensors (no reference counts): a constructor that raises must
    # release them as borrowed, or the tensors' C++ reference counts would drop below their owners.
    import gc
    t = torch.zeros(8)
    for _ in range(3):
        with pytest.raises(ValueError, match="overlaps"):
            _backends._C.EmaHandle([t], [t])
    gc.collect()
    assert t._use_count() == 1
    t.add_(1)
    assert torch.equal(t, torch.ones(8))


def test_teacher_handles_plan_at_the_first_update():
    # A teacher whose lists only the update would refuse is still built and re-matched.
    student = small_student()
    teacher = eman_fused.EMATeacher(student, 0.5)
    generation = teacher.refresh()
    assert teacher.refresh() == generation
    assert all(h.plans_built == 0 for h, *_ in teacher._handles)
    teacher.update()
    assert all(h.plans_built == 1 for h, *_ in teacher._handles)


@pytest.mark.parametrize("where", [0, 700, 1099])
def test_a_change_is_seen_by_the_checks_split_across_threads(where):
    # >= 1,024 pairs and >= 2**17 elements: the handle splits its checks across threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        teacher = [torch.full((128,), 2.0) for _ in range(1100)]
        student = [torch.full((128,), 1.0) for _ in range(1100)]
        ema = eman_fused.FusedEMA(teacher, student)
        ema.step(0.5)
        old = teacher[where].data
        teacher[where].data = torch.full((128,), 4.0)
        ema.step(0.5)
        assert ema.plans_built == 2
        assert torch.equal(old, torch.full((128,), 1.5))  # the stale memory was not written
        assert torch.equal(teacher[where], torch.full((128,), 2.5))
        assert all(torch.equal(t, torch.full((128,), 1.25)) for i, t in enumerate(teacher) if i != where)
    finally:
        torch.set_num_threads(threads)


def test_fused_ema_over_a_tensor_subclass_goes_through_the_op():
    class Tagged(torch.Tensor):
        pass

    t = torch.zeros(4).as_subclass(Tagged)
    s = torch.ones(4)
    ema = eman_fused.FusedEMA([t], [s])
    assert ema._handle is None
    ema.step(0.5)
    assert torch.equal(t.as_subclass(torch.Tensor), torch.full((4,), 0.5))


def test_a_teacher_moved_to_meta_after_construction_is_refused():
    student = small_student()
    teacher = eman_fused.EMATeacher(student, 0.5)
    teacher.update()
    student.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        teacher.update()


def test_a_copy_list_the_op_refuses_fails_before_the_ema_write():
    student = small_student()
    teacher = eman_fused.EMATeacher(student, 0.5, buffers="copy")
    before = teacher.module[0].weight.detach().clone()
    # two copied teacher buffers now share memory: the copy list is refused
    teacher.module[1].running_var.data = teacher.module[1].running_mean.data
    with pytest.raises(ValueError, match="overlaps"):
        teacher.update()
    assert torch.equal(teacher.module[0].weight, before)  # the EMA list was not written
    assert teacher.num_updates == 0


def test_optimizer_with_a_changing_set_of_params_with_grads():
    # Same count of params with a grad, different params: the cached split must not be reused.
    from eman_fused import optim
    torch.manual_seed(0)
    student = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    teacher = eman_fused.EMATeacher(student, 0.5, eman=False)
    opt = optim.SGD(student.parameters(), lr=0.1, teacher=teacher)
    for heads in ((0, 1), (0, 2), (1, 2), (0, 1)):
        opt.zero_grad(set_to_none=True)
        for h in heads:
            for p in student[h].parameters():
                p.grad = torch.ones_like(p)
        expected = [t.detach().clone() for t in teacher.module.parameters()]
        new_student = [(p - 0.1 * p.grad if p.grad is not None else p).detach() for p in student.parameters()]
        reference.ema_update_(expected, new_student, 0.5)
        opt.step()
        for t, e in zip(teacher.module.parameters(), expected):
            torch.testing.assert_close(t, e)
