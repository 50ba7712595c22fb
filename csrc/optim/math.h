// The fused optimizers' math, shared by the CPU loops (optim/cpu_loops.inc) and the CUDA kernels
// (optim/cuda.cu): the per-call scalars formed from the hyper-parameters, and the update of one
// element. eman_fused/triton/optim.py is the Triton twin of the element updates; it reads the
// scalars formed here from its table (optim/plan.cpp appends them). Torch-free.
//
// Precision: every scalar derived from hyper-parameters (1 - beta2, 1 - lr*wd, 1 - dampening,
// the teacher's 1 - m, ...) is formed in double and rounded once to float32, as torch.optim
// forms them from Python floats and its kernels round the scalar once; forming them in float32
// (1.0f - 0.999f) costs AdamW's second moment ~1e-5 relative error. The element math is float32
// in torch's order of operations.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/ema_lerp.h"

namespace eman_fused {

// Each optimizer's hyper-parameters, ONE list X(name, check) in the order of the step op's
// `hyper` argument (float[]); `check` names a HyperCheck (optim/hyper.h: how the value is
// checked before anything is written). A new hyper-parameter is one line here, its use below
// (shared by the CPU loops and the CUDA kernels), its use in eman_fused/triton/optim.py, and
// its default in the optimizer's constructor (eman_fused/optim.py): three files.
#define EMAN_FUSED_SGD_HYPER(X)                                                       \
  X(lr, kNonNegative) X(momentum, kNonNegative) X(dampening, kFinite)                 \
  X(weight_decay, kNonNegative) X(nesterov, kFlag) X(maximize, kFlag)                 \
  X(teacher_momentum, kUnit)
#define EMAN_FUSED_ADAMW_HYPER(X)                                                     \
  X(lr, kNonNegative) X(beta1, kBelowOne) X(beta2, kBelowOne) X(eps, kNonNegative)   \
  X(weight_decay, kNonNegative) X(amsgrad, kFlag) X(maximize, kFlag)                  \
  X(teacher_momentum, kUnit)
#define EMAN_FUSED_LARS_HYPER(X)                                                      \
  X(lr, kNonNegative) X(momentum, kNonNegative) X(dampening, kFinite)                 \
  X(weight_decay, kNonNegative) X(nesterov, kFlag) X(trust_coefficient, kNonNegative) \
  X(maximize, kFlag) X(teacher_momentum, kUnit)

#define EMAN_FUSED_HYPER_FIELD(name, check) double name;
struct SgdHyper { EMAN_FUSED_SGD_HYPER(EMAN_FUSED_HYPER_FIELD) };
struct AdamWHyper { EMAN_FUSED_ADAMW_HYPER(EMAN_FUSED_HYPER_FIELD) };
struct LarsHyper { EMAN_FUSED_LARS_HYPER(EMAN_FUSED_HYPER_FIELD) };
#undef EMAN_FUSED_HYPER_FIELD

// x rounded to float32 once, held in a double.
EMAN_FUSED_HD double to_f32(double x) { return static_cast<double>(static_cast<float>(x)); }

// The scalars of one call, one list per optimizer (X(name)): doubles, so that one table word
// carries each to Triton (optim/plan.cpp appends them to the table; _C.table_layout() exports
// their offsets). Each holds a float32 value, rounded once from its double formula, unless
// marked "double". Every list starts with the teacher's weights w = 1 - m and v = 1 - w
// (common/ema_lerp.h: ema_weights).
//   SGD:   lr, momentum, dampening_weight = 1 - dampening, weight_decay, sign (-1: maximize)
//   AdamW: decay = 1 - lr*weight_decay, w1 = 1 - beta1 (exp_avg's lerp weight), w1c = 1 - w1
//          in float32 (as torch's lerp forms it), beta2, w2 = 1 - beta2, eps, sign, lr (double:
//          the step sizes lr / (1 - beta1^step) are formed from it)
//   LARS:  lr (the multiplier of the direction: simclr lr, you2017 1, its lr being inside the
//          per-tensor factor), momentum, dampening_weight, weight_decay, norm_weight_decay (the
//          weight decay inside pass 1's second norm: simclr |g + wd p|, you2017 |g|, so 0), sign,
//          and in double for the per-tensor factor: trust_coefficient, weight_decay_d, lr_d
#define EMAN_FUSED_SGD_SCALARS(X) \
  X(teacher_w) X(teacher_v) X(lr) X(momentum) X(dampening_weight) X(weight_decay) X(sign)
#define EMAN_FUSED_ADAMW_SCALARS(X)                                                   \
  X(teacher_w) X(teacher_v) X(decay) X(w1) X(w1c) X(beta2) X(w2) X(eps) X(sign) X(lr)
#define EMAN_FUSED_LARS_SCALARS(X)                                                    \
  X(teacher_w) X(teacher_v) X(lr) X(momentum) X(dampening_weight) X(weight_decay)     \
  X(norm_weight_decay) X(sign) X(trust_coefficient) X(weight_decay_d) X(lr_d)

#define EMAN_FUSED_SCALAR_FIELD(name) double name;
struct SgdScalars { EMAN_FUSED_SGD_SCALARS(EMAN_FUSED_SCALAR_FIELD) };
struct AdamWScalars { EMAN_FUSED_ADAMW_SCALARS(EMAN_FUSED_SCALAR_FIELD) };
struct LarsScalars { EMAN_FUSED_LARS_SCALARS(EMAN_FUSED_SCALAR_FIELD) };
#undef EMAN_FUSED_SCALAR_FIELD

// Words of the scalar block appended to a table: the largest of the structs.
constexpr int64_t kOptimScalarWords = sizeof(LarsScalars) / sizeof(double);
static_assert(sizeof(SgdScalars) <= sizeof(LarsScalars) && sizeof(AdamWScalars) <= sizeof(LarsScalars),
              "kOptimScalarWords must hold every optimizer's scalars");

// The teacher's lerp weights (common/ema_lerp.h) as float32 values in doubles.
EMAN_FUSED_HD void set_teacher_weights(double teacher_momentum, double* w, double* v) {
  const EmaWeights<float> k = ema_weights<float>(teacher_momentum);
  *w = k.w, *v = k.v;
}

EMAN_FUSED_HD double sign_of(double maximize) { return maximize != 0.0 ? -1.0 : 1.0; }

EMAN_FUSED_HD SgdScalars sgd_scalars(const SgdHyper& h) {
  SgdScalars s;
  set_teacher_weights(h.teacher_momentum, &s.teacher_w, &s.teacher_v);
  s.lr = to_f32(h.lr);
  s.momentum = to_f32(h.momentum);
  s.dampening_weight = to_f32(1.0 - h.dampening);
  s.weight_decay = to_f32(h.weight_decay);
  s.sign = sign_of(h.maximize);
  return s;
}

EMAN_FUSED_HD AdamWScalars adamw_scalars(const AdamWHyper& h) {
  AdamWScalars s;
  const float w1 = static_cast<float>(1.0 - h.beta1);
  set_teacher_weights(h.teacher_momentum, &s.teacher_w, &s.teacher_v);
  s.decay = to_f32(1.0 - h.lr * h.weight_decay);
  s.w1 = w1;
  s.w1c = 1.0f - w1;
  s.beta2 = to_f32(h.beta2);
  s.w2 = to_f32(1.0 - h.beta2);
  s.eps = to_f32(h.eps);
  s.sign = sign_of(h.maximize);
  s.lr = h.lr;
  return s;
}

EMAN_FUSED_HD LarsScalars lars_scalars(const LarsHyper& h, bool you2017) {
  LarsScalars s;
  set_teacher_weights(h.teacher_momentum, &s.teacher_w, &s.teacher_v);
  s.lr = you2017 ? 1.0 : to_f32(h.lr);
  s.momentum = to_f32(h.momentum);
  s.dampening_weight = to_f32(1.0 - h.dampening);
  s.weight_decay = to_f32(h.weight_decay);
  s.norm_weight_decay = you2017 ? 0.0 : to_f32(h.weight_decay);
  s.sign = sign_of(h.maximize);
  s.trust_coefficient = h.trust_coefficient;
  s.weight_decay_d = h.weight_decay;
  s.lr_d = h.lr;
  return s;
}

// AdamW's bias corrections of step `step` (1 - beta1^step, sqrt(1 - beta2^step)), in double as
// torch computes them from Python floats.
EMAN_FUSED_HD void adamw_bias_corrections(double beta1, double beta2, double step, double* bc1,
                                          double* bc2_sqrt) {
  *bc1 = 1.0 - pow(beta1, step);
  *bc2_sqrt = sqrt(1.0 - pow(beta2, step));
}

// LARS's per-tensor factor of the direction, from pass 1's sums of squares (p2 = |p|^2,
// n2 = |sign*g + norm_weight_decay*p|^2), in double, rounded once.
//   simclr: trust_coefficient*|p|/|g + wd p| for adapted tensors (1 when a norm is 0); 1 else.
//   you2017: lr * local_lr, local_lr = trust_coefficient*|p| / (|g| + wd*|p|) for adapted
//   tensors (0 when |p| = 0, or when the denominator is 0: then g + wd*p = 0 and there is
//   nothing to scale), 1 for excluded ones.
EMAN_FUSED_HD float lars_factor(const LarsScalars& s, bool you2017, bool adapt, double p2, double n2) {
  const double pn = sqrt(p2), nn = sqrt(n2);
  if (!you2017) {
    return adapt && pn > 0.0 && nn > 0.0 ? static_cast<float>(s.trust_coefficient * pn / nn) : 1.0f;
  }
  if (!adapt) return static_cast<float>(s.lr_d);
  const double denom = nn + s.weight_decay_d * pn;
  const double local_lr = pn > 0.0 && denom > 0.0 ? s.trust_coefficient * pn / denom : 0.0;
  return static_cast<float>(s.lr_d * local_lr);
}

// The float32 values the element updates read, from a call's scalars.
template <typename Scalars>
EMAN_FUSED_HD EmaWeights<float> teacher_weights(const Scalars& s) {
  return {static_cast<float>(s.teacher_w), static_cast<float>(s.teacher_v)};
}
struct MomentumFloats {
  float lr, momentum, dampening_weight, weight_decay, sign;
};
struct AdamWFloats {
  float decay, w1, w1c, beta2, w2, eps, sign;
};
EMAN_FUSED_HD MomentumFloats momentum_floats(const SgdScalars& s) {
  return {static_cast<float>(s.lr), static_cast<float>(s.momentum),
          static_cast<float>(s.dampening_weight), static_cast<float>(s.weight_decay),
          static_cast<float>(s.sign)};
}
EMAN_FUSED_HD MomentumFloats momentum_floats(const LarsScalars& s) {
  return {static_cast<float>(s.lr), static_cast<float>(s.momentum),
          static_cast<float>(s.dampening_weight), static_cast<float>(s.weight_decay),
          static_cast<float>(s.sign)};
}
EMAN_FUSED_HD AdamWFloats adamw_floats(const AdamWScalars& s) {
  return {static_cast<float>(s.decay), static_cast<float>(s.w1), static_cast<float>(s.w1c),
          static_cast<float>(s.beta2), static_cast<float>(s.w2), static_cast<float>(s.eps),
          static_cast<float>(s.sign)};
}

// The momentum-SGD family's update of one element (SGD and both LARS formulas), in torch.optim.SGD's
// order: d = sign*g (+ weight_decay*p when `decay`), times the per-tensor `factor` (LARS; SGD: 1,
// exact); with a buffer: buf = d on its first step, else momentum*buf + dampening_weight*d, and
// d = nesterov ? d + momentum*buf : buf; the new param is p - lr*d.
struct MomentumOut {
  float param, buf;
};
EMAN_FUSED_HD MomentumOut momentum_update(float p, float g, float buf, MomentumFloats f, float factor,
                                          bool decay, bool has_buf, bool nesterov, bool first) {
  float d = f.sign * g;
  if (decay) d = d + f.weight_decay * p;
  d = d * factor;
  if (has_buf) {
    buf = first ? d : f.momentum * buf + f.dampening_weight * d;
    d = nesterov ? d + f.momentum * buf : buf;
  }
  return {p - f.lr * d, buf};
}

// LARS pass 1's term of the second norm: sign*g + norm_weight_decay*p.
EMAN_FUSED_HD float lars_norm_term(float p, float g, float sign, float norm_weight_decay) {
  return sign * g + norm_weight_decay * p;
}

// a*b + c rounded once, as a fused multiply-add: the product of two floats is exact in double,
// so one double sum and its rounding to float (the same bits on every CPU, CUDA and Triton;
// the baseline x86-64 CPU loops have no FMA instruction).
EMAN_FUSED_HD float fma_via_double(float a, float b, float c) {
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
}

// AdamW (torch.optim.AdamW's update, in its order of operations): p*(1 - lr*wd); exp_avg lerped
// toward g with weight w1 as torch's vectorized lerp does it, one fused multiply-add on g - m
// (small weight: m + w1*(g - m); else g - (1 - w1)*(g - m)); exp_avg_sq*beta2 + w2*g*g; amsgrad
// keeps the max; p - step_size * exp_avg / (sqrt(v) / bc2_sqrt + eps).
struct AdamWOut {
  float param, exp_avg, exp_avg_sq, max_exp_avg_sq;
};
EMAN_FUSED_HD AdamWOut adamw_update(float p, float g, float m, float v, float vmax, AdamWFloats f,
                                    float step_size, float bc2_sqrt, bool lerp_small, bool amsgrad) {
  const float gi = f.sign * g;
  const float pi = p * f.decay;
  const float d = gi - m;
  const float mi = lerp_small ? fma_via_double(f.w1, d, m) : fma_via_double(-f.w1c, d, gi);
  const float vi = v * f.beta2 + f.w2 * gi * gi;
  float s = vi;
  if (amsgrad) {
    vmax = vmax > vi ? vmax : vi;
    s = vmax;
  }
  return {pi - step_size * (mi / (sqrtf(s) / bc2_sqrt + f.eps)), mi, vi, vmax};
}

// torch's lerp uses the small-weight form below 0.5.
EMAN_FUSED_HD bool lerp_weight_small(float w) { return (w < 0.0f ? -w : w) < 0.5f; }

}  // namespace eman_fused
