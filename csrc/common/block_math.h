// Formulas shared by every C++ backend (CPU, CUDA, CUDA emulation): the activations, their
// derivatives and the Chan/Welford statistics merge. DESIGN.md section 3 is the specification.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CMK_HD __host__ __device__ __forceinline__
#else
#define CMK_HD inline
#endif

namespace cmk {

// Activation codes; the Python op layer passes the same integers (convmixer_kernels/_ops.py ACT_CODES).
enum Act : int { kGelu = 0, kGeluTanh = 1, kRelu = 2 };

// float: branch-free approximations so the CPU compiler can vectorize loops that call them (glibc's
// erff/expf are scalar calls without -ffast-math, which we avoid because it breaks NaN propagation).
// Both are accurate to a few ulp in fp32; double uses libm so the fp64 path stays exact for gradcheck.
CMK_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 split in two parts; degree-6 Taylor
  // polynomial for exp(r) on |r| <= ln2/2 (error < 2e-7 relative).
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  xc = (x != x) ? x : xc;  // keep NaN
  // round to nearest by the 1.5*2^23 trick: plain arithmetic, so loops calling this vectorize
  float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &e, sizeof(float));
  return p * scale;
#endif
}
CMK_HD double fast_exp(double x) { return std::exp(x); }

CMK_HD float fast_erf(float a) {
#if defined(__CUDA_ARCH__)
  return erff(a);
#else
  // Rational approximation on [-4, 4] (outside it erf is +-1 in fp32), the one used by Eigen and XLA.
  float x = a < 4.f ? a : 4.f;  // comparisons written so that NaN falls through unchanged
  x = x > -4.f ? x : -4.f;
  x = (a != a) ? a : x;
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  p = p * x;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return p / q;
#endif
}
CMK_HD double fast_erf(double x) { return std::erf(x); }

template <typename T>
CMK_HD T fast_tanh(T u) {
  // tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly to +-1 for large |u|.
  return T(1) - T(2) / (fast_exp(T(2) * u) + T(1));
}

// g = act(t).  GELU(t) = t * Phi(t);  tanh-GELU(t) = t/2 * (1 + tanh(sqrt(2/pi) (t + 0.044715 t^3)));
// ReLU written so that NaN propagates (as torch.relu does).
template <int ACT, typename T>
CMK_HD T act_forward(T t) {
  if (ACT == kGelu) {
    return T(0.5) * t * (T(1) + fast_erf(t * T(0.70710678118654752440)));
  } else if (ACT == kGeluTanh) {
    const T u = T(0.79788456080286535588) * (t + T(0.044715) * t * t * t);
    return T(0.5) * t * (T(1) + fast_tanh(u));
  } else {
    return t <= T(0) ? T(0) : t;
  }
}

// act'(t).  GELU'(t) = Phi(t) + t phi(t);  tanh-GELU' by the chain rule;  ReLU'(t) = [t > 0]
// (NaN in t gives NaN, so a NaN input is never masked in the backward either).
template <int ACT, typename T>
CMK_HD T act_backward(T t) {
  if (ACT == kGelu) {
    const T cdf = T(0.5) * (T(1) + fast_erf(t * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * fast_exp(T(-0.5) * t * t);
    return cdf + t * pdf;
  } else if (ACT == kGeluTanh) {
    const T k = T(0.79788456080286535588);
    const T u = k * (t + T(0.044715) * t * t * t);
    const T th = fast_tanh(u);
    const T du = k * (T(1) + T(3 * 0.044715) * t * t);
    return T(0.5) * (T(1) + th) + T(0.5) * t * (T(1) - th * th) * du;
  } else {
    return t > T(0) ? T(1) : (t != t ? t : T(0));
  }
}

// Per-channel running statistics of a stream of values, merged with Chan et al.'s parallel rule so
// that partials from different tiles combine without the E[g^2] - E[g]^2 cancellation.
template <typename T>
struct Welford {
  T count = 0, mean = 0, m2 = 0;
  CMK_HD void merge(T n_b, T mean_b, T m2_b) {
    if (n_b == T(0)) return;
    const T n = count + n_b;
    const T delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
  CMK_HD void merge(const Welford& o) { merge(o.count, o.mean, o.m2); }
};

}  // namespace cmk
