"""Triton backend of the fused optimizer step (SGD, AdamW, both LARS formulas + EMA teacher): one
launch per call over the whole param list (LARS: two), driven by the table the C++ kernels read
(csrc/optim/layout.h), built and validated by the same C++ code (`_optim_ema_table`) before
anything is written, staged through pinned host memory and copied to the GPU without blocking.

Program p handles chunk p: it reads (tensor, start) from the chunk table, the tensor's entry
(param, grad, state and teacher addresses, numel, flags, AdamW's bias corrections) at the field
offsets C++ exports (`_C.table_layout()`), casts the int64 addresses to typed pointers and walks
the chunk in BLOCK-element steps. The call's scalars (1 - beta2, 1 - lr*wd, the teacher's
weights, ...) are read from the table's scalar block, formed once in C++ (csrc/optim/math.h):
double formulas rounded once to float32, the same values the C++ kernels use. The element math
is csrc/optim/math.h's in the same order, in float32, with IEEE-rounded sqrt and division;
params, state and teacher are rounded once per store. The teacher: ema_update_'s lerp (one
helper with the EMA kernel), untouched at momentum 1, a copy at momentum 0.

LARS takes two launches, as the C++ kernels take two passes: per-chunk sums of squares into a
float64 buffer, then the update, each chunk summing its tensor's chunk sums in chunk order.
Its norms are summed in another order than the C++ kernels' (float32 blocks of BLOCK elements
added into float64), so its per-tensor factors agree with theirs to float32 rounding, not bit
for bit. Not built here: capturable calls (hyper-parameters or step counts read from device
tensors); those run on the CPU and CUDA C++ kernels.
Tuning: BLOCK=1024 elements, 4 warps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.layout import OPTIM, optim_counts
from ._common import ema_lerp, launch, round_to

BLOCK = 1024
NUM_WARPS = 4
# csrc/optim/layout.h, as the C++ structs define it.
OPTIM_CHUNK_ELEMS = OPTIM["chunk_elems"]
OPTIM_ENTRY_WORDS = OPTIM["entry_words"]
OPTIM_CHUNK_WORDS = OPTIM["chunk_words"]
OPTIM_FIRST = OPTIM["flag_first"]
OPTIM_ADAPT = OPTIM["flag_adapt"]
_F = OPTIM["fields"]
F_PARAM = tl.constexpr(_F["param"])
F_GRAD = tl.constexpr(_F["grad"])
F_FIRST_MOMENT = tl.constexpr(_F["first_moment"])
F_SECOND_MOMENT = tl.constexpr(_F["second_moment"])
F_MAX_SECOND_MOMENT = tl.constexpr(_F["max_second_moment"])
F_TEACHER = tl.constexpr(_F["teacher"])
F_NUMEL = tl.constexpr(_F["numel"])
F_FIRST_CHUNK = tl.constexpr(_F["first_chunk"])
F_NUM_CHUNKS = tl.constexpr(_F["num_chunks"])
F_FLAGS = tl.constexpr(_F["flags"])
F_BIAS_CORRECTION1 = tl.constexpr(_F["bias_correction1"])
F_BIAS_CORRECTION2_SQRT = tl.constexpr(_F["bias_correction2_sqrt"])
C_TENSOR = tl.constexpr(OPTIM["chunk_fields"]["tensor"])
C_START = tl.constexpr(OPTIM["chunk_fields"]["start"])
FLAG_FIRST = tl.constexpr(OPTIM_FIRST)
FLAG_ADAPT = tl.constexpr(OPTIM_ADAPT)
_SCALARS = OPTIM["scalars"]  # per optimizer: scalar name -> word offset in the scalar block
_IDS = OPTIM["optimizers"]
_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# The teacher: 0 none (absent, or momentum 1: untouched), 1 copy (momentum 0), 2 lerp.
_TEACHER_NONE, _TEACHER_COPY, _TEACHER_LERP = 0, 1, 2


@triton.jit
def _chunk_entry(table, num_entries, ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr):
    chunk = table + num_entries * ENTRY_WORDS + tl.program_id(0).to(tl.int64) * CHUNK_WORDS
    entry = table + tl.load(chunk + C_TENSOR) * ENTRY_WORDS
    return entry, tl.load(chunk + C_START)


@triton.jit
def _double(word_ptr):
    """A table word holding a double."""
    return tl.load(word_ptr).to(tl.float64, bitcast=True)


@triton.jit
def _f32(x):
    # The scalar block's float32 values are held in doubles: exact.
    return x.to(tl.float32, fp_downcast_rounding="rtne")


@triton.jit
def _teacher_update(t_addr, idx, mask, stored, wt, vt, TT: tl.constexpr, COPY: tl.constexpr):
    t_ptr = t_addr.to(tl.pointer_type(TT))
    s = stored.to(tl.float32)
    if COPY:  # momentum 0: the param itself (a NaN teacher is replaced), as ema_update_
        out = s
    else:
        out = ema_lerp(tl.load(t_ptr + idx, mask=mask).to(tl.float32), s, wt, vt)
    tl.store(t_ptr + idx, round_to(out, TT), mask=mask)


@triton.jit
def _momentum_kernel(table, num_entries, scalars_at, partial,
                     PT: tl.constexpr, TT: tl.constexpr, TEACHER: tl.constexpr, DECAY: tl.constexpr,
                     LARS: tl.constexpr, HAS_BUF: tl.constexpr, NESTEROV: tl.constexpr,
                     S_TEACHER_W: tl.constexpr, S_TEACHER_V: tl.constexpr, S_LR: tl.constexpr,
                     S_MOMENTUM: tl.constexpr, S_DAMPENING_WEIGHT: tl.constexpr,
                     S_WEIGHT_DECAY: tl.constexpr, S_SIGN: tl.constexpr,
                     S_TRUST_COEFFICIENT: tl.constexpr, S_WEIGHT_DECAY_D: tl.constexpr,
                     S_LR_D: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                     ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr):
    """SGD (LARS=0) and LARS (1 simclr, 2 you2017; pass 2): csrc/optim/math.h's momentum_update.
    DECAY: 0 never, 1 always, 2 adapted tensors only (simclr)."""
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    scal = table + scalars_at
    p_ptr = tl.load(entry + F_PARAM).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + F_GRAD).to(tl.pointer_type(PT))
    b_ptr = tl.load(entry + F_FIRST_MOMENT).to(tl.pointer_type(PT))
    t_addr = tl.load(entry + F_TEACHER)
    numel = tl.load(entry + F_NUMEL)
    flags = tl.load(entry + F_FLAGS)
    first_flag = flags & FLAG_FIRST
    first = first_flag != 0
    adapt = (flags & FLAG_ADAPT) != 0
    lr = _f32(_double(scal + S_LR))
    mom = _f32(_double(scal + S_MOMENTUM))
    damp = _f32(_double(scal + S_DAMPENING_WEIGHT))
    wd = _f32(_double(scal + S_WEIGHT_DECAY))
    sign = _f32(_double(scal + S_SIGN))
    wt = _f32(_double(scal + S_TEACHER_W))
    vt = _f32(_double(scal + S_TEACHER_V))
    factor = tl.full((), 1.0, tl.float32)
    if LARS != 0:  # the tensor's factor from pass 1's chunk sums, in chunk order, in float64
        first_chunk = tl.load(entry + F_FIRST_CHUNK)
        num_chunks = tl.load(entry + F_NUM_CHUNKS)
        p2 = tl.zeros((), dtype=tl.float64)
        n2 = tl.zeros((), dtype=tl.float64)
        for c in range(first_chunk, first_chunk + num_chunks):
            p2 += tl.load(partial + 2 * c)
            n2 += tl.load(partial + 2 * c + 1)
        pn = tl.sqrt(p2)  # float64: sqrt and division are IEEE-rounded (the _rn forms are float32-only)
        nn = tl.sqrt(n2)
        tc = _double(scal + S_TRUST_COEFFICIENT)
        if LARS == 1:  # trust_coefficient*|p|/|g + wd p| (1 if a norm is 0, or not adapted)
            ok = adapt & (pn > 0.0) & (nn > 0.0)
            f64 = tl.where(ok, tc * pn / tl.where(ok, nn, 1.0), 1.0)
        else:  # lr * trust_coefficient*|p| / (|g| + wd |p|) (0 if |p| or that is 0); lr if excluded
            lr_d = _double(scal + S_LR_D)
            den = nn + _double(scal + S_WEIGHT_DECAY_D) * pn
            ok = (pn > 0.0) & (den > 0.0)
            local = tl.where(ok, tc * pn / tl.where(ok, den, 1.0), 0.0)
            f64 = tl.where(adapt, lr_d * local, lr_d)
        factor = _f32(f64)
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        pi = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
        d = sign * tl.load(g_ptr + idx, mask=mask).to(tl.float32)
        if DECAY == 1:
            d = d + wd * pi
        elif DECAY == 2:
            d = tl.where(adapt, d + wd * pi, d)
        d = d * factor
        if HAS_BUF:
            # The flag broadcast as an integer block before the comparison: Triton 3.9's
            # interpreter refuses a load mask made of a block and a 0-d bool.
            buf_exists = (tl.zeros_like(idx) + first_flag) == 0
            b = tl.load(b_ptr + idx, mask=mask & buf_exists).to(tl.float32)
            b = tl.where(first, d, mom * b + damp * d)  # a new buffer is the first update
            tl.store(b_ptr + idx, round_to(b, PT), mask=mask)
            if NESTEROV:
                d = d + mom * b
            else:
                d = b
        stored = round_to(pi - lr * d, PT)  # the teacher averages the param as stored
        tl.store(p_ptr + idx, stored, mask=mask)
        if TEACHER != 0:
            _teacher_update(t_addr, idx, mask, stored, wt, vt, TT, TEACHER == 1)


@triton.jit
def _adamw_kernel(table, num_entries, scalars_at,
                  PT: tl.constexpr, TT: tl.constexpr, TEACHER: tl.constexpr, AMSGRAD: tl.constexpr,
                  S_TEACHER_W: tl.constexpr, S_TEACHER_V: tl.constexpr, S_DECAY: tl.constexpr,
                  S_W1: tl.constexpr, S_W1C: tl.constexpr, S_BETA2: tl.constexpr, S_W2: tl.constexpr,
                  S_EPS: tl.constexpr, S_SIGN: tl.constexpr, S_LR: tl.constexpr,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr,
                  CHUNK_WORDS: tl.constexpr):
    """csrc/optim/math.h's adamw_update."""
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    scal = table + scalars_at
    p_ptr = tl.load(entry + F_PARAM).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + F_GRAD).to(tl.pointer_type(PT))
    m_ptr = tl.load(entry + F_FIRST_MOMENT).to(tl.pointer_type(PT))
    v_ptr = tl.load(entry + F_SECOND_MOMENT).to(tl.pointer_type(PT))
    vmax_ptr = tl.load(entry + F_MAX_SECOND_MOMENT).to(tl.pointer_type(PT))
    t_addr = tl.load(entry + F_TEACHER)
    numel = tl.load(entry + F_NUMEL)
    decay = _f32(_double(scal + S_DECAY))
    w1 = _f32(_double(scal + S_W1))
    w1c = _f32(_double(scal + S_W1C))
    b2 = _f32(_double(scal + S_BETA2))
    w2 = _f32(_double(scal + S_W2))
    eps = _f32(_double(scal + S_EPS))
    sign = _f32(_double(scal + S_SIGN))
    wt = _f32(_double(scal + S_TEACHER_W))
    vt = _f32(_double(scal + S_TEACHER_V))
    # torch's step size lr / (1 - beta1^step), formed in double and rounded once.
    step_size = _f32(_double(scal + S_LR) / _double(entry + F_BIAS_CORRECTION1))
    bc2_sqrt = _f32(_double(entry + F_BIAS_CORRECTION2_SQRT))
    small = tl.abs(w1) < 0.5  # torch's lerp: the form depends on the weight
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        gi = sign * tl.load(g_ptr + idx, mask=mask).to(tl.float32)
        pi = tl.load(p_ptr + idx, mask=mask).to(tl.float32) * decay
        m0 = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
        # torch's vectorized lerp: one fused multiply-add on g - m (formed in float64: the
        # product of two floats is exact there, then one rounding)
        dm = (gi - m0).to(tl.float64)
        mi = tl.where(small, w1.to(tl.float64) * dm + m0.to(tl.float64),
                      gi.to(tl.float64) - w1c.to(tl.float64) * dm).to(tl.float32, fp_downcast_rounding="rtne")
        vi = tl.load(v_ptr + idx, mask=mask).to(tl.float32) * b2 + w2 * gi * gi
        tl.store(m_ptr + idx, round_to(mi, PT), mask=mask)
        tl.store(v_ptr + idx, round_to(vi, PT), mask=mask)
        s = vi
        if AMSGRAD:
            v0 = tl.load(vmax_ptr + idx, mask=mask).to(tl.float32)
            s = tl.where(v0 > vi, v0, vi)
            tl.store(vmax_ptr + idx, round_to(s, PT), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(s), bc2_sqrt) + eps
        stored = round_to(pi - step_size * tl.div_rn(mi, denom), PT)
        tl.store(p_ptr + idx, stored, mask=mask)
        if TEACHER != 0:
            _teacher_update(t_addr, idx, mask, stored, wt, vt, TT, TEACHER == 1)


@triton.jit
def _lars_sumsq_kernel(table, num_entries, scalars_at, partial, PT: tl.constexpr,
                       S_SIGN: tl.constexpr, S_NORM_WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr):
    """Pass 1: this chunk's sums of p^2 and d^2 (d = sign*g + norm_weight_decay*p), float32 per
    block added into float64, written to partial[2k], partial[2k + 1] (0 for tensors not adapted)."""
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    scal = table + scalars_at
    k = tl.program_id(0).to(tl.int64)
    p_ptr = tl.load(entry + F_PARAM).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + F_GRAD).to(tl.pointer_type(PT))
    numel = tl.load(entry + F_NUMEL)
    adapt = (tl.load(entry + F_FLAGS) & FLAG_ADAPT) != 0
    sign = _f32(_double(scal + S_SIGN))
    nwd = _f32(_double(scal + S_NORM_WEIGHT_DECAY))
    sp = tl.zeros((), dtype=tl.float64)
    sd = tl.zeros((), dtype=tl.float64)
    if adapt:
        for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < numel
            pi = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            d = sign * tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) + nwd * pi
            sp += tl.sum(pi * pi, axis=0).to(tl.float64)
            sd += tl.sum(d * d, axis=0).to(tl.float64)
    tl.store(partial + 2 * k, sp)
    tl.store(partial + 2 * k + 1, sd)


def _teacher_mode(teacher, teacher_momentum: float) -> int:
    if not teacher or teacher_momentum == 1.0:
        return _TEACHER_NONE
    return _TEACHER_COPY if teacher_momentum == 0.0 else _TEACHER_LERP


def _offsets(kind: str, names) -> dict:
    """The scalar block's word offsets as the kernels' S_* constexprs."""
    return {f"S_{name.upper()}": _SCALARS[kind][name] for name in names}


def stage_table(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host table on the params' device. It was built in pinned memory for a GPU (the table
    op's `pinned`), so the copy does not block the host, as the CUDA C++ path's."""
    return table.to(device, non_blocking=True)


@torch.library.custom_op("eman_fused::optim_ema_step_triton_",
           mutates_args={"params", "first_moments", "second_moments", "max_second_moments",
                         "teacher", "steps"})
def optim_ema_step_triton_(optimizer: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                           first_moments: list[torch.Tensor], second_moments: list[torch.Tensor],
                           max_second_moments: list[torch.Tensor], teacher: list[torch.Tensor],
                           flags: list[int], steps: list[torch.Tensor], hyper: list[float]) -> None:
    """torch.ops.eman_fused.optim_ema_step_ (without device hyper-parameters) in Triton."""
    device = params[0].device if params else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # As the CUDA C++ step: its table is copied from the host at each step, and a graph
        # would replay the captured copy of a buffer that no longer holds this step's values.
        raise RuntimeError("optim_ema_step_triton_: a fused optimizer step on the Triton kernels cannot "
                           "be captured in a CUDA graph (its table is copied from the host at each step); "
                           "use the CUDA C++ kernels with capturable=True")
    table = torch.ops.eman_fused._optim_ema_table(
        optimizer, params, grads, first_moments, second_moments, max_second_moments, teacher, flags,
        steps, hyper, [], pinned=device.type == "cuda")
    num_chunks = optim_counts(params)[1]
    if num_chunks:
        _launch(optimizer, table, params, first_moments, max_second_moments, teacher, hyper, num_chunks)
    if steps:  # this step's bias corrections were read into the table; the counts advance
        torch._foreach_add_(steps, 1.0)


def _launch(optimizer, table, params, first_moments, max_second_moments, teacher, hyper, num_chunks):
    device = params[0].device
    table = stage_table(table, device)
    grid = (num_chunks,)
    pt = _DTYPES[params[0].dtype]
    tt = _DTYPES[teacher[0].dtype] if teacher else tl.float32
    names = OPTIM["hyper"]["adamw" if optimizer == _IDS["adamw"] else
                           "sgd" if optimizer == _IDS["sgd"] else "lars"]
    h = dict(zip(names, hyper))
    mode = _teacher_mode(teacher, h["teacher_momentum"])
    common = dict(BLOCK=BLOCK, CHUNK=OPTIM_CHUNK_ELEMS, ENTRY_WORDS=OPTIM_ENTRY_WORDS,
                  CHUNK_WORDS=OPTIM_CHUNK_WORDS, num_warps=NUM_WARPS)
    n = len(params)
    scalars_at = n * OPTIM_ENTRY_WORDS + num_chunks * OPTIM_CHUNK_WORDS
    if optimizer == _IDS["adamw"]:
        launch(_adamw_kernel, grid,
            table, n, scalars_at, PT=pt, TT=tt, TEACHER=mode, AMSGRAD=bool(max_second_moments),
            **_offsets("adamw", ("teacher_w", "teacher_v", "decay", "w1", "w1c", "beta2", "w2", "eps",
                                 "sign", "lr")), **common)
        return
    lars = 0 if optimizer == _IDS["sgd"] else 1 if optimizer == _IDS["lars_simclr"] else 2
    kind = "sgd" if lars == 0 else "lars"
    partial = table  # unused by SGD (any pointer)
    if lars:
        partial = torch.empty(2 * num_chunks, dtype=torch.float64, device=device)
        launch(_lars_sumsq_kernel, grid,
            table, n, scalars_at, partial, PT=pt, **_offsets("lars", ("sign", "norm_weight_decay")),
            **common)
    lars_only = ("trust_coefficient", "weight_decay_d", "lr_d")
    offsets = _offsets(kind, ("teacher_w", "teacher_v", "lr", "momentum", "dampening_weight",
                              "weight_decay", "sign") + (lars_only if lars else ()))
    offsets.update({f"S_{name.upper()}": 0 for name in lars_only if not lars})  # not read by SGD
    decay = (1 if h["weight_decay"] != 0.0 else 0) if lars == 0 else 2 if lars == 1 else 1
    launch(_momentum_kernel, grid,
        table, n, scalars_at, partial, PT=pt, TT=tt, TEACHER=mode, DECAY=decay, LARS=lars,
        HAS_BUF=bool(first_moments), NESTEROV=h["nesterov"] != 0.0, **offsets, **common)


@optim_ema_step_triton_.register_fake
def _(optimizer, params, grads, first_moments, second_moments, max_second_moments, teacher, flags,
      steps, hyper):
    # Written in place; the fake serves the Meta key too: a call mixing meta and real tensors
    # must fail, not pass silently.
    for name, tensors in (("grads", grads), ("first_moments", first_moments), ("second_moments", second_moments),
                          ("max_second_moments", max_second_moments), ("teacher", teacher)):
        for i, t in enumerate(tensors):
            if params and t.device != params[0].device:
                raise ValueError(f"optim_ema_step_: {name}[{i}] is on {t.device} but params[0] is on "
                                 f"{params[0].device}")
    return None
