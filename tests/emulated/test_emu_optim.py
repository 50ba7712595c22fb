"""The CUDA fused optimizer kernels (momentum_kernel for SGD and both LARS formulas, adamw_kernel,
lars_norms_kernel) on the CPU emulator, launched through the one launcher of the step op
(launch_optim_ema), against eman_fused's CPU kernels (torch.ops.eman_fused.optim_ema_step_) on
the same tables (built by the C++ table op, _optim_ema_table): every param dtype with every
teacher dtype (or none), tensors of 0, 1, 3, 4097 elements and several chunks, misaligned
pointers, every option of each optimizer, the teacher at momentum 1 (untouched) and 0 (a copy),
hyper-parameters as device scalars (capturable) and AdamW's device step counts, several thread
orders. SGD and AdamW do the CPU kernels' float32 operations in the same order (optim/math.h is
shared): bit for bit; LARS sums its norms in another order: to float32 rounding."""
import ctypes

import pytest
import torch

from eman_fused.ops import layout
from eman_fused.ops import optim as optim_ops

from conftest import bits

pytestmark = pytest.mark.emulated
COVERS = {"momentum_kernel", "adamw_kernel", "lars_norms_kernel"}
ops = torch.ops.eman_fused
FIRST = layout.OPTIM["flag_first"]
ADAPT = layout.OPTIM["flag_adapt"]

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


def step(emu, optimizer, dtype, teacher_dtype, lists, flags, values, steps=(), device=(),
         device_steps=False, offset=0):
    """One step of `optimizer` ('sgd', 'adamw', 'lars_simclr', 'lars_you2017') on `lists`
    ([params, grads, first_moments, second_moments, max_second_moments, teacher]) twice: by the
    CPU op on copies (the expected values) and by the emulated CUDA kernels on guarded copies
    built from the same table. `values`: the hyper-parameters by name; `device`: names given as
    float32 device scalars (the kernel reads them; its host value is a placeholder);
    `steps`: AdamW's step counts so far, read from the table or (device_steps) by the kernel.
    Returns (emulated lists, expected lists)."""
    oid = optim_ops.optimizer_id(optimizer)
    names = optim_ops.hyper_names(optimizer)
    hyper = optim_ops.hyper(optimizer, **values)
    tensors = [torch.tensor(values[n], dtype=torch.float32) if n in device else None for n in names]
    tensors = tensors if device else []
    exp = clone(lists)
    ops.optim_ema_step_(oid, *exp, flags, [torch.tensor(float(k)) for k in steps], hyper, tensors)

    got = [[emu.copy_in(t, offset=offset * t.element_size()).tensor for t in lst] for lst in lists]
    table = ops._optim_ema_table(oid, *got, flags, [torch.tensor(float(k)) for k in steps], hyper,
                                 tensors)
    n = len(got[0])
    ew, cw = emu.layout("optim_entry_words"), emu.layout("chunk_words")
    num_chunks = (table.numel() - n * ew - emu.layout("optim_scalar_words")) // cw
    buf = emu.copy_in(table)
    entries, chunks = buf.ptr, buf.ptr + 8 * n * ew
    if device_steps:
        for i, k in enumerate(steps):
            emu.lib.emu_optim_set_step(entries, i, emu.copy_in(torch.tensor([float(k)])).ptr)
    dev = None
    if device:
        dev = (ctypes.c_void_p * len(names))(*[
            emu.copy_in(t.reshape(1)).ptr if t is not None else None for t in tensors])
    # a placeholder where the kernel must read the device value instead
    host = (ctypes.c_double * len(names))(*[0.25 if k in device else v for k, v in zip(names, hyper)])
    partials = emu.buffer(2 * max(1, num_chunks), torch.float64)
    emu.check(emu.lib.emu_optim(oid, entries, chunks, num_chunks, emu.tag(dtype), emu.tag(teacher_dtype),
                                host, dev, len(names), partials.ptr))
    return got, exp


def test_layout_is_the_one_python_reads(emu):
    assert emu.layout("optim_entry_words") == layout.OPTIM["entry_words"]
    assert emu.layout("chunk_words") == layout.OPTIM["chunk_words"]
    assert emu.layout("optim_chunk_elems") == layout.OPTIM["chunk_elems"]
    assert emu.layout("optim_scalar_words") == layout.OPTIM["scalar_words"]
    assert emu.layout("optim_max_hyper") >= max(len(v) for v in layout.OPTIM["hyper"].values())


# momentum, dampening, nesterov, weight_decay, maximize
SGD_OPTIONS = [(0.0, 0.0, False, 0.0, False), (0.9, 0.0, False, 0.0, False),
               (0.9, 0.0, True, 1e-3, False), (0.8, 0.1, False, 5e-4, True)]


def sgd(emu, dtype, teacher_dtype, opts, offset=0, device=(), seed=0, teacher_momentum=0.99):
    momentum, dampening, nesterov, wd, maximize = opts
    params, grads, st, teacher = make(dtype, teacher_dtype, 1 if momentum else 0, seed=seed)
    bufs = st[0] if momentum else []
    flags = [FIRST * (i % 2) for i in range(len(params))] if momentum else [0] * len(params)
    values = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                  maximize=maximize, teacher_momentum=teacher_momentum)
    return step(emu, "sgd", dtype, teacher_dtype, [params, grads, bufs, [], [], teacher], flags,
                values, device=device, offset=offset)


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES, ids=name)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=name)
def test_sgd_every_dtype_pair(emu, dtype, teacher_dtype):
    assert_same(*sgd(emu, dtype, teacher_dtype, SGD_OPTIONS[2]))


@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=str)
# (momentum stays a host value: a device momentum takes buffers, even where it is 0)
@pytest.mark.parametrize("device", [(), ("lr", "dampening", "weight_decay", "teacher_momentum")],
                         ids=["host", "device_scalars"])
def test_sgd_every_option(emu, opts, device):
    assert_same(*sgd(emu, torch.float32, torch.bfloat16, opts, device=device))


@pytest.mark.parametrize("teacher_momentum", [0.0, 1.0], ids=["copy_at_0", "untouched_at_1"])
@pytest.mark.parametrize("device", [(), ("teacher_momentum",)], ids=["host", "device_scalar"])
def test_the_teacher_at_momentum_0_and_1(emu, teacher_momentum, device):
    got, exp = sgd(emu, torch.float32, torch.float16, SGD_OPTIONS[1], device=device,
                   teacher_momentum=teacher_momentum)
    assert_same(got, exp)
    params, teacher = got[0], got[5]
    if teacher_momentum == 0.0:  # the param as stored, in the teacher's dtype
        assert all(torch.equal(t, p.to(t.dtype)) for t, p in zip(teacher, params))
    else:  # bit-identical to before the step
        _, _, _, before = make(torch.float32, torch.float16, 1)
        assert_same([teacher], [before])


def test_sgd_misaligned_and_thread_orders(emu, order):
    assert_same(*sgd(emu, torch.bfloat16, torch.float32, SGD_OPTIONS[3], offset=1, seed=3))


# beta1, beta2, weight_decay, amsgrad, maximize (beta1 0.3: the other of the two lerp forms)
ADAMW_OPTIONS = [(0.9, 0.999, 0.0, False, False), (0.9, 0.999, 1e-2, True, False),
                 (0.3, 0.99, 1e-2, False, True), (0.9, 0.95, 0.1, True, True)]


def adamw(emu, dtype, teacher_dtype, opts, offset=0, capturable=False, seed=0):
    beta1, beta2, wd, amsgrad, maximize = opts
    params, grads, st, teacher = make(dtype, teacher_dtype, 3 if amsgrad else 2, seed=seed)
    vmax = st[2] if amsgrad else []
    values = dict(lr=1e-2, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=wd, amsgrad=amsgrad,
                  maximize=maximize, teacher_momentum=0.999)
    steps = [3 * i for i in range(len(params))]  # the steps taken so far (this one is + 1)
    device = ("lr", "beta1", "beta2", "teacher_momentum") if capturable else ()
    return step(emu, "adamw", dtype, teacher_dtype, [params, grads, st[0], st[1], vmax, teacher], [],
                values, steps=steps, device=device, device_steps=capturable, offset=offset)


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES, ids=name)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=name)
def test_adamw_every_dtype_pair(emu, dtype, teacher_dtype):
    assert_same(*adamw(emu, dtype, teacher_dtype, ADAMW_OPTIONS[1]))


@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=str)
def test_adamw_every_option(emu, opts):
    assert_same(*adamw(emu, torch.float32, torch.float16, opts))


@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=str)
def test_adamw_capturable_step_counts_and_scalars_on_the_device(emu, opts):
    # the kernel forms the bias corrections from the float32 step count + 1 and the betas in
    # double (optim/math.h), as the table does for host counts: the same bits
    assert_same(*adamw(emu, torch.float32, torch.float32, opts, capturable=True))


def test_adamw_misaligned_and_thread_orders(emu, order):
    assert_same(*adamw(emu, torch.float16, torch.bfloat16, ADAMW_OPTIONS[3], offset=1, seed=4))


# formula, momentum, dampening, nesterov, weight_decay, trust_coefficient, maximize
LARS_OPTIONS = [("simclr", 0.9, 0.0, False, 1e-4, 1e-3, False),
                ("simclr", 0.0, 0.0, False, 0.0, 0.02, False),
                ("simclr", 0.9, 0.0, False, 5e-3, 1e-3, True),
                ("you2017", 0.9, 0.0, False, 1e-4, 1e-3, False),
                ("you2017", 0.9, 0.1, False, 5e-4, 2e-2, True),
                ("you2017", 0.9, 0.0, True, 1e-3, 1e-3, False),
                ("you2017", 0.0, 0.0, False, 1e-4, 1e-3, False)]


def lars(emu, dtype, teacher_dtype, opts, offset=0, device=(), seed=0, sizes=SIZES):
    formula, momentum, dampening, nesterov, wd, trust, maximize = opts
    has_buf = formula == "simclr" or momentum != 0
    params, grads, st, teacher = make(dtype, teacher_dtype, 1, sizes=sizes, seed=seed)
    bufs = st[0] if has_buf else []
    # biases / norms (every third tensor): no trust ratio; half the buffers are new
    flags = [(ADAPT if i % 3 != 1 else 0) | (FIRST if i % 2 == 0 and has_buf else 0)
             for i in range(len(params))]
    if len(params) > 1:  # a tensor whose gradient is zero: simclr's trust ratio 1
        grads[1].zero_()
    if len(params) > 2:  # an adapted tensor whose param is zero: you2017's local lr 0
        params[2].zero_()
    values = dict(lr=0.5, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                  trust_coefficient=trust, maximize=maximize, teacher_momentum=0.99)
    return step(emu, f"lars_{formula}", dtype, teacher_dtype, [params, grads, bufs, [], [], teacher],
                flags, values, device=device, offset=offset)


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES, ids=name)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=name)
def test_lars_every_dtype_pair(emu, dtype, teacher_dtype):
    assert_close(*lars(emu, dtype, teacher_dtype, LARS_OPTIONS[0]))
    assert_close(*lars(emu, dtype, teacher_dtype, LARS_OPTIONS[3]))


@pytest.mark.parametrize("opts", LARS_OPTIONS, ids=str)
@pytest.mark.parametrize("device", [(), ("lr", "weight_decay", "trust_coefficient", "teacher_momentum")],
                         ids=["host", "device_scalars"])
def test_lars_every_option(emu, opts, device):
    assert_close(*lars(emu, torch.float32, torch.float32, opts, device=device))


@pytest.mark.parametrize("formula", [0, 4], ids=["simclr", "you2017"])
def test_lars_thread_orders_give_the_same_bits(emu, order, formula):
    """The norms are block sums in a fixed tree: any thread order gives the same bits."""
    got, exp = lars(emu, torch.float32, torch.bfloat16, LARS_OPTIONS[formula], offset=1, seed=5)
    assert_close(got, exp)
    emu.set_order("sequential")
    again, _ = lars(emu, torch.float32, torch.bfloat16, LARS_OPTIONS[formula], offset=1, seed=5)
    assert_same(got, again)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars_simclr", "lars_you2017"])
def test_bad_launches_are_refused(emu, optimizer):
    oid = optim_ops.optimizer_id(optimizer)
    count = len(optim_ops.hyper_names(optimizer))
    zeros = (ctypes.c_double * count)()

    def call(num_chunks, ptag, ttag):
        # null tables, zero hyper-parameters: the launcher refuses before reading any of them
        return emu.lib.emu_error_name(
            emu.lib.emu_optim(oid, None, None, num_chunks, ptag, ttag, zeros, None, count, None)).decode()
    f32, f64 = emu.tag(torch.float32), emu.tag(torch.float64)
    assert call(0, f32, f32) == "cudaSuccess"  # nothing to do: no launch
    assert call(2**31, f32, f32) == "cudaErrorInvalidConfiguration"
    assert call(1, f64, f32) == "cudaErrorInvalidValue"  # float64 params: no kernel
    assert call(1, f32, 7) == "cudaErrorInvalidValue"  # unknown teacher tag
