// Portable SIMD vectors through GCC/Clang vector extensions, as wide as the target's registers: 64 bytes
// (one zmm) with AVX-512, 32 bytes (one ymm) otherwise. A 64-byte vector on an AVX2 target is legal C++
// but GCC lowers it badly: it crosses the AVX-512 ABI (passed through memory and general registers) and
// a tile of such accumulators needs twice the 16 ymm registers. Measured on a Zen 3 (AVX2): the FMA-chain
// loop of fma_peak.cpp ran at 7.4 GFLOP/s per thread with 64-byte vectors, against ~87 for MKL's GEMM.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cmk {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename T>
struct Simd {
  static constexpr int N = kVecBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVecBytes)));

  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // s - 0 is s for every s (-0 and NaN included), so GCC folds it to a plain broadcast; 0 + s is not
  // (it turns -0 into +0), and without fast-math it kept an add in front of the broadcast.
  static inline V broadcast(T s) { return s - V{}; }
  static inline T sum(V v) {
    T s = 0;
    for (int i = 0; i < N; ++i) s += v[i];
    return s;
  }
};

// One vector of acc_t from Simd<acc_t>::N values of type S, and back. bf16 <-> fp32 on whole vectors:
// a bf16 is the high half of an fp32, and the narrowing rounds to nearest even with NaN -> 0x7FC0,
// bit for bit as c10::BFloat16(float) does (its scalar form does not vectorize). Other pairs convert
// lane by lane.
template <typename acc_t, typename S>
inline typename Simd<acc_t>::V load_as(const S* p) {
  using Vec = Simd<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    return Vec::load(p);
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    typedef uint16_t H __attribute__((vector_size(kVecBytes / 2)));  // Simd<float>::N lanes
    typedef uint32_t U __attribute__((vector_size(kVecBytes)));
    H h;
    std::memcpy(&h, p, sizeof(H));
    const U u = __builtin_convertvector(h, U) << 16;
    typename Vec::V v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  } else {
    acc_t tmp[Vec::N];
    for (int i = 0; i < Vec::N; ++i) tmp[i] = static_cast<acc_t>(p[i]);
    return Vec::load(tmp);
  }
}

// Simd<float>::N fp32 lanes rounded to bf16 bits (nearest even; NaN -> 0x7FC0, as c10::BFloat16(float)).
typedef uint16_t Bf16Vec __attribute__((vector_size(kVecBytes / 2)));
inline Bf16Vec round_to_bf16(Simd<float>::V v) {
  typedef uint32_t U __attribute__((vector_size(kVecBytes)));
  U u;
  std::memcpy(&u, &v, sizeof(u));
  const U nan = reinterpret_cast<U>(v != v);
  const U r = ((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16 & ~nan) | (nan & 0x7FC0u);
  return __builtin_convertvector(r, Bf16Vec);
}

template <typename acc_t, typename S>
inline void store_as(S* p, typename Simd<acc_t>::V v) {
  using Vec = Simd<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    Vec::store(p, v);
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const Bf16Vec h = round_to_bf16(v);
    std::memcpy(p, &h, sizeof(h));
  } else {
    acc_t tmp[Vec::N];
    Vec::store(tmp, v);
    for (int i = 0; i < Vec::N; ++i) p[i] = static_cast<S>(tmp[i]);
  }
}

// bf16 pairs: a 32-bit lane holds two bf16 values, the low half first (as in memory). dot_bf16_pairs
// adds lo(a)*lo(b) + hi(a)*hi(b) to each fp32 lane of acc: one vdpbf16ps (products exact in fp32,
// fp32 sums; denormal inputs and results flushed to zero), twice the values per instruction of an fp32
// FMA. Only where the target has AVX512_BF16 (kHasBf16Dot); callers take fp32 FMAs elsewhere.
typedef uint32_t Bf16Pairs __attribute__((vector_size(kVecBytes)));
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
inline Simd<float>::V dot_bf16_pairs(Simd<float>::V acc, Bf16Pairs a, Bf16Pairs b) {
  return reinterpret_cast<Simd<float>::V>(
      _mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b)));
}
#else
constexpr bool kHasBf16Dot = false;
inline Simd<float>::V dot_bf16_pairs(Simd<float>::V acc, Bf16Pairs, Bf16Pairs) { return acc; }  // never called
#endif

// Two bf16 vectors interleaved into pairs: lane l = (lo[l], hi[l]).
inline Bf16Pairs make_bf16_pairs(Bf16Vec lo, Bf16Vec hi) {
  return __builtin_convertvector(lo, Bf16Pairs) | (__builtin_convertvector(hi, Bf16Pairs) << 16);
}

// The low bf16 of every pair, as fp32.
inline Simd<float>::V low_bf16_as_float(Bf16Pairs p) {
  const Bf16Pairs u = p << 16;
  Simd<float>::V v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

}  // namespace cpu
}  // namespace cmk
