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

// Phi(t), the standard normal CDF, the GELU gate. Not as (1 + erf(t/sqrt2))/2: for t << 0 that sum
// cancels, and erf's absolute rounding error (~1e-7) becomes the whole result (GELU(-4) = -1.3e-4 came
// out with ~1e-7 absolute error, PyTorch's own CPU gelu likewise), which BatchNorm's rstd then amplifies
// when a channel's values sit in the tail. Instead Phi(t) = erfc(-t/sqrt2)/2 with erfc from Numerical
// Recipes' Chebyshev fit erfc(z) = u*exp(-z^2 + P(u)), u = 1/(1 + z/2) (relative error < 1.2e-7 for
// all z >= 0): accurate in relative terms in the tail, and 1 - erfc(z)/2 for t >= 0 does not cancel.
CMK_HD float normal_cdf(float t) {
#if defined(__CUDA_ARCH__)
  return normcdff(t);
#else
  const float z = (t < 0.f ? -t : t) * 0.70710678118654752440f;
  const float u = 1.f / (1.f + 0.5f * z);
  float p = 0.17087277f;
  p = p * u - 0.82215223f;
  p = p * u + 1.48851587f;
  p = p * u - 1.13520398f;
  p = p * u + 0.27886807f;
  p = p * u - 0.18628806f;
  p = p * u + 0.09678418f;
  p = p * u + 0.37409196f;
  p = p * u + 1.00002368f;
  p = p * u - 1.26551223f;
  const float half_erfc = 0.5f * u * fast_exp(p - z * z);
  return t < 0.f ? half_erfc : 1.f - half_erfc;  // NaN: z, u, p are NaN and so is the result
#endif
}
CMK_HD double normal_cdf(double t) { return 0.5 * std::erfc(-t * 0.70710678118654752440); }

// g = act(t).  GELU(t) = t * Phi(t);  tanh-GELU(t) = t/2 * (1 + tanh(u)), u = sqrt(2/pi) (t + 0.044715 t^3),
// evaluated as t * s with s = (1 + tanh(u))/2 = 1/(1 + exp(-2u)): 1 + tanh(u) cancels for u << 0 (it
// had ~1.6x PyTorch's mean error there, which BN's rstd amplifies when |mean| >> std), the sigmoid does not.
// ReLU written so that NaN propagates (as torch.relu does).
template <int ACT, typename T>
CMK_HD T act_forward(T t) {
  if (ACT == kGelu) {
    return t * normal_cdf(t);
  } else if (ACT == kGeluTanh) {
    const T u = T(0.79788456080286535588) * (t + T(0.044715) * t * t * t);
    return t / (T(1) + fast_exp(T(-2) * u));
  } else {
    return t <= T(0) ? T(0) : t;
  }
}

// act'(t).  GELU'(t) = Phi(t) + t phi(t);  tanh-GELU'(t) = s + 2 t s (1 - s) u'(t) with s as above (the
// chain rule on t*s, ds/du = 2 s (1 - s));  ReLU'(t) = [t > 0]
// (NaN in t gives NaN, so a NaN input is never masked in the backward either).
template <int ACT, typename T>
CMK_HD T act_backward(T t) {
  if (ACT == kGelu) {
    const T cdf = normal_cdf(t);
    const T pdf = T(0.39894228040143267794) * fast_exp(T(-0.5) * t * t);
    return cdf + t * pdf;
  } else if (ACT == kGeluTanh) {
    const T k = T(0.79788456080286535588);
    const T u = k * (t + T(0.044715) * t * t * t);
    const T sg = T(1) / (T(1) + fast_exp(T(-2) * u));
    const T du = k * (T(1) + T(3 * 0.044715) * t * t);
    return sg * (T(1) + T(2) * t * (T(1) - sg) * du);
  } else {
    return t > T(0) ? T(1) : (t != t ? t : T(0));
  }
}

// act(t) and act'(t) together, for the backward passes that need both: the same operations as act_forward
// and act_backward (bit for bit), with the shared part (Phi(t) for GELU, the sigmoid's denominator for
// tanh-GELU) evaluated once. Written as two calls in one loop, GCC evaluated it twice (an exp and a division
// each); GELU's Phi is most of both.
template <typename T>
struct ActGrad {
  T g, dg;
};
template <int ACT, typename T>
CMK_HD ActGrad<T> act_with_grad(T t) {
  if (ACT == kGelu) {
    const T cdf = normal_cdf(t);
    const T pdf = T(0.39894228040143267794) * fast_exp(T(-0.5) * t * t);
    return {t * cdf, cdf + t * pdf};
  } else if (ACT == kGeluTanh) {
    const T k = T(0.79788456080286535588);
    const T u = k * (t + T(0.044715) * t * t * t);
    const T den = T(1) + fast_exp(T(-2) * u);
    const T sg = T(1) / den;
    const T du = k * (T(1) + T(3 * 0.044715) * t * t);
    return {t / den, sg * (T(1) + T(2) * t * (T(1) - sg) * du)};
  } else {
    return {act_forward<ACT>(t), act_backward<ACT>(t)};
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
