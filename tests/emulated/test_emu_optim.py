"""The CUDA fused optimizer kernels (sgd_kernel, adamw_kernel, lars_norms_kernel,
lars_update_kernel) on the CPU emulator, against eman_fused's CPU kernels on the same tables (built
by the C++ table code): every param dtype with every teacher dtype (or none), tensors of 0, 1, 3,
4097 elements and several chunks, misaligned pointers, every option of each optimizer, the
capturable variants (device scalars, AdamW step counts), several thread orders. SGD and AdamW
do the CPU kernels' float32 operations in the same order: bit for bit; LARS sums its norms in
another order: to float32 rounding."""
import ctypes
import math

import pytest
import torch

from conftest import bits

pytestmark = pytest.mark.emulated
COVERS = {"sgd_kernel", "adamw_kernel", "lars_norms_kernel", "lars_update_kernel"}
ops = torch.ops.eman_fused

# 16,384 elements per chunk: empty, 1, 3, an odd tail, one short of a chunk, one past, three chunks.
SIZES = [0, 1, 3, 4097, 16383, 16385, 33000]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TEACHER_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]


def name(d):
    return "none" if d is None else str(d).replace("torch.", "")


def make(dtype, teacher_dtype, states, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(n, dt, positive=False):
        x = torch.randn(n, generator=g)
        return (x.abs() if positive else x).to(dt)
    params = [rand(n, dtype) for n in sizes]
    grads = [rand(n, dtype) for n in sizes]
    st = [[rand(n, dtype, positive=k > 0) for n in sizes] for k in range(states)]
    teacher = [rand(n, teacher_dtype) for n in sizes] if teacher_dtype is not None else []
    return params, grads, st, teacher


class Emulated:
    """Guarded copies of the step's lists and, after table(), the table in a guarded buffer."""

    def __init__(self, emu, lists, offset=0):
        self.emu = emu
        self.lists = [[emu.copy_in(t, offset=offset * t.element_size()).tensor for t in lst]
                      for lst in lists]

    def table(self, table_op, *args):
        t = table_op(*self.lists, *args)
        n = len(self.lists[0])
        self.table_buf = self.emu.copy_in(t)
        self.entries = self.table_buf.ptr
        self.chunks = self.entries + 8 * n * self.emu.layout("optim_entry_words")
        self.num_chunks = (t.numel() - n * self.emu.layout("optim_entry_words")) // self.emu.layout(
            "chunk_words")
        return self

    def scalar(self, value, dtype=torch.float32):
        return self.emu.copy_in(torch.tensor([value], dtype=dtype)).ptr


def clone(lists):
    return [[t.clone() for t in lst] for lst in lists]


def assert_same(got_lists, exp_lists):
    for got, exp in zip(got_lists, exp_lists):
        for a, b in zip(got, exp):
            assert torch.equal(bits(a), bits(b))


def assert_close(got_lists, exp_lists):
    for got, exp in zip(got_lists, exp_lists):
        for a, b in zip(got, exp):
            tol = dict(rtol=2e-2, atol=1e-5) if a.dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a, b, **tol)


def test_layout_is_the_one_python_reads(emu):
    from eman_fused.ops import layout
    assert emu.layout("optim_entry_words") == layout.OPTIM["entry_words"]
    assert emu.layout("chunk_words") == layout.OPTIM["chunk_words"]
    assert emu.layout("optim_chunk_elems") == layout.OPTIM["chunk_elems"]


# momentum, dampening, nesterov, weight_decay, maximize
SGD_OPTIONS = [(0.0, 0.0, False, 0.0, False), (0.9, 0.0, False, 0.0, False),
               (0.9, 0.0, True, 1e-3, False), (0.8, 0.1, False, 5e-4, True)]


def sgd(emu, dtype, teacher_dtype, opts, offset=0, capturable=False, seed=0):
    momentum, dampening, nesterov, wd, maximize = opts
    params, grads, st, teacher = make(dtype, teacher_dtype, 1 if momentum else 0, seed=seed)
    bufs = st[0] if momentum else []
    first = [i % 2 for i in range(len(params))] if momentum else [0] * len(params)
    lr, tm = 0.1, 0.99
    lists = [params, grads, bufs, teacher]
    exp = clone(lists)
    if capturable:
        ops.sgd_ema_step_.capturable(*exp, first, torch.tensor(lr), momentum, dampening, nesterov, wd,
                                     maximize, torch.tensor(tm))
    else:
        ops.sgd_ema_step_(*exp, first, lr, momentum, dampening, nesterov, wd, maximize, tm)
    e = Emulated(emu, lists, offset).table(ops._sgd_ema_table, first, lr, momentum, dampening,
                                           nesterov, wd, maximize, tm)
    lr_ptr = e.scalar(lr) if capturable else None
    tm_ptr = e.scalar(tm) if capturable else None
    emu.check(emu.lib.emu_sgd(e.entries, e.chunks, e.num_chunks, emu.tag(dtype),
                              emu.tag(teacher_dtype), 0.0 if capturable else lr, momentum,
                              dampening, wd, -1.0 if maximize else 1.0, 0.0 if capturable else tm,
                              int(nesterov), lr_ptr, tm_ptr))
    return e.lists, exp


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES, ids=name)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=name)
def test_sgd_every_dtype_pair(emu, dtype, teacher_dtype):
    assert_same(*sgd(emu, dtype, teacher_dtype, SGD_OPTIONS[2]))


@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=str)
@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_sgd_every_option(emu, opts, capturable):
    assert_same(*sgd(emu, torch.float32, torch.bfloat16, opts, capturable=capturable))


def test_sgd_misaligned_and_thread_orders(emu, order):
    assert_same(*sgd(emu, torch.bfloat16, torch.float32, SGD_OPTIONS[3], offset=1, seed=3))


# beta1, beta2, weight_decay, amsgrad, maximize (beta1 0.3: the other of the two lerp forms)
ADAMW_OPTIONS = [(0.9, 0.999, 0.0, False, False), (0.9, 0.999, 1e-2, True, False),
                 (0.3, 0.99, 1e-2, False, True), (0.9, 0.95, 0.1, True, True)]


def adamw(emu, dtype, teacher_dtype, opts, offset=0, capturable=False, seed=0):
    beta1, beta2, wd, amsgrad, maximize = opts
    params, grads, st, teacher = make(dtype, teacher_dtype, 3 if amsgrad else 2, seed=seed)
    m, v = st[0], st[1]
    vmax = st[2] if amsgrad else []
    lr, eps, tm = 1e-2, 1e-8, 0.999
    steps = [float(1 + 3 * i) for i in range(len(params))]
    step_sizes = [lr / (1 - beta1 ** k) for k in steps]
    bc2 = [math.sqrt(1 - beta2 ** k) for k in steps]
    lists = [params, grads, m, v, vmax, teacher]
    exp = clone(lists)
    if capturable:
        ops.adamw_ema_step_.capturable(*exp[:5], exp[5], [torch.tensor(k) for k in steps],
                                       torch.tensor(lr), beta1, beta2, eps, wd, amsgrad, maximize,
                                       torch.tensor(tm))
    else:
        ops.adamw_ema_step_(*exp, step_sizes, bc2, lr, beta1, beta2, eps, wd, amsgrad, maximize, tm)
    ones = [1.0] * len(params)
    e = Emulated(emu, lists, offset).table(ops._adamw_ema_table, ones if capturable else step_sizes,
                                           ones if capturable else bc2, 0.0 if capturable else lr,
                                           beta1, beta2, eps, wd, amsgrad, maximize, tm)
    lr_ptr = tm_ptr = None
    if capturable:
        lr_ptr, tm_ptr = e.scalar(lr), e.scalar(tm)
        for i, k in enumerate(steps):
            emu.lib.emu_optim_set_step(e.entries, i, e.scalar(k))
    emu.check(emu.lib.emu_adamw(e.entries, e.chunks, e.num_chunks, emu.tag(dtype),
                                emu.tag(teacher_dtype), 0.0 if capturable else lr, beta1, beta2,
                                eps, wd, -1.0 if maximize else 1.0, 0.0 if capturable else tm,
                                lr_ptr, tm_ptr))
    return e.lists, exp


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES, ids=name)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=name)
def test_adamw_every_dtype_pair(emu, dtype, teacher_dtype):
    assert_same(*adamw(emu, dtype, teacher_dtype, ADAMW_OPTIONS[1]))


@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=str)
def test_adamw_every_option(emu, opts):
    assert_same(*adamw(emu, torch.float32, torch.float16, opts))


@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=str)
def test_adamw_capturable_step_counts_on_the_device(emu, opts):
    # the kernel forms the bias corrections from the float32 step count and the exact betas in
    # double, as the CPU's capturable path does: the same bits
    assert_same(*adamw(emu, torch.float32, torch.float32, opts, capturable=True))


def test_adamw_misaligned_and_thread_orders(emu, order):
    assert_same(*adamw(emu, torch.float16, torch.bfloat16, ADAMW_OPTIONS[3], offset=1, seed=4))


# momentum, weight_decay, trust_coefficient, maximize
LARS_OPTIONS = [(0.9, 1e-4, 1e-3, False), (0.0, 0.0, 0.02, False), (0.9, 5e-3, 1e-3, True)]


def lars(emu, dtype, teacher_dtype, opts, offset=0, capturable=False, seed=0, sizes=SIZES):
    momentum, wd, trust, maximize = opts
    params, grads, (bufs,), teacher = make(dtype, teacher_dtype, 1, sizes=sizes, seed=seed)
    adapt = [int(i % 3 != 1) for i in range(len(params))]  # biases / norms: no adaptation
    first = [int(i % 2 == 0) for i in range(len(params))]
    if len(params) > 1:  # a tensor whose gradient is zero: trust ratio 1
        grads[1].zero_()
    lr, tm = 0.5, 0.99
    lists = [params, grads, bufs, teacher]
    exp = clone(lists)
    if capturable:
        ops.lars_ema_step_.capturable(*exp, adapt, first, torch.tensor(lr), momentum, wd, trust,
                                      maximize, torch.tensor(tm))
    else:
        ops.lars_ema_step_(*exp, adapt, first, lr, momentum, wd, trust, maximize, tm)
    e = Emulated(emu, lists, offset).table(ops._lars_ema_table, adapt, first,
                                           0.0 if capturable else lr, momentum, wd, trust, maximize,
                                           0.0 if capturable else tm)
    partials = emu.buffer(2 * max(1, e.num_chunks), torch.float64)
    lr_ptr = e.scalar(lr) if capturable else None
    tm_ptr = e.scalar(tm) if capturable else None
    emu.check(emu.lib.emu_lars(e.entries, e.chunks, e.num_chunks, emu.tag(dtype),
                               emu.tag(teacher_dtype), 0.0 if capturable else lr, momentum, wd,
                               trust, -1.0 if maximize else 1.0, 0.0 if capturable else tm, lr_ptr,
                               tm_ptr, partials.ptr))
    return e.lists, exp


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES, ids=name)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=name)
def test_lars_every_dtype_pair(emu, dtype, teacher_dtype):
    assert_close(*lars(emu, dtype, teacher_dtype, LARS_OPTIONS[0]))


@pytest.mark.parametrize("opts", LARS_OPTIONS, ids=str)
@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_lars_every_option(emu, opts, capturable):
    assert_close(*lars(emu, torch.float32, torch.float32, opts, capturable=capturable))


def test_lars_thread_orders_give_the_same_bits(emu, order):
    """The norms are block sums in a fixed tree: any thread order gives the same bits."""
    got, exp = lars(emu, torch.float32, torch.bfloat16, LARS_OPTIONS[2], offset=1, seed=5)
    assert_close(got, exp)
    emu.set_order("sequential")
    again, _ = lars(emu, torch.float32, torch.bfloat16, LARS_OPTIONS[2], offset=1, seed=5)
    assert_same(got, again)


@pytest.mark.parametrize("kernel", ["emu_sgd", "emu_adamw", "emu_lars"])
def test_bad_launches_are_refused(emu, kernel):
    fn = getattr(emu.lib, kernel)

    def call(num_chunks, ptag, ttag):
        # (entries, chunks, num_chunks, param_tag, teacher_tag, floats..., [nesterov,] pointers...):
        # null tables, zero scalars; the launcher refuses before reading any of them
        args = [None, None, num_chunks, ptag, ttag]
        for t in fn.argtypes[5:]:
            args.append(None if t is ctypes.c_void_p else 0 if t is ctypes.c_int else 0.0)
        return emu.lib.emu_error_name(fn(*args)).decode()
    f32, f64 = emu.tag(torch.float32), emu.tag(torch.float64)
    assert call(0, f32, f32) == "cudaSuccess"  # nothing to do: no launch
    assert call(2**31, f32, f32) == "cudaErrorInvalidConfiguration"
    assert call(1, f64, f32) == "cudaErrorInvalidValue"  # float64 params: no kernel
    assert call(1, f32, 7) == "cudaErrorInvalidValue"  # unknown teacher tag
