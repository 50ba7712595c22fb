"""EMATeacher against the official EMAN update (a state_dict loop), and its options."""
import copy
import re

import pytest
import torch
import torchvision
from torch import nn

import eman_fused
from eman_fused import EMATeacher, StructureMismatchError, schedules
from eman_fused.nn import EMANBatchNorm
from eman_fused.reference import official_eman_update_ as official_eman_update

from conftest import TOLERANCES, bits, needs_gpu


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def assert_state_close(actual: dict, expected: dict) -> None:
    actual = dict(actual)
    if "_extra_state" in actual and "_extra_state" not in expected:  # a teacher's progress, last
        assert list(actual)[-1] == "_extra_state"
        del actual["_extra_state"]
    assert list(actual) == list(expected)
    for k in expected:
        if expected[k].is_floating_point():
            torch.testing.assert_close(actual[k], expected[k], **TOLERANCES[actual[k].dtype], msg=k)
        else:
            assert torch.equal(actual[k], expected[k]), k


def test_matches_the_official_eman_update_over_20_training_steps():
    student = small_resnet()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    teacher = EMATeacher(student, momentum=0.99)
    reference = copy.deepcopy(student)
    for step in range(20):
        train_step(student, opt, step)
        teacher.update()
        official_eman_update(reference, student, 0.99)
    assert_state_close(teacher.state_dict(), reference.state_dict())
    # num_batches_tracked is the student's, exactly (AveragedModel(use_buffers=True) averages it)
    assert teacher.module.bn1.num_batches_tracked.item() == student.bn1.num_batches_tracked.item() == 20
    # EMAN forward: running statistics, in any mode; equals the reference model in eval mode.
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    torch.testing.assert_close(teacher(x), reference(x), rtol=1e-4, atol=1e-5)
    teacher.train()
    torch.testing.assert_close(teacher(x), reference(x), rtol=1e-4, atol=1e-5)


def test_teacher_is_frozen_converted_and_outputs_no_grad():
    student = small_resnet()
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert isinstance(teacher.module.bn1, EMANBatchNorm)
    assert isinstance(student.bn1, nn.BatchNorm2d)
    assert not teacher.module.training  # EMAN default: dropout off
    out = teacher(torch.randn(2, 3, 32, 32, requires_grad=True))
    assert not out.requires_grad
    # every parameter and buffer is in the one EMA launch (counters copied in it)
    assert len(teacher.ema_tensors) == len(student.state_dict()) and not teacher.copied_tensors


@pytest.mark.parametrize("schedule", [schedules.CosineToOne(0.9, 10), schedules.MeanTeacherRamp(0.95),
                                      schedules.Cyclical(0.5, 0.9, 4)], ids=repr)
@pytest.mark.parametrize("capturable", [False, True])
def test_schedule_gives_each_update_its_momentum(schedule, capturable):
    student = small_resnet()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    teacher = EMATeacher(student, schedule=schedule, capturable=capturable)
    reference = copy.deepcopy(student)
    for step in range(6):
        train_step(student, opt, step)
        teacher.update()
        official_eman_update(reference, student, schedule(step))
    assert teacher.num_updates == 6
    assert_state_close(teacher.state_dict(), reference.state_dict())


def test_explicit_step_picks_the_momentum_and_sets_the_count():
    student = small_resnet()
    teacher = EMATeacher(student, schedule=schedules.MeanTeacherRamp(0.99))
    reference = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(step=3)  # momentum 0.75
    official_eman_update(reference, student, 0.75)
    assert teacher.num_updates == 4
    assert_state_close(teacher.state_dict(), reference.state_dict())


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(torch.ones_like(t) if t.is_floating_point() else torch.ones_like(t))


@pytest.mark.parametrize("include,exclude", [("^fc\\.", None), (None, lambda n: not n.startswith("fc.")),
                                             ([re.compile("fc.weight"), "fc.bias"], None)])
@pytest.mark.parametrize("others", ["copy", "freeze"])
def test_include_exclude_selects_the_ema_tensors(include, exclude, others):
    student = small_resnet()
    teacher = EMATeacher(student, momentum=0.5, include=include, exclude=exclude, others=others)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    perturb(student)
    teacher.update()
    after, s = teacher.module.state_dict(), student.state_dict()
    for k in after:
        if k.startswith("fc."):
            torch.testing.assert_close(after[k], 0.5 * before[k] + 0.5 * s[k])
        elif others == "copy":
            assert torch.equal(after[k], s[k]), k
        else:  # frozen: not one bit changed
            assert torch.equal(bits(after[k]), bits(before[k])), k


def test_projector_only_momentum_recipe():
    # EMA on the projector only; the backbone follows the student exactly.
    student = nn.Sequential()
    student.add_module("backbone", nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()))
    student.add_module("projector", nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                                  nn.Linear(16, 4)))
    teacher = EMATeacher(student, momentum=0.9, include=r"^projector\.")
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    perturb(student)
    teacher.update()
    for k, v in teacher.module.state_dict().items():
        expected = student.state_dict()[k]
        if k.startswith("projector.") and v.is_floating_point():
            expected = 0.9 * before[k] + 0.1 * expected
        torch.testing.assert_close(v, expected, msg=k)


@pytest.mark.parametrize("buffers", ["ema", "copy", "own"])
def test_classic_teacher_buffers_option(buffers):
    student = small_resnet()
    teacher = EMATeacher(student, momentum=0.5, eman=False, buffers=buffers)
    assert isinstance(teacher.module.bn1, nn.BatchNorm2d) and teacher.module.training
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    perturb(student)
    teacher.update()
    for k, v in teacher.module.state_dict().items():
        s = student.state_dict()[k]
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * s, msg=k)
        elif buffers == "own":
            assert torch.equal(v, before[k]), k
        elif buffers == "copy" or "num_batches" in k:
            assert torch.equal(v, s), k
        else:
            torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * s, msg=k)


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                         (torch.float32, torch.bfloat16),
                                                         (torch.float16, torch.float32)])
def test_teacher_dtype(student_dtype, teacher_dtype):
    student = small_resnet().to(student_dtype)
    teacher = EMATeacher(student, momentum=0.75, teacher_dtype=teacher_dtype)
    assert teacher.module.conv1.weight.dtype == teacher_dtype
    assert teacher.module.bn1.num_batches_tracked.dtype == torch.int64
    reference = copy.deepcopy(student).to(teacher_dtype)
    perturb(student)
    teacher.update()
    with torch.no_grad():
        for (k, r), s in zip(reference.state_dict().items(), student.state_dict().values()):
            if r.is_floating_point():  # fp32 math, rounded once to the teacher's dtype
                r.copy_((0.75 * r.float() + 0.25 * s.float()).to(teacher_dtype))
            else:
                r.copy_(s)
    assert_state_close(teacher.state_dict(), reference.state_dict())


def test_state_dict_loads_into_a_torchvision_resnet_and_back():
    student = small_resnet()
    teacher = EMATeacher(student)
    perturb(student)
    teacher.update()
    plain = torchvision.models.resnet18(num_classes=10)
    # the plain keys, no 'module.' prefix; the teacher's progress is the one extra key, last
    assert list(teacher.state_dict()) == list(plain.state_dict()) + ["_extra_state"]
    plain.load_state_dict(teacher.module.state_dict())  # strict
    result = plain.load_state_dict(teacher.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["_extra_state"]
    assert_state_close(teacher.state_dict(), plain.state_dict())
    fresh = EMATeacher(small_resnet())
    with pytest.warns(UserWarning, match="no teacher progress"):
        fresh.load_state_dict(plain.state_dict())
    assert_state_close(fresh.state_dict(), plain.state_dict())
    # a checkpoint with 'module.' keys (timm's ModelEma layout) loads too
    with pytest.warns(UserWarning, match="no teacher progress"):
        fresh.load_state_dict({"module." + k: v for k, v in plain.state_dict().items()})


def test_state_dict_keys_inside_a_larger_module():
    class MoCo(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            self.teacher = EMATeacher(self.student)

    a = MoCo()
    perturb(a.student)
    a.teacher.update()
    sd = a.state_dict()
    assert "teacher.0.weight" in sd and "teacher.1.num_batches_tracked" in sd
    assert not any(k.startswith("teacher.module.") for k in sd)
    b = MoCo()
    b.load_state_dict(sd)
    assert_state_close(b.state_dict(), sd)


def test_structure_change_is_seen_at_the_next_update():
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    teacher = EMATeacher(student, momentum=0.0)
    student[2] = nn.Linear(4, 2)  # same shapes, new tensors: the teacher must follow these
    teacher.update()
    assert torch.equal(teacher.module[2].weight, student[2].weight)
    student[2] = nn.Linear(4, 3)
    with pytest.raises(StructureMismatchError, match=r"2\.weight: teacher shape \(2, 4\) vs student \(3, 4\)"):
        teacher.update()
    student[2] = nn.Linear(4, 2)
    student.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(StructureMismatchError, match="in the student only: extra.bias, extra.weight"):
        teacher.update()


def test_a_failed_match_writes_nothing():
    student = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    teacher = EMATeacher(student, momentum=0.0)
    before = [bits(t) for t in teacher.module.state_dict().values()]
    perturb(student)
    student[1] = nn.Linear(4, 5)
    with pytest.raises(StructureMismatchError):
        teacher.update()
    assert all(torch.equal(b, bits(t)) for b, t in zip(before, teacher.module.state_dict().values()))


def test_a_given_teacher_is_matched_by_name_and_reset_copies_the_student():
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    other = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(student, teacher=other, momentum=0.9)
    assert teacher.module is other
    assert not torch.equal(other[0].weight, student[0].weight)  # its own values are kept
    teacher.reset()
    assert_state_close(teacher.state_dict(), student.state_dict())
    with pytest.raises(StructureMismatchError, match="in the teacher only"):
        EMATeacher(student, teacher=nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))


def test_compiled_student_and_compiled_submodule_match_every_tensor():
    student = small_resnet()
    compiled = torch.compile(student)
    teacher = EMATeacher(compiled, momentum=0.0)
    assert "conv1.weight" in teacher.names and not any("_orig_mod" in n for n in teacher.names)
    assert len(teacher.ema_tensors) == len(student.state_dict())
    student2 = small_resnet()
    student2.layer1 = torch.compile(student2.layer1)  # names get a `layer1._orig_mod.` part
    teacher2 = EMATeacher(student2, momentum=0.0)
    assert len(teacher2.ema_tensors) == len(student2.state_dict())
    perturb(student2)
    teacher2.update()
    for k, v in student2.state_dict().items():
        assert torch.equal(teacher2.module.state_dict()[k], v), k


def test_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        ddp = nn.parallel.DistributedDataParallel(student)
        teacher = EMATeacher(ddp, momentum=0.0)
        assert teacher.names == list(student.state_dict())
        perturb(student)
        teacher.update()
        assert_state_close(teacher.state_dict(), student.state_dict())
    finally:
        dist.destroy_process_group()


def test_update_traces_with_fullgraph_compile_and_no_recompiles():
    torch._dynamo.reset()
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    schedule = schedules.CosineToOne(0.9, 10)
    teacher = EMATeacher(student, schedule=schedule, capturable=True)
    reference = copy.deepcopy(student)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def step():
        teacher.update()

    for k in range(4):
        perturb(student)
        step()
        official_eman_update(reference, student, schedule(k))
    assert len(compiles) == 1  # the momentum moved, the graph did not
    assert_state_close(teacher.state_dict(), reference.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(buffers="own"), "freeze"),
    (dict(buffers="all"), "buffers must be"),
    (dict(others="drop"), "others must be"),
    (dict(teacher_dtype=torch.int32), "floating"),
    (dict(momentum=0.9, schedule=schedules.Constant(0.5)), "not both"),
    (dict(momentum=1.5), r"\[0, 1\]"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMATeacher(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(backend="cdua"), ValueError, "backend must be one of"),
    (dict(momentum=0.999, schedule=schedules.Constant(0.5)), ValueError, "not both"),  # the default value too
    (dict(momentum=schedules.Constant(0.9), schedule=schedules.Constant(0.5)), ValueError, "not both"),
    (dict(momentum="0.9"), TypeError, "momentum must be a float"),
    (dict(untracked_bn="skip"), ValueError, "untracked_bn must be"),
])
def test_arguments_are_checked_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EMATeacher(nn.Linear(2, 2), **kwargs)


def test_an_unavailable_backend_is_reported_at_construction_with_why():
    if eman_fused.backends()["cuda"].available:
        pytest.skip("the CUDA backend is available here")
    with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):
        EMATeacher(nn.Linear(2, 2), backend="cuda")


@pytest.mark.parametrize("kwargs,pattern", [(dict(include=r"^proj\."), r"^proj\."),
                                            (dict(exclude=["fc", "nothing_here"]), "nothing_here"),
                                            (dict(include=lambda n: False), "<lambda>")])
def test_selectors_that_match_nothing_warn(kwargs, pattern):
    student = nn.Sequential(nn.Linear(2, 2))
    student.add_module("fc", nn.Linear(2, 2))
    with pytest.warns(UserWarning, match=f"pattern {re.escape(repr(pattern))} matches no parameter"):
        EMATeacher(student, **kwargs)


def test_the_fused_optimizers_use_only_the_teachers_public_interface():
    import inspect
    from eman_fused import optim
    source = inspect.getsource(optim._TeacherLink)
    reach_ins = re.findall(r"teacher\._\w+|\bt\._\w+", source)
    assert reach_ins == [], reach_ins


def test_bad_selector_raises():
    with pytest.raises(TypeError, match="include/exclude"):
        EMATeacher(nn.Linear(2, 2), include=[3])


def test_reference_backend_gives_the_same_teacher():
    student = small_resnet()
    fused, eager = EMATeacher(student, momentum=0.7), EMATeacher(student, momentum=0.7, backend="reference")
    perturb(student)
    fused.update(), eager.update()
    assert_state_close(fused.state_dict(), eager.state_dict())


@needs_gpu
def test_cpu_teacher_of_a_cuda_student_updates_in_the_background():
    student = small_resnet().cuda()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    teacher = EMATeacher(student, momentum=0.9, device="cpu")
    reference = copy.deepcopy(student).cpu()
    for step in range(5):
        g = torch.Generator(device="cuda").manual_seed(step)
        x = torch.randn(4, 3, 32, 32, device="cuda", generator=g)
        opt.zero_grad()
        student(x).square().mean().backward()
        opt.step()
        teacher.update()
        official_eman_update(reference, copy.deepcopy(student).cpu(), 0.9)
    teacher.wait()
    assert_state_close(teacher.state_dict(), reference.state_dict())


@needs_gpu
def test_cpu_teacher_of_a_channels_last_cuda_student_sees_each_forwards_statistics():
    student = small_resnet().cuda().to(memory_format=torch.channels_last)
    teacher = EMATeacher(student, momentum=0.5, device="cpu")
    reference = copy.deepcopy(student).cpu()
    mirror = teacher._mirror
    for step in range(4):
        x = torch.randn(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
        student(x)  # writes the BN statistics this update must read
        snapshot = copy.deepcopy(student).cpu()
        teacher.update()
        student(x * 2 + 1)  # the next forward's writes must not reach this update's staging
        teacher.wait()
        official_eman_update(reference, snapshot, 0.5)
    assert_state_close(teacher.state_dict(), reference.state_dict())
    assert teacher._mirror is mirror and mirror.allocations == len(list(student.state_dict()))
    assert teacher.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@needs_gpu
def test_an_unpinned_teacher_follows_its_student_to_the_gpu_and_a_pinned_one_refuses():
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(student, momentum=0.0)
    student.cuda()
    teacher.update()
    assert teacher.module[0].weight.device.type == "cuda" and teacher._mirror is None
    pinned = EMATeacher(student, momentum=0.0, device="cuda")
    student.cpu()
    with pytest.raises(ValueError, match="is on cpu but the teacher is kept on cuda"):
        pinned.update()


@needs_gpu
def test_capturable_update_replays_in_a_cuda_graph():
    student = small_resnet().cuda()
    schedule = schedules.CosineToOne(0.9, 10)
    teacher = EMATeacher(student, schedule=schedule, capturable=True)
    reference = copy.deepcopy(student)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        teacher.update()  # warm-up: builds the plan outside capture
    torch.cuda.current_stream().wait_stream(s)
    official_eman_update(reference, student, schedule(0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        teacher.update()
    for k in range(1, 5):
        perturb(student)
        graph.replay()
        official_eman_update(reference, student, schedule(k))
    torch.cuda.synchronize()
    assert_state_close(teacher.state_dict(), reference.state_dict())



def test_a_teacher_on_the_meta_device_refuses_to_update():
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(student, device="meta")  # e.g. built before to_empty()
    with pytest.raises(ValueError, match="meta device"):
        teacher.update()
