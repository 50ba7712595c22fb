"""eman_fused.integrations.lightning against a real Lightning Trainer (CPU): one update per
optimizer step, resume bit for bit, the fused optimizers over `self.parameters()` of a module
holding its teacher, the validation weight swap, precisions."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

if os.environ.get("EMAN_FUSED_REQUIRE_EXTRAS") == "1":  # scripts/test.sh installs the extras
    import lightning.pytorch as L
else:
    L = pytest.importorskip("lightning.pytorch")

import eman_fused  # noqa: E402
from eman_fused import EMATeacher  # noqa: E402
from eman_fused.integrations.lightning import EMATeacherCallback  # noqa: E402
from eman_fused.schedules import CosineToOne  # noqa: E402


def make_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def make_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


class Module(L.LightningModule):
    """optimizer: 'sgd' (torch.optim.SGD, teacher updated by the callback) or 'fused_adamw'
    (eman_fused.optim.AdamW over self.parameters(), teacher an attribute updated in step())."""

    def __init__(self, optimizer="sgd", holds_teacher=False, momentum=0.9):
        super().__init__()
        torch.manual_seed(0)
        self.net = make_net()
        self.optimizer = optimizer
        if holds_teacher:
            self.teacher = EMATeacher(self.net, momentum)
        self.seen_in_validation = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        # The data of an optimizer step depends on that step's index only: a resumed run sees
        # what the uninterrupted one saw. (Lightning 2.6 restarts a plain DataLoader at a
        # resume, one batch index off; what the teacher must survive is its own state.)
        micro = batch_idx % self.trainer.accumulate_grad_batches
        g = torch.Generator().manual_seed(1000 * self.trainer.global_step + micro)
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        # What the student holds while validating (the teacher's values when swapped).
        self.seen_in_validation.append({k: v.clone() for k, v in self.net.state_dict().items()})
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_data(), batch_size=4, shuffle=False)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(make_data(8, seed=1), batch_size=4)

    def configure_optimizers(self):
        if self.optimizer == "fused_adamw":
            return eman_fused.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05, teacher=self.teacher)
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)


def trainer(tmp_path, max_steps, **kw):
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


def teacher_state(teacher):
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


class StudentRecorder(L.Callback):
    """Before the EMA callback in the list: the student's tensors after each optimizer step."""

    def __init__(self):
        self.after_step = []
        self._last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.after_step.append({k: v.detach().clone().double() for k, v in pl_module.net.state_dict().items()})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_update_per_optimizer_step_with_the_schedules_step(tmp_path, accumulate):
    schedule = CosineToOne(0.9, total_steps=8)
    module = Module()
    rec = StudentRecorder()
    cb = EMATeacherCallback(schedule=schedule, student="net")
    trainer(tmp_path, 6, accumulate_grad_batches=accumulate, callbacks=[rec, cb]).fit(module)
    assert cb.teacher.num_updates == 6 and len(rec.after_step) == 6
    # The reference: the EMA in float64 of the student after each optimizer step, at the
    # schedule's step k for the k-th step (from the initial student).
    torch.manual_seed(0)
    ref = {k: v.double() for k, v in make_net().state_dict().items()}
    for k, s in enumerate(rec.after_step):
        m = schedule(k)
        for n in ref:
            ref[n] = s[n].clone() if not s[n].is_floating_point() or n.endswith("num_batches_tracked") \
                else m * ref[n] + (1 - m) * s[n]
    got = cb.teacher.module.state_dict()
    for n in ref:
        if n.endswith("num_batches_tracked"):
            assert int(got[n]) == int(rec.after_step[-1][n]) == 6 * accumulate, n  # copied exactly
        else:
            torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-6, atol=1e-6)


def epoch_checkpoints(tmp_path):
    # Written by Lightning during training, at each epoch's end (4 optimizer steps): the
    # checkpoint a crashed run resumes from.
    return L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1,
                                       save_on_train_epoch_end=True, filename="{step}")


def run_resume(tmp_path, optimizer, holds_teacher, cb_kwargs, resume_in=None):
    def make():
        return (Module(optimizer, holds_teacher=holds_teacher),
                EMATeacherCallback(**cb_kwargs))

    full_module, full_cb = make()
    trainer(tmp_path / "full", 8, callbacks=[full_cb, epoch_checkpoints(tmp_path / "ckpt")],
            enable_checkpointing=True).fit(full_module)
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    full = teacher_state(full_cb.teacher)
    if resume_in is None:
        resumed_module, resumed_cb = make()
        trainer(tmp_path / "resumed", 8, callbacks=[resumed_cb]).fit(resumed_module, ckpt_path=ckpt)
        assert full_cb.teacher.num_updates == resumed_cb.teacher.num_updates == 8
        assert_bit_equal(full_module.net.state_dict(), resumed_module.net.state_dict())
        resumed = teacher_state(resumed_cb.teacher)
    else:
        resumed = resume_in(ckpt)
    assert_bit_equal(full, resumed)
    return full_cb, ckpt


def test_resume_is_bit_identical_with_the_callbacks_own_teacher(tmp_path):
    full_cb, ckpt = run_resume(tmp_path, "sgd", False, dict(momentum=0.9, student="net"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    (cb_state,) = [v for k, v in state.items() if "EMATeacherCallback" in k]
    assert int(cb_state["teacher"]["_extra_state"][1]) == 4  # the progress is in the checkpoint


def test_resume_is_bit_identical_with_the_fused_adamw_over_self_parameters(tmp_path):
    # The module holds its teacher; AdamW gets self.parameters() (the teacher's frozen tensors
    # included and skipped) and updates the teacher in step(): the callback does not update it again.
    full_cb, ckpt = run_resume(tmp_path, "fused_adamw", True, dict(teacher="teacher"))
    assert not full_cb.owns_teacher
    assert int(torch.load(ckpt, weights_only=True)["state_dict"]["teacher._extra_state"][1]) == 4


def test_fused_optimizer_is_not_doubled_by_the_callback(tmp_path):
    module = Module("fused_adamw", holds_teacher=True)
    cb = EMATeacherCallback(teacher="teacher")
    trainer(tmp_path, 5, accumulate_grad_batches=2, callbacks=[cb]).fit(module)
    assert module.teacher.num_updates == 5


def test_resume_in_a_new_process(tmp_path):
    # A fresh interpreter resumes from the checkpoint and must end where the uninterrupted run
    # in this process ends.
    def in_new_process(ckpt):
        code = textwrap.dedent(f"""
            import sys, torch
            sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
            from test_integration_lightning import Module, EMATeacherCallback, trainer, teacher_state
            cb = EMATeacherCallback(momentum=0.9, student="net")
            trainer({str(tmp_path / "resumed")!r}, 8, callbacks=[cb]).fit(Module(), ckpt_path={str(ckpt)!r})
            assert cb.teacher.num_updates == 8
            torch.save(teacher_state(cb.teacher), {str(tmp_path / "resumed.pt")!r})
        """)
        # This process's import path: the in-tree package or the installed one, as here.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
        return torch.load(tmp_path / "resumed.pt", weights_only=True)

    run_resume(tmp_path, "sgd", False, dict(momentum=0.9, student="net"), resume_in=in_new_process)


def test_validation_swap_evaluates_the_teacher_and_restores_the_student_exactly(tmp_path):
    plain_module, plain_cb = Module(), EMATeacherCallback(momentum=0.9, student="net", swap=())
    trainer(tmp_path / "plain", 8, callbacks=[plain_cb]).fit(plain_module)

    class TeacherAtValidation(L.Callback):
        def __init__(self):
            self.seen = []

        def on_validation_epoch_start(self, trainer, pl_module):
            self.seen.append({k: v.clone() for k, v in ema.teacher.module.state_dict().items()})

    ema = EMATeacherCallback(momentum=0.9, student="net")
    probe = TeacherAtValidation()
    module = Module()
    trainer(tmp_path / "val", 8, callbacks=[ema, probe], limit_val_batches=1, val_check_interval=4,
            num_sanity_val_steps=1).fit(module)
    assert len(module.seen_in_validation) == len(probe.seen) == 3  # sanity check + 2 validations
    for in_student, teacher in zip(module.seen_in_validation, probe.seen):
        assert_bit_equal(in_student, teacher)  # EMA weights in (integer buffers included)
    # ... and the student's own values back, bit for bit: training went on as without validation.
    assert_bit_equal(module.net.state_dict(), plain_module.net.state_dict())
    assert_bit_equal(teacher_state(ema.teacher), teacher_state(plain_cb.teacher))


def test_validate_with_ckpt_path_evaluates_the_saved_teacher(tmp_path):
    module, cb = Module(), EMATeacherCallback(momentum=0.9, student="net")
    t = trainer(tmp_path, 4, callbacks=[cb])
    t.fit(module)
    t.save_checkpoint(tmp_path / "end.ckpt")
    saved = {k: v.clone() for k, v in cb.teacher.module.state_dict().items()}
    fresh, fresh_cb = Module(), EMATeacherCallback(momentum=0.9, student="net")
    trainer(tmp_path, 4, callbacks=[fresh_cb], limit_val_batches=1).validate(fresh, ckpt_path=tmp_path / "end.ckpt")
    assert_bit_equal(fresh.seen_in_validation[0], saved)
    assert fresh_cb.teacher.num_updates == 4


def test_whole_lightning_module_as_the_student(tmp_path):
    # student=None: the teacher copies the LightningModule's tensors, not its Trainer.
    module = Module()
    cb = EMATeacherCallback(momentum=0.9)
    t = trainer(tmp_path, 3, callbacks=[cb])
    t.fit(module)
    assert cb.teacher.num_updates == 3
    assert getattr(cb.teacher.module, "_trainer", None) is None
    assert set(cb.teacher.module.state_dict()) == set(module.state_dict())


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.float32), ("64-true", torch.float64)])
def test_precisions(tmp_path, precision, dtype):
    module, cb = Module(), EMATeacherCallback(momentum=0.9, student="net")
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer(tmp_path, 4, precision=precision, callbacks=[cb]).fit(module)
    assert cb.teacher.num_updates == 4
    w = cb.teacher.module.state_dict()["0.weight"]
    assert w.dtype == dtype and module.net[0].weight.dtype == dtype
    assert torch.isfinite(w).all() and not torch.equal(w.to(start["0.weight"].dtype), start["0.weight"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="swap takes"):
        EMATeacherCallback(swap=("train",))
    with pytest.raises(ValueError, match="existing EMATeacher"):
        EMATeacherCallback(0.9, teacher="teacher")
    with pytest.raises(TypeError, match="teacher must be"):
        EMATeacherCallback(teacher=nn.Linear(2, 2))


def test_teacher_attribute_that_is_not_an_ematteacher(tmp_path):
    module = Module()
    module.teacher = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="not an eman_fused.EMATeacher"):
        trainer(tmp_path, 1, callbacks=[EMATeacherCallback(teacher="teacher")]).fit(module)
