// Element <-> math type for the CPU loops (EMA, norm, fused optimizers). The 16-bit types go
// through their bits with selects instead of branches, so loops that use them vectorize
// (c10::BFloat16's cast branches on NaN and keeps a loop scalar: 4-8x slower). Rounding is to
// nearest even, as torch's casts; a NaN becomes the quiet NaN torch's casts produce.
// Header-only: inlined into both the baseline and the AVX2 builds of each loop.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace eman_fused {

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

inline float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float v) {
  const uint32_t b = float_bits(v);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// For loops that must vectorize: the 16-bit types as their raw uint16_t storage (GCC does not
// vectorize loads and stores of the c10 structs: "more than one data ref"). raw(p) views an
// element pointer as its storage; get<T> / put<T> convert storage <-> float.
template <typename T>
struct Elem {  // float, double
  using raw = T;
  static T get(T v) { return v; }
  static T put(T v) { return v; }
};
template <>
struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  static float get(uint16_t v) { return bf16_to_float(v); }
  static uint16_t put(float v) { return float_to_bf16(v); }
};
template <>
struct Elem<c10::Half> {
  using raw = uint16_t;
  // c10's branch-free bit conversions (its casts add nothing else); they vectorize, if only
  // with -fno-trapping-math (setup.py). On the raw bits to avoid the struct copies.
  static float get(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static uint16_t put(float v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
};
template <>
struct Elem<void> {  // no tensor (an absent teacher)
  using raw = void;
};

template <typename T>
using raw_t = typename Elem<T>::raw;
template <typename T>
inline raw_t<T>* raw(T* p) {
  return reinterpret_cast<raw_t<T>*>(p);
}
template <typename T>
inline const raw_t<T>* raw(const T* p) {
  return reinterpret_cast<const raw_t<T>*>(p);
}
template <typename T>
inline auto get(raw_t<T> v) {  // float (double for double)
  return Elem<T>::get(v);
}
template <typename T, typename Acc>
inline raw_t<T> put(Acc v) {  // a double into a 16-bit type goes through float, as c10's casts
  return Elem<T>::put(v);
}

}  // namespace eman_fused
