// Portable 64-byte SIMD vectors through GCC/Clang vector extensions: AVX-512 registers where the
// target has them, pairs of AVX2 registers (or scalar code) elsewhere, from the same source.
#pragma once

#include <cstring>

namespace cmk {
namespace cpu {

template <typename T>
struct Simd {
  static constexpr int N = 64 / sizeof(T);
  typedef T V __attribute__((vector_size(64)));

  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline V broadcast(T s) {
    V v = {};
    return v + s;
  }
  static inline T sum(V v) {
    T s = 0;
    for (int i = 0; i < N; ++i) s += v[i];
    return s;
  }
};

}  // namespace cpu
}  // namespace cmk
