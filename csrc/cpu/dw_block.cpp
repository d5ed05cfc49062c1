// Fused depthwise block on the CPU:  y = x + gamma * (act(dwconv_k(x) + b) - mean) * rstd + beta.
//
// Work unit: a "plane" = one image n and one channel group (1 channel in NCHW, CB channels in
// channels_last, CB = one SIMD vector of the accumulation type: kVecBytes, 64 bytes with AVX-512, 32
// without). A plane is copied once into a zero-padded buffer in the accumulation type (fp32 for
// fp32/bf16/fp16, fp64 for fp64), so the conv's inner loops are branch-free and compiler-vectorized:
// along w in NCHW, along c in channels_last. Outputs are register tiles of RB rows x WB columns x CB channels.
//
// Training threads own whole channel groups across the batch, so the per-channel statistics are
// complete inside one thread: no cross-thread merge, and t (or dt) stays in a per-thread scratch of
// N*H*W*CB values that lives in L2. Pass structure:
//   eval forward     : one pass over x (conv, bias, act, BN affine, residual).
//   training forward : conv+act into scratch, exact two-pass mean/var over the scratch, apply pass;
//                      channels_last with k <= 9 runs two ring passes instead (ring_k: per-row statistics
//                      merged per channel in row order, then the apply).
//   backward         : recompute t into scratch and reduce sum(dy), sum(dy*ghat); then form dt,
//                      dw, db and dx = dy + conv_transpose(dt) in one more pass.
// Only x and the per-channel statistics are saved for the backward (t is recomputed).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <cstring>
#include <vector>

#include "../common/block_math.h"
#include "dw_block.h"
#include "simd.h"

namespace cmk {
namespace cpu {
namespace {

// Scratch vectors 64-byte aligned: a pixel's channel vector (channels_last, kVecBytes) then never splits a
// cache line; std::allocator gives 16 bytes, so every vector load of a padded plane used to be a split load.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using AVec = std::vector<T, Aligned64<T>>;
// The same, but AVecU<T> v(n) leaves the values uninitialized (default-init): for large buffers that are
// written in full before they are read, where a zero fill would be a wasted pass over memory.
template <typename T>
struct Aligned64Uninit : Aligned64<T> {
  template <typename U>
  struct rebind {
    using other = Aligned64Uninit<U>;
  };
  Aligned64Uninit() = default;
  template <typename U>
  Aligned64Uninit(const Aligned64Uninit<U>&) {}
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using AVecU = std::vector<T, Aligned64Uninit<T>>;

// Tile shape per layout: NCHW vectorizes along w (8 rows x VL), channels_last along c (8 pixels x VL
// channels): 8 independent accumulators cover the FMA latency, ~1.1 vector loads per FMA.
template <typename acc_t, bool CL>
struct TileShape {
  static constexpr int VL = Simd<acc_t>::N;
  static constexpr int CB = CL ? VL : 1;
  static constexpr int RB = CL ? 1 : 8;
  static constexpr int WB = CL ? 8 : VL;
};

// Channel groups per eval work item in channels_last (see load_padded_groups): 4 x 64 bytes per pixel,
// and the item's buffers (4 padded planes and 4 dense ones) stay well inside L2.
constexpr int64_t kEvalGroups = 4;
constexpr int64_t kMaxLoadGroups = kEvalGroups;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Calls f(std::integral_constant<int, K>{}) for the runtime k when 1 <= k <= 9 (the kernel sizes with
// compile-time kernels: K is a template parameter of their register tiles) and returns true; false otherwise.
template <typename F>
bool dispatch_k(int64_t k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 9: f(std::integral_constant<int, 9>{}); return true;
    default: return false;
  }
}

// Geometry shared by every plane of one call.
struct PlaneGeom {
  int64_t N, C, H, W, HW, k, pl;
  int64_t groups;        // channel groups
  int64_t buf_h, buf_w;  // padded buffer extent (rows rounded up to RB, cols to WB, plus k-1 halo)
};

template <typename acc_t, bool CL>
PlaneGeom make_geom(const at::Tensor& x, int64_t k) {
  using S = TileShape<acc_t, CL>;
  PlaneGeom g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.HW = g.H * g.W; g.k = k; g.pl = (k - 1) / 2;
  g.groups = (g.C + S::CB - 1) / S::CB;
  g.buf_h = round_up(g.H, S::RB) + k - 1;
  g.buf_w = round_up(g.W, S::WB) + k - 1;
  return g;
}

// Offset of element (n, c, p = h*W + w) for either layout.
template <bool CL>
inline int64_t elem_offset(const PlaneGeom& g, int64_t n, int64_t c, int64_t p) {
  return CL ? (n * g.HW + p) * g.C + c : (n * g.C + c) * g.HW + p;
}

// The previous block's BN apply, done on the load (see load_padded).
template <typename acc_t>
struct InputAffine {
  const acc_t* center = nullptr;  // per lane (group_lanes); scale nullptr: u = x
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;
  // BatchNorm's order: the centre comes off first (exact when x is near it), so |mean| >> std does not
  // cancel as scale*x + (shift - scale*center) would.
  acc_t apply(int lane, acc_t x) const { return scale[lane] * (x - center[lane]) + shift[lane]; }
};

// The input affines of up to kMaxLoadGroups channel groups as vectors, for the channels_last loaders.
template <typename acc_t>
struct GroupAffineVectors {
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  V ce[kMaxLoadGroups] = {}, sc[kMaxLoadGroups] = {}, sh[kMaxLoadGroups] = {};
  bool affine[kMaxLoadGroups] = {};  // false: group j has none
  GroupAffineVectors(const InputAffine<acc_t>* aff, int64_t ng) {
    for (int64_t j = 0; j < ng; ++j) {
      affine[j] = aff && aff[j].scale;
      if (affine[j]) {
        ce[j] = Vec::load(aff[j].center);
        sc[j] = Vec::load(aff[j].scale);
        sh[j] = Vec::load(aff[j].shift);
      }
    }
  }
  V apply(int64_t j, V v) const { return sc[j] * (v - ce[j]) + sh[j]; }
};

// Groups [group0, group0 + ng) of image n into ng padded buffers, buf + j * buf_stride for group
// group0 + j, through the groups' input affines (aff[j]; null: none). In channels_last one pixel's
// ng*CB channels are contiguous, so they are copied together: a single group alone reads one 64-byte
// line per pixel, C elements apart, a stride near the page size that the hardware prefetchers do not
// follow. Each line was then a demand miss, and the copy half of the eval block's time
// (benchmarks/RESULTS.md, the depthwise block against the FMA peak).
template <typename scalar_t, typename acc_t, bool CL>
void load_padded_groups(const PlaneGeom& g, const scalar_t* src, int64_t n, int64_t group0, int64_t ng, int64_t off,
                        acc_t* buf, int64_t buf_stride, const InputAffine<acc_t>* aff) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  TORCH_INTERNAL_ASSERT(ng <= kMaxLoadGroups);
  const int64_t c0 = group0 * CB;
  if constexpr (!CL) {
    for (int64_t j = 0; j < ng; ++j)
      for (int64_t h = 0; h < g.H; ++h) {
        acc_t* row = buf + j * buf_stride + (h + off) * g.buf_w + off;
        const scalar_t* s = src + elem_offset<CL>(g, n, c0 + j, h * g.W);
        if (aff && aff[j].scale)
          for (int64_t w = 0; w < g.W; ++w) row[w] = aff[j].apply(0, static_cast<acc_t>(s[w]));
        else
          for (int64_t w = 0; w < g.W; ++w) row[w] = static_cast<acc_t>(s[w]);
      }
  } else {
    // Whole vectors, so that few instructions per pixel keep many of its lines in flight (a scalar
    // copy through the affine's pointers, which may alias the buffer, kept one or two).
    using Vec = Simd<acc_t>;
    using V = typename Vec::V;
    const int64_t nc = std::min<int64_t>(ng * CB, g.C - c0);  // valid channels of the range
    const int64_t full = nc / CB;                              // groups with all CB lanes valid
    const GroupAffineVectors<acc_t> av(aff, ng);
    const bool* affine = av.affine;
    for (int64_t h = 0; h < g.H; ++h) {
      const scalar_t* s = src + elem_offset<CL>(g, n, c0, h * g.W);
      for (int64_t w = 0; w < g.W; ++w) {
        const scalar_t* px = s + w * g.C;
        acc_t* d = buf + ((h + off) * g.buf_w + off + w) * CB;
        for (int64_t j = 0; j < full; ++j) {
          V v = load_as<acc_t>(px + j * CB);
          if (affine[j]) v = av.apply(j, v);
          Vec::store(d + j * buf_stride, v);
        }
        if (full < ng) {  // the last group of a C that is not a multiple of CB; lanes past C stay zero
          const int64_t j = full;
          for (int64_t c = 0; c < nc - j * CB; ++c) {
            const acc_t v = static_cast<acc_t>(px[j * CB + c]);
            d[j * buf_stride + c] = affine[j] ? aff[j].apply(static_cast<int>(c), v) : v;
          }
        }
      }
    }
  }
}

// Copy plane (n, group) of src into the zero-padded buffer with its top-left corner at (off, off).
// The halo and the round-up margin are never written, so a buffer zeroed once per thread stays valid.
// With an input affine (per-lane center/scale/shift, see InputAffine) the buffer holds u = aff.apply(x):
// the previous block's BN apply happens here, on in-bounds elements only (zero padding is of u).
template <typename scalar_t, typename acc_t, bool CL>
void load_padded(const PlaneGeom& g, const scalar_t* src, int64_t n, int64_t group, int64_t off, acc_t* buf,
                 InputAffine<acc_t> aff = {}) {
  load_padded_groups<scalar_t, acc_t, CL>(g, src, n, group, 1, off, buf, 0, &aff);
}

// Per-group weights laid out [tap][lane], lanes beyond C zero. flip=true gives w[k-1-i][k-1-j],
// the kernel of the transposed conv used for dx.
template <typename scalar_t, typename acc_t, bool CL>
AVec<acc_t> group_weights(const PlaneGeom& g, const scalar_t* w, int64_t group, bool flip) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  const int64_t kk = g.k * g.k;
  AVec<acc_t> out(kk * CB, acc_t(0));
  for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c)
    for (int64_t t = 0; t < kk; ++t)
      out[t * CB + c] = static_cast<acc_t>(w[(group * CB + c) * kk + (flip ? kk - 1 - t : t)]);
  return out;
}

// Per-lane copy of a per-channel vector: in channels_last lane l is channel group*CB + l (zero beyond
// C); in NCHW every lane holds the plane's channel, and lanes are pixel residues mod VL.
template <typename acc_t, bool CL, typename T>
AVec<acc_t> group_lanes(const PlaneGeom& g, const T* v, int64_t group) {
  constexpr int CB = TileShape<acc_t, CL>::CB, VL = Simd<acc_t>::N;
  AVec<acc_t> out(VL, acc_t(0));
  for (int64_t l = 0; l < VL; ++l) {
    const int64_t c = CL ? group * CB + l : group;
    if (c < g.C) out[l] = static_cast<acc_t>(v[c]);
  }
  return out;
}

// The per-channel input affine of a call (null pointers: none).
template <typename acc_t>
struct ChannelAffine {
  const acc_t* center = nullptr;
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;
};

template <typename acc_t>
ChannelAffine<acc_t> channel_affine(const at::Tensor& center, const at::Tensor& scale, const at::Tensor& shift) {
  if (scale.numel() == 0) return {};
  return {center.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()};
}

// Per-lane input affine of one channel group (group_lanes of the three vectors, kept alive in `lanes`);
// none when the call has none.
template <typename acc_t, bool CL>
InputAffine<acc_t> group_input_affine(const PlaneGeom& g, const ChannelAffine<acc_t>& aff, int64_t group,
                                      AVec<acc_t> (&lanes)[3]) {
  if (!aff.scale) return {};
  lanes[0] = group_lanes<acc_t, CL>(g, aff.center, group);
  lanes[1] = group_lanes<acc_t, CL>(g, aff.scale, group);
  lanes[2] = group_lanes<acc_t, CL>(g, aff.shift, group);
  return {lanes[0].data(), lanes[1].data(), lanes[2].data()};
}

// Values of one plane in a dense buffer of plane_len(g) elements: H*W*CB, rounded up to whole vectors.
template <typename acc_t, bool CL>
int64_t plane_len(const PlaneGeom& g) {
  return round_up(g.HW * TileShape<acc_t, CL>::CB, Simd<acc_t>::N);
}

// Dense plane <- plane (n, group) of a tensor (lanes past C untouched), through the input affine
// when one is given (lanes past C then hold shift = 0: group_lanes zero-fills them).
template <typename scalar_t, typename acc_t, bool CL>
void gather_plane(const PlaneGeom& g, const scalar_t* src, int64_t n, int64_t group, acc_t* dst,
                  InputAffine<acc_t> aff = {}) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  const int64_t c0 = group * CB, cb = std::min<int64_t>(CB, g.C - c0);
  const scalar_t* s = src + elem_offset<CL>(g, n, c0, 0);
  if (!CL) {
    for (int64_t p = 0; p < g.HW; ++p) dst[p] = static_cast<acc_t>(s[p]);
    if (aff.scale)
      for (int64_t p = 0; p < g.HW; ++p) dst[p] = aff.apply(0, dst[p]);
    return;
  } else if (cb == CB) {
    for (int64_t p = 0; p < g.HW; ++p)
      for (int c = 0; c < CB; ++c) dst[p * CB + c] = static_cast<acc_t>(s[p * g.C + c]);
  } else {
    for (int64_t p = 0; p < g.HW; ++p)
      for (int64_t c = 0; c < cb; ++c) dst[p * CB + c] = static_cast<acc_t>(s[p * g.C + c]);
  }
  if (aff.scale)
    for (int64_t p = 0; p < g.HW; ++p)
      for (int c = 0; c < CB; ++c) dst[p * CB + c] = aff.apply(c, dst[p * CB + c]);
}

// Planes (n, group0 + j) of a tensor <- dense planes src + j * src_stride, j < ng (valid lanes only);
// in channels_last a pixel's ng*CB channels are written together (see load_padded_groups).
template <typename scalar_t, typename acc_t, bool CL>
void scatter_planes(const PlaneGeom& g, const acc_t* src, int64_t src_stride, int64_t n, int64_t group0, int64_t ng,
                    scalar_t* dst) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  const int64_t c0 = group0 * CB;
  if constexpr (!CL) {
    for (int64_t j = 0; j < ng; ++j) {
      scalar_t* d = dst + elem_offset<CL>(g, n, c0 + j, 0);
      for (int64_t p = 0; p < g.HW; ++p) d[p] = static_cast<scalar_t>(src[j * src_stride + p]);
    }
  } else {
    using Vec = Simd<acc_t>;
    const int64_t nc = std::min<int64_t>(ng * CB, g.C - c0);
    const int64_t full = nc / CB;
    for (int64_t p = 0; p < g.HW; ++p) {
      scalar_t* d = dst + elem_offset<CL>(g, n, c0, p);
      for (int64_t j = 0; j < full; ++j) {
        store_as<acc_t>(d + j * CB, Vec::load(src + j * src_stride + p * CB));
      }
      for (int64_t c = full * CB; c < nc; ++c) d[c] = static_cast<scalar_t>(src[full * src_stride + p * CB + c - full * CB]);
    }
  }
}

template <typename scalar_t, typename acc_t, bool CL>
void scatter_plane(const PlaneGeom& g, const acc_t* src, int64_t n, int64_t group, scalar_t* dst) {
  scatter_planes<scalar_t, acc_t, CL>(g, src, 0, n, group, 1, dst);
}

// Dense plane -> interior of a zero-halo buffer at offset (off, off), through the input affine
// when one is given (u = aff.apply(x) per lane).
template <typename acc_t, bool CL>
void plane_to_padded(const PlaneGeom& g, const acc_t* src, int64_t off, acc_t* buf, InputAffine<acc_t> aff = {}) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  for (int64_t h = 0; h < g.H; ++h) {
    acc_t* row = buf + ((h + off) * g.buf_w + off) * CB;
    const acc_t* in = src + h * g.W * CB;
    if (!aff.scale) {
      std::memcpy(row, in, g.W * CB * sizeof(acc_t));
    } else if (CL) {
      for (int64_t w = 0; w < g.W; ++w)
        for (int c = 0; c < CB; ++c) row[w * CB + c] = aff.apply(c, in[w * CB + c]);
    } else {
      for (int64_t w = 0; w < g.W; ++w) row[w] = aff.apply(0, in[w]);
    }
  }
}

// Interior of a padded buffer -> dense plane (the inverse of plane_to_padded).
template <typename acc_t, bool CL>
void padded_to_plane(const PlaneGeom& g, const acc_t* buf, int64_t off, acc_t* dst) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  for (int64_t h = 0; h < g.H; ++h)
    std::memcpy(dst + h * g.W * CB, buf + ((h + off) * g.buf_w + off) * CB, g.W * CB * sizeof(acc_t));
}

// Sum of a lane array: per channel in channels_last, all lanes together in NCHW.
template <typename acc_t, bool CL>
void reduce_lanes(const acc_t* lanes, double* out) {
  constexpr int VL = Simd<acc_t>::N;
  if (CL) {
    for (int l = 0; l < VL; ++l) out[l] += lanes[l];
  } else {
    double s = 0;
    for (int l = 0; l < VL; ++l) s += lanes[l];
    out[0] += s;
  }
}

// Sliding-window register tile: acc[a] = mul_add(acc[a], wgt(o, s), in(o, a + STRIDE*s)) for o < ROWS,
// s < TAPS. For a fixed o each input vector in(o, u) is loaded once and feeds every accumulator
// a = u - STRIDE*s, so a row of taps costs (NACC + STRIDE*(TAPS-1)) + TAPS loads per NACC * TAPS
// multiply-adds instead of 2 * NACC * TAPS. The sizes are compile-time so the (u, a) pairs fold into
// straight-line code on registers. The fp32 conv: ROWS = TAPS = K, STRIDE 1, mul_add = a + w*v; the bf16
// pair dots: TAPS = ceil(K/2) pairs 2 positions apart (conv_tiles_pairs_k).
template <int ROWS, int TAPS, int NACC, int STRIDE, typename V, typename LoadIn, typename LoadW, typename MulAdd>
inline void sliding_window(V (&acc)[NACC], LoadIn in, LoadW wgt, MulAdd mul_add) {
  for (int o = 0; o < ROWS; ++o) {
    decltype(wgt(0, 0)) w[TAPS];
#pragma GCC unroll 16
    for (int s = 0; s < TAPS; ++s) w[s] = wgt(o, s);
#pragma GCC unroll 32
    for (int u = 0; u < NACC + STRIDE * (TAPS - 1); ++u) {
      const auto v = in(o, u);
#pragma GCC unroll 16
      for (int a = 0; a < NACC; ++a) {
        const int d = u - a;
        if (d >= 0 && d % STRIDE == 0 && d / STRIDE < TAPS) acc[a] = mul_add(acc[a], w[d / STRIDE], v);
      }
    }
  }
}

template <int K, int NACC, typename V, typename LoadIn, typename LoadW>
inline void sliding_taps(V (&acc)[NACC], LoadIn in, LoadW wgt) {
  sliding_window<K, K, NACC, 1>(acc, in, wgt, [](V a, V w, V v) { return a + w * v; });
}

// out[h][w][c] = bias[c] + sum_{i,j} wt[i*k+j][c] * buf[h+i][w+j][c]   (cross-correlation)
// for h < H, w < W; out is dense H x W x CB. channels_last: the accumulators are WB consecutive
// pixels of one channel vector (kVecBytes), the window slides along w (o = i, s = j). NCHW: they are RB
// consecutive rows of one vector along w, the window slides down the rows (o = j, s = i) with the
// weight broadcast. K is a template parameter (1..9 cover ConvMixer); other k take the generic loop.
template <int K, typename acc_t, bool CL, typename Emit>
void conv_tiles_k(const PlaneGeom& g, const acc_t* buf, const acc_t* wt, const acc_t* bias, Emit&& emit) {
  using S = TileShape<acc_t, CL>;
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int CB = S::CB, RB = S::RB, WB = S::WB, VL = Vec::N;
  const int64_t row = g.buf_w * CB;
  if constexpr (CL) {
    const V bv = Vec::load(bias);
    for (int64_t h = 0; h < g.H; ++h) {
      for (int64_t w0 = 0; w0 < g.W; w0 += WB) {
        V acc[WB];
        for (int w = 0; w < WB; ++w) acc[w] = bv;
        const acc_t* base = buf + h * row + w0 * CB;
        sliding_taps<K, WB>(
            acc, [&](int i, int u) { return Vec::load(base + i * row + u * CB); },
            [&](int i, int j) { return Vec::load(wt + (i * K + j) * CB); });
        emit(h, w0, acc);
      }
    }
  } else {
    static_assert(WB == VL, "NCHW tiles are one vector wide");
    const V bv = Vec::broadcast(bias[0]);
    for (int64_t h0 = 0; h0 < g.H; h0 += RB) {
      for (int64_t w0 = 0; w0 < g.W; w0 += VL) {
        V acc[RB];
        for (int r = 0; r < RB; ++r) acc[r] = bv;
        const acc_t* base = buf + h0 * row + w0;
        sliding_taps<K, RB>(
            acc, [&](int j, int u) { return Vec::load(base + u * row + j); },
            [&](int j, int i) { return Vec::broadcast(wt[i * K + j]); });
        emit(h0, w0, acc);
      }
    }
  }
}

// Calls conv_tiles_k<K> for the runtime k; returns false for k > 9 (callers take the plane path).
template <typename acc_t, bool CL, typename Emit>
bool conv_tiles(const PlaneGeom& g, const acc_t* buf, const acc_t* wt, const acc_t* bias, Emit&& emit) {
  return dispatch_k(g.k, [&](auto KC) { conv_tiles_k<decltype(KC)::value, acc_t, CL>(g, buf, wt, bias, emit); });
}

// Tile emitter that stores the conv output into a dense H x W x CB plane.
template <typename acc_t, bool CL>
struct StorePlane {
  const PlaneGeom& g;
  acc_t* out;
  template <typename V, int NACC>
  void operator()(int64_t h0, int64_t w0, V (&acc)[NACC]) const {
    using Vec = Simd<acc_t>;
    constexpr int CB = TileShape<acc_t, CL>::CB, VL = Vec::N;
    if constexpr (CL) {
      for (int w = 0; w < NACC && w0 + w < g.W; ++w) Vec::store(out + (h0 * g.W + w0 + w) * CB, acc[w]);
    } else {
      const int64_t n = std::min<int64_t>(VL, g.W - w0);
      for (int r = 0; r < NACC && h0 + r < g.H; ++r) {
        if (n == VL) {
          Vec::store(out + (h0 + r) * g.W + w0, acc[r]);
        } else {
          acc_t tmp[VL];
          Vec::store(tmp, acc[r]);
          std::memcpy(out + (h0 + r) * g.W + w0, tmp, n * sizeof(acc_t));
        }
      }
    }
  }
};

// Any k: one vector load per tap and accumulator (correct, slower; k > 9 is rare in ConvMixers).
template <typename acc_t, bool CL>
void conv_plane_generic(const PlaneGeom& g, const acc_t* buf, const acc_t* wt, const acc_t* bias, acc_t* out) {
  using S = TileShape<acc_t, CL>;
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int CB = S::CB, RB = S::RB, WB = S::WB, VL = Vec::N;
  constexpr int NACC = CL ? WB : RB;
  const int64_t row = g.buf_w * CB;
  for (int64_t h0 = 0; h0 < g.H; h0 += RB) {
    for (int64_t w0 = 0; w0 < g.W; w0 += WB) {
      V acc[NACC];
      for (int a = 0; a < NACC; ++a) acc[a] = CL ? Vec::load(bias) : Vec::broadcast(bias[0]);
      for (int64_t i = 0; i < g.k; ++i)
        for (int64_t j = 0; j < g.k; ++j) {
          const V wv = CL ? Vec::load(wt + (i * g.k + j) * CB) : Vec::broadcast(wt[i * g.k + j]);
          const acc_t* in = buf + (h0 + i) * row + (w0 + j) * CB;
          for (int a = 0; a < NACC; ++a) acc[a] += wv * Vec::load(in + (CL ? a * CB : a * row));
        }
      for (int a = 0; a < NACC; ++a) {
        const int64_t h = CL ? h0 : h0 + a;
        if (h >= g.H) break;
        if (CL) {
          if (w0 + a < g.W) Vec::store(out + (h * g.W + w0 + a) * CB, acc[a]);
        } else {
          acc_t tmp[VL];
          Vec::store(tmp, acc[a]);
          std::memcpy(out + h * g.W + w0, tmp, std::min<int64_t>(VL, g.W - w0) * sizeof(acc_t));
        }
      }
    }
  }
}

template <typename acc_t, bool CL>
void conv_plane(const PlaneGeom& g, const acc_t* buf, const acc_t* wt, const acc_t* bias, acc_t* out) {
  if (!conv_tiles<acc_t, CL>(g, buf, wt, bias, StorePlane<acc_t, CL>{g, out}))
    conv_plane_generic<acc_t, CL>(g, buf, wt, bias, out);
}

// bf16 eval in channels_last with pair dots (kHasBf16Dot): the padded plane holds bf16 pairs, position
// (r, u) lane c = (u_in[r][u][c], u_in[r][u+1][c]), and the weights pairs (w[i][2p][c], w[i][2p+1][c])
// (a zero tap past k), so one vdpbf16ps does taps 2p and 2p+1 of 16 channels:
//   t[h][w][c] = b[c] + sum_i sum_p dot(wpair[i][p][c], pair[h+i][w+2p][c])
// ceil(k/2) instead of k instructions per row of taps, with fp32 accumulation. Each pixel is stored twice
// (in its own pair and its left neighbour's), so the buffer has the bytes of the fp32 one. The input
// affine's u is rounded to bf16 once (the bf16 model's BN output is a bf16 tensor too); the residual is the
// low half of the centre pair.

template <typename scalar_t, typename acc_t, bool CL>
constexpr bool pair_dots_possible() {
  return CL && kHasBf16Dot && std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>;
}

// Pair dots for this call: possible for the types, switched on (set_cpu_bf16_pair_dots), k <= 9.
template <typename scalar_t, typename acc_t, bool CL>
bool use_pair_dots(const PlaneGeom& g) {
  return pair_dots_possible<scalar_t, acc_t, CL>() && bf16_pair_dots_flag() && g.k <= 9;
}

// Groups [group0, group0 + ng) of image n into pair-padded buffers (as load_padded_groups, which this
// mirrors: a pixel's ng groups are read together). Writes positions [off-1, off+W) of rows [off, off+H);
// the rest stays zero.
template <typename scalar_t>
void load_pair_padded_groups(const PlaneGeom& g, const scalar_t* src, int64_t n, int64_t group0, int64_t ng,
                             int64_t off, Bf16Pairs* buf, int64_t buf_stride, const InputAffine<float>* aff) {
  constexpr int CB = Simd<float>::N;
  TORCH_INTERNAL_ASSERT(ng <= kMaxLoadGroups);
  const int64_t c0 = group0 * CB;
  const int64_t nc = std::min<int64_t>(ng * CB, g.C - c0);
  const GroupAffineVectors<float> av(aff, ng);
  const bool* affine = av.affine;
  for (int64_t h = 0; h < g.H; ++h) {
    const scalar_t* s = src + elem_offset<true>(g, n, c0, h * g.W);
    Bf16Pairs* row = buf + (h + off) * g.buf_w + off;  // position off + w of the row
    Bf16Vec prev[kMaxLoadGroups] = {};
    for (int64_t w = 0; w <= g.W; ++w) {
      for (int64_t j = 0; j < ng; ++j) {
        Bf16Vec cur = {};
        if (w < g.W) {
          const scalar_t* px = s + w * g.C + j * CB;
          const int64_t valid = std::min<int64_t>(CB, nc - j * CB);  // lanes past C stay zero
          if (valid == CB && !affine[j]) {
            std::memcpy(&cur, px, sizeof(cur));
          } else if (valid == CB) {
            cur = round_to_bf16(av.apply(j, load_as<float>(px)));
          } else {
            for (int64_t c = 0; c < valid; ++c) {
              const float v = static_cast<float>(px[c]);
              cur[c] = c10::BFloat16(affine[j] ? aff[j].apply(static_cast<int>(c), v) : v).x;
            }
          }
        }
        if (w > 0 || off > 0) row[j * buf_stride + w - 1] = make_bf16_pairs(prev[j], cur);
        prev[j] = cur;
      }
    }
  }
}

// Per-group pair weights [i][p][lane] (see above), lanes beyond C and the tap past an odd k zero.
template <typename scalar_t>
std::vector<Bf16Pairs> group_pair_weights(const PlaneGeom& g, const scalar_t* w, int64_t group) {
  constexpr int CB = Simd<float>::N;
  const int64_t k = g.k, np = (k + 1) / 2;
  std::vector<Bf16Pairs> out(k * np, Bf16Pairs{});
  for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j)
        out[i * np + j / 2][c] |= static_cast<uint32_t>(w[(group * CB + c) * k * k + i * k + j].x) << (16 * (j % 2));
  return out;
}

template <int K, typename Emit>
void conv_tiles_pairs_k(const PlaneGeom& g, const Bf16Pairs* buf, const Bf16Pairs* wt, const float* bias, Emit&& emit) {
  using Vec = Simd<float>;
  using V = Vec::V;
  constexpr int NP = (K + 1) / 2, WB = TileShape<float, true>::WB;
  const V bv = Vec::load(bias);
  for (int64_t h = 0; h < g.H; ++h) {
    for (int64_t w0 = 0; w0 < g.W; w0 += WB) {
      V acc[WB];
      for (int w = 0; w < WB; ++w) acc[w] = bv;
      const Bf16Pairs* base = buf + h * g.buf_w + w0;
      sliding_window<K, NP, WB, 2>(  // rows i, tap pairs p 2 positions apart
          acc, [&](int i, int u) { return base[i * g.buf_w + u]; }, [&](int i, int p) { return wt[i * NP + p]; },
          [](V a, Bf16Pairs w, Bf16Pairs v) { return dot_bf16_pairs(a, v, w); });
      emit(h, w0, acc);
    }
  }
}

// conv_tiles with pair dots; k <= 9 only (see use_pair_dots).
template <typename Emit>
void conv_tiles_pairs(const PlaneGeom& g, const Bf16Pairs* buf, const Bf16Pairs* wt, const float* bias, Emit&& emit) {
  const bool done = dispatch_k(g.k, [&](auto KC) { conv_tiles_pairs_k<decltype(KC)::value>(g, buf, wt, bias, emit); });
  TORCH_INTERNAL_ASSERT(done, "conv_tiles_pairs: k = ", g.k);
}

// part[tap][c] += sum_{h,w} dt[h][w][c] * xpad[h+i][w+j][c]: the depthwise weight gradient of one
// plane. dt sits in a zero-padded buffer at offset (pr, pr), so whole vectors past W read zeros.
// For each tap row i, the K accumulators of that row share every dt load (~1 + 1/K loads per FMA).
template <int K, typename acc_t, bool CL>
void weight_grad_plane_k(const PlaneGeom& g, const acc_t* dtpad, int64_t pr, const acc_t* xpad, double* dwacc) {
  using S = TileShape<acc_t, CL>;
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int CB = S::CB, VL = Vec::N;
  constexpr int64_t step = CL ? 1 : VL;  // w advance per vector
  const int64_t row = g.buf_w * CB;
  for (int i = 0; i < K; ++i) {
    V acc[K] = {};
    for (int64_t h = 0; h < g.H; ++h) {
      const acc_t* d = dtpad + (h + pr) * row + pr * CB;
      const acc_t* xr = xpad + (h + i) * row;
      for (int64_t w = 0; w < g.W; w += step) {
        const V dv = Vec::load(d + w * CB);
#pragma GCC unroll 16
        for (int j = 0; j < K; ++j) acc[j] += dv * Vec::load(xr + (w + j) * CB);
      }
    }
    for (int j = 0; j < K; ++j) {
      double* dst = dwacc + (i * K + j) * CB;
      if constexpr (CL) {
        for (int c = 0; c < CB; ++c) dst[c] += acc[j][c];
      } else {
        dst[0] += Vec::sum(acc[j]);
      }
    }
  }
}

template <typename acc_t, bool CL>
void weight_grad_plane_generic(const PlaneGeom& g, const acc_t* dtpad, int64_t pr, const acc_t* xpad, double* dwacc) {
  using S = TileShape<acc_t, CL>;
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int CB = S::CB, VL = Vec::N;
  constexpr int64_t step = CL ? 1 : VL;
  const int64_t row = g.buf_w * CB;
  for (int64_t i = 0; i < g.k; ++i)
    for (int64_t j = 0; j < g.k; ++j) {
      V part = {};
      for (int64_t h = 0; h < g.H; ++h) {
        const acc_t* d = dtpad + (h + pr) * row + pr * CB;
        const acc_t* xr = xpad + (h + i) * row + j * CB;
        for (int64_t w = 0; w < g.W; w += step) part += Vec::load(d + w * CB) * Vec::load(xr + w * CB);
      }
      double* dst = dwacc + (i * g.k + j) * CB;
      if constexpr (CL) {
        for (int c = 0; c < CB; ++c) dst[c] += part[c];
      } else {
        dst[0] += Vec::sum(part);
      }
    }
}

template <typename acc_t, bool CL>
void weight_grad_plane(const PlaneGeom& g, const acc_t* dtpad, int64_t pr, const acc_t* xpad, double* dwacc) {
  const bool done =
      dispatch_k(g.k, [&](auto KC) { weight_grad_plane_k<decltype(KC)::value, acc_t, CL>(g, dtpad, pr, xpad, dwacc); });
  if (!done) weight_grad_plane_generic<acc_t, CL>(g, dtpad, pr, xpad, dwacc);
}

// ---- channels_last eval: a ring of padded input rows, whole pixels ------------------------------------
// y[n,h,w,c] = u + A[c]*act(b[c] + sum_{i,j} w[c,i,j]*u[n,h+i-pl,w+j-pl,c]) + B[c],  u = input affine of x
// (A = gamma*rstd, B = beta - mean*A; zero padding is of u). The plane-per-group path above reads one
// 64-byte line per pixel of each group, C elements apart: its loads missed the cache with few in flight,
// and its 8-accumulator tile left the two FMA ports waiting on the FMA latency (measured on a Xeon with
// AVX-512: the copies ~45% of the block's time, the conv loop at ~53% of the FMA peak).
// Here a work item is a range of output rows of one image and a block of GB channel groups (all of them
// unless a ring would not fit in L2). Going down the rows, each new input row is read once, sequentially
// (whole pixels: the hardware prefetchers stream it), into a ring of k zero-haloed rows laid out
// [group][slot][col][lane] (64-byte aligned: no vector load splits a cache line); each group's output row
// is computed in tiles of kRingTile pixels (16 independent accumulators with AVX-512's 32 registers: the
// FMA latency times two ports, with margin; 8 with AVX2's 16, which the taps' weights and the input share),
// and the row goes out to y sequentially from a blocked row buffer. x is read once (plus k-1 halo
// rows per item) and y written once, both as streams.
constexpr int64_t kRingBufferBytes = int64_t(1) << 20;
constexpr int kRingTile = kVecBytes == 64 ? 16 : 8;  // pixels per register tile

// Work split of one call.
struct RingGeom {
  int64_t GB, blocks;  // channel groups per item, channel blocks
  int64_t RS, chunks;  // output rows per item, row chunks per image
  int64_t Wp;          // ring row width: W rounded up to the tile, plus k - 1
};

template <typename acc_t>
RingGeom make_ring_geom(const PlaneGeom& g) {
  constexpr int VL = Simd<acc_t>::N;
  RingGeom s;
  s.Wp = round_up(g.W, kRingTile) + g.k - 1;
  const int64_t group_bytes = (g.k * s.Wp + g.W) * VL * int64_t(sizeof(acc_t));  // ring + output row
  s.GB = std::clamp<int64_t>(kRingBufferBytes / group_bytes, 1, g.groups);
  s.blocks = (g.groups + s.GB - 1) / s.GB;
  // Enough items for every thread (two each, for balance), each item paying k-1 halo rows.
  const int64_t want = 2 * at::get_num_threads(), have = g.N * s.blocks;
  s.chunks = std::min<int64_t>(g.H, (want + have - 1) / have);
  s.RS = (g.H + s.chunks - 1) / s.chunks;
  s.chunks = (g.H + s.RS - 1) / s.RS;
  return s;
}

// Per-channel vectors of a call laid out per lane, groups * VL long, zero past C.
template <typename acc_t, typename T>
AVec<acc_t> channel_lanes(const PlaneGeom& g, const T* v) {
  AVec<acc_t> out(g.groups * Simd<acc_t>::N, acc_t(0));
  for (int64_t c = 0; c < g.C; ++c) out[c] = static_cast<acc_t>(v[c]);
  return out;
}

// The input affine of a call per lane (channel_lanes of its three vectors), for the ring kernels.
template <typename acc_t>
struct LaneAffine {
  bool on = false;
  AVec<acc_t> ce, sc, sh;
  LaneAffine(const PlaneGeom& g, const ChannelAffine<acc_t>& a) : on(a.scale != nullptr) {
    if (!on) return;
    ce = channel_lanes<acc_t>(g, a.center);
    sc = channel_lanes<acc_t>(g, a.scale);
    sh = channel_lanes<acc_t>(g, a.shift);
  }
};

// Pixels [w_lo, w_hi) of row h (any integer) of image n, channel groups [g0, g0 + ng) of a channels_last
// tensor, into dst laid out [group][col][lane] (group stride `stride`; dst is column w_lo of group g0):
// through the lane affine when one is given (null or off: the values as they are), zeros for a row outside
// the image. A pixel's ng groups are one run of memory, read together (whole pixels: the hardware
// prefetchers stream the row). raw (optional, same layout as dst): the values before the affine too, so a
// caller that needs both reads the row once. prefetch_next: software-prefetch the same pixels of row h + 1
// as each pixel is read. The backward's row loops stalled on these loads (a run of the block's channels per
// pixel at a stride of C elements, while its t buffers stream through the cache); with the prefetch its CPU
// time fell 20-40% on this project's AVX2 VM while its memory was contended, and 0-12% when it was quiet
// (benchmarks/RESULTS.md). The forward's rings measured no difference and do not use it.
template <typename scalar_t, typename acc_t>
void read_row_groups(const PlaneGeom& g, const scalar_t* src, const LaneAffine<acc_t>* aff, int64_t n, int64_t g0,
                     int64_t ng, int64_t h, int64_t w_lo, int64_t w_hi, acc_t* dst, int64_t stride,
                     acc_t* raw = nullptr, bool prefetch_next = false) {
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int VL = Vec::N;
  if (h < 0 || h >= g.H) {
    for (int64_t j = 0; j < ng; ++j) {
      std::memset(dst + j * stride, 0, (w_hi - w_lo) * VL * sizeof(acc_t));
      if (raw) std::memset(raw + j * stride, 0, (w_hi - w_lo) * VL * sizeof(acc_t));
    }
    return;
  }
  const int64_t C = g.C, c0 = g0 * VL;
  const int64_t nc = std::min(ng * VL, C - c0), full = nc / VL;  // valid channels; groups all valid
  const bool affine = aff != nullptr && aff->on;
  src += ((n * g.H + h) * g.W + w_lo) * C + c0;
  const bool prefetch = prefetch_next && h + 1 < g.H;
  const int64_t next_row = g.W * C, run_bytes = nc * int64_t(sizeof(scalar_t));
  for (int64_t w = w_lo; w < w_hi; ++w, src += C, dst += VL, raw += raw ? VL : 0) {
    if (prefetch)
      for (int64_t b = 0; b < run_bytes + 63; b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(src + next_row) + b);
    for (int64_t j = 0; j < full; ++j) {
      V v = load_as<acc_t>(src + j * VL);
      if (raw) Vec::store(raw + j * stride, v);
      if (affine) {
        const int64_t l = (g0 + j) * VL;
        v = Vec::load(&aff->sc[l]) * (v - Vec::load(&aff->ce[l])) + Vec::load(&aff->sh[l]);
      }
      Vec::store(dst + j * stride, v);
    }
    for (int64_t c = full * VL; c < nc; ++c) {  // the last group of a C that is not a multiple of VL
      const int64_t l = g0 * VL + c;
      const acc_t v = static_cast<acc_t>(src[c]);
      if (raw) raw[full * stride + c - full * VL] = v;
      dst[full * stride + c - full * VL] = affine ? aff->sc[l] * (v - aff->ce[l]) + aff->sh[l] : v;
    }
  }
}

// The inverse of read_row_groups (no affine): pixels [w_lo, w_hi) of row h of image n from src laid out
// [group][col][lane] (src is column w_lo of group g0) to a channels_last tensor, each pixel's groups as a run.
template <typename scalar_t, typename acc_t>
void write_row_groups(const PlaneGeom& g, scalar_t* dst, int64_t n, int64_t g0, int64_t ng, int64_t h, int64_t w_lo,
                      int64_t w_hi, const acc_t* src, int64_t stride) {
  using Vec = Simd<acc_t>;
  constexpr int VL = Vec::N;
  const int64_t C = g.C, c0 = g0 * VL;
  const int64_t nc = std::min(ng * VL, C - c0), full = nc / VL;
  dst += ((n * g.H + h) * g.W + w_lo) * C + c0;
  for (int64_t w = w_lo; w < w_hi; ++w, dst += C, src += VL) {
    for (int64_t j = 0; j < full; ++j) store_as<acc_t>(dst + j * VL, Vec::load(src + j * stride));
    for (int64_t c = full * VL; c < nc; ++c) dst[c] = static_cast<scalar_t>(src[full * stride + c - full * VL]);
  }
}

// Ring weights [group][tap][lane] (groups*VL lanes, zero past C); flip: w[k-1-i][k-1-j], the kernel of the
// transposed conv.
template <int K, typename acc_t, typename scalar_t>
AVec<acc_t> ring_weights(const PlaneGeom& g, const scalar_t* wp, bool flip) {
  constexpr int VL = Simd<acc_t>::N;
  AVec<acc_t> wt(g.groups * K * K * VL, acc_t(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int t = 0; t < K * K; ++t)
      wt[((c / VL) * K * K + t) * VL + c % VL] = static_cast<acc_t>(wp[c * K * K + (flip ? K * K - 1 - t : t)]);
  return wt;
}

// acc[a] += sum_{i,j} wj[i*K + j] * rows[i][w0 + a + j] for a < kRingTile: one register tile of a ring row's
// conv (rows[i]: padded row i of the window, column 0; lanes are channels), by sliding_taps.
template <int K, typename acc_t>
inline void ring_conv_tile(typename Simd<acc_t>::V (&acc)[kRingTile], const acc_t* const (&rows)[K], int64_t w0,
                           const acc_t* wj) {
  using Vec = Simd<acc_t>;
  constexpr int VL = Vec::N;
  const acc_t* rw[K];
  for (int i = 0; i < K; ++i) rw[i] = rows[i] + w0 * VL;
  sliding_taps<K, kRingTile>(
      acc, [&](int i, int u) { return Vec::load(rw[i] + u * VL); },
      [&](int i, int jj) { return Vec::load(wj + (i * K + jj) * VL); });
}

// What a ring pass emits per output row: the block's output (the eval block, and the training forward's
// apply pass), or the row's statistics of g = act(t) for the training forward's first pass.
enum class RingOut { kApply, kRowStats };

// kApply: y = u + scale*act(t) + shift with per-channel scale, shift (C values each).
// kRowStats: row_stats[(n*H + h)][0|1][lane] = mean and M2 of g over the W pixels of output row h of image n,
// per channel lane (groups*VL lanes), and g itself (in acc_t, channels_last like y) into g_out when given.
// Each row's pair comes from that row alone (the row is in the row buffer: two passes over it), so the
// statistics do not depend on the work split.
template <int K, RingOut OUT, typename scalar_t, typename acc_t, int A>
void ring_k(const PlaneGeom& g, const RingGeom& s, const scalar_t* xp, const scalar_t* wp, const scalar_t* bp,
            const acc_t* scalep, const acc_t* shiftp, const ChannelAffine<acc_t>& affp, scalar_t* yp,
            acc_t* row_stats, acc_t* g_out) {
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int VL = Vec::N, WB = kRingTile;
  constexpr bool apply = OUT == RingOut::kApply;
  const bool emit = apply || g_out != nullptr;  // rows go out: y (kApply) or g (kRowStats)
  const int64_t G = g.groups, pl = g.pl, W = g.W, Wp = s.Wp;
  // Weights [group][tap][lane]; bias, BN scale/shift and the input affine per lane.
  const AVec<acc_t> wt = ring_weights<K, acc_t>(g, wp, false);
  const AVec<acc_t> bias = channel_lanes<acc_t>(g, bp);
  AVec<acc_t> scale(G * VL, acc_t(0)), shift(G * VL, acc_t(0));
  if (apply) {
    scale = channel_lanes<acc_t>(g, scalep);
    shift = channel_lanes<acc_t>(g, shiftp);
  }
  const LaneAffine<acc_t> laff(g, affp);
  // K + 1 ring slots: while output row h is computed from input rows h - pl .. h - pl + K - 1, the next
  // input row is read into the spare slot, a slice after each group, and the previous output row goes out
  // to y the same way, so that their memory traffic overlaps the FMAs instead of stalling between rows.
  constexpr int SLOTS = K + 1;
  const int64_t ring_plane = SLOTS * Wp * VL, slot_len = Wp * VL, out_plane = W * VL;
  at::parallel_for(0, g.N * s.blocks * s.chunks, 1, [&](int64_t begin, int64_t end) {
    AVec<acc_t> ring(s.GB * ring_plane, acc_t(0)), out(2 * s.GB * out_plane, acc_t(0));
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t chunk = idx % s.chunks, blk = idx / s.chunks % s.blocks, n = idx / (s.chunks * s.blocks);
      const int64_t g0 = blk * s.GB, ng = std::min(s.GB, G - g0);
      const int64_t h_begin = chunk * s.RS, h_end = std::min(g.H, h_begin + s.RS);
      auto slot_of = [](int64_t h) { return ((h % SLOTS) + SLOTS) % SLOTS; };
      // Pixels [w_lo, w_hi) of input row h (any integer) into its ring slot: u, or zeros outside the
      // image. The slot's halo columns are never written, so they stay zero from the allocation.
      auto load_row = [&](int64_t h, int64_t w_lo, int64_t w_hi) {
        read_row_groups<scalar_t, acc_t>(g, xp, &laff, n, g0, ng, h, w_lo, w_hi,
                                         ring.data() + slot_of(h) * slot_len + (pl + w_lo) * VL, ring_plane);
      };
      // Pixels [w_lo, w_hi) of output row h from its row buffer to y (or g_out).
      auto store_row = [&](int64_t h, int64_t w_lo, int64_t w_hi) {
        const acc_t* src = out.data() + (h & 1) * s.GB * out_plane + w_lo * VL;
        if constexpr (apply)
          write_row_groups<scalar_t, acc_t>(g, yp, n, g0, ng, h, w_lo, w_hi, src, out_plane);
        else
          write_row_groups<acc_t, acc_t>(g, g_out, n, g0, ng, h, w_lo, w_hi, src, out_plane);
      };
      for (int64_t h = h_begin - pl; h < h_begin - pl + K; ++h) load_row(h, 0, W);
      for (int64_t h = h_begin; h < h_end; ++h) {
        const bool load_next = h + 1 < h_end, store_prev = emit && h > h_begin;
        for (int64_t j = 0; j < ng; ++j) {
          const int64_t l0 = (g0 + j) * VL;
          const acc_t* wj = wt.data() + (g0 + j) * K * K * VL;
          const V bv = Vec::load(&bias[l0]), scv = Vec::load(&scale[l0]), shv = Vec::load(&shift[l0]);
          const acc_t* rj = ring.data() + j * ring_plane;
          const acc_t* rows[K];  // input rows h - pl + i of this group
          for (int i = 0; i < K; ++i) rows[i] = rj + slot_of(h - pl + i) * slot_len;
          const acc_t* res = rows[pl] + pl * VL;  // u at (h, 0)
          acc_t* o = out.data() + ((h & 1) * s.GB + j) * out_plane;
          for (int64_t w0 = 0; w0 < W; w0 += WB) {
            V acc[WB];
            for (int a = 0; a < WB; ++a) acc[a] = bv;
            ring_conv_tile<K, acc_t>(acc, rows, w0, wj);
            alignas(64) acc_t t[WB][VL];
            for (int a = 0; a < WB; ++a) Vec::store(t[a], acc[a]);
            acc_t* tt = &t[0][0];
            for (int e = 0; e < WB * VL; ++e) tt[e] = act_forward<A>(tt[e]);
            const int nw = static_cast<int>(std::min<int64_t>(WB, W - w0));
            for (int a = 0; a < nw; ++a) {
              if constexpr (apply)
                Vec::store(o + (w0 + a) * VL, Vec::load(res + (w0 + a) * VL) + scv * Vec::load(t[a]) + shv);
              else
                Vec::store(o + (w0 + a) * VL, Vec::load(t[a]));
            }
          }
          if constexpr (!apply) {  // the row's mean, then its M2 about that mean (the row is in L1)
            V sum = Vec::broadcast(acc_t(0));
            for (int64_t w = 0; w < W; ++w) sum = sum + Vec::load(o + w * VL);
            const V mean = sum * Vec::broadcast(acc_t(1) / static_cast<acc_t>(W));
            V m2 = Vec::broadcast(acc_t(0));
            for (int64_t w = 0; w < W; ++w) {
              const V d = Vec::load(o + w * VL) - mean;
              m2 = m2 + d * d;
            }
            acc_t* rs = row_stats + (n * g.H + h) * 2 * G * VL + (g0 + j) * VL;
            Vec::store(rs, mean);
            Vec::store(rs + G * VL, m2);
          }
          // Slice j of the memory traffic around this row (see SLOTS).
          const int64_t w_lo = W * j / ng, w_hi = W * (j + 1) / ng;
          if (load_next) load_row(h + 1 - pl + K - 1, w_lo, w_hi);
          if (store_prev) store_row(h - 1, w_lo, w_hi);
        }
      }
      if (emit) store_row(h_end - 1, 0, W);
    }
  });
}

// A channels_last ring pass for k <= 9; returns false for larger k (callers take the plane path).
template <RingOut OUT, typename scalar_t, typename acc_t, int A>
bool ring_pass(const PlaneGeom& g, const scalar_t* xp, const scalar_t* wp, const scalar_t* bp, const acc_t* scalep,
               const acc_t* shiftp, const ChannelAffine<acc_t>& affp, scalar_t* yp, acc_t* row_stats,
               acc_t* g_out = nullptr) {
  const RingGeom s = make_ring_geom<acc_t>(g);
  return dispatch_k(g.k, [&](auto KC) {
    ring_k<decltype(KC)::value, OUT, scalar_t, acc_t, A>(g, s, xp, wp, bp, scalep, shiftp, affp, yp, row_stats,
                                                         g_out);
  });
}

// The training forward's BN apply in channels_last from the g that pass 1 left (acc_t; for an acc_t y, y
// itself): y = u + scale*g + shift, u = x through the input affine when there is one, the same expressions
// and the same rounding of y as the ring's apply.
template <typename scalar_t, typename acc_t>
void apply_bn_over_g(const PlaneGeom& g, const scalar_t* xp, const ChannelAffine<acc_t>& aff, const acc_t* scale,
                     const acc_t* shift, const acc_t* gp, scalar_t* yp) {
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int VL = Vec::N;
  const int64_t C = g.C, P = g.N * g.HW, full = C / VL * VL;
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* x = xp + p * C;
      const acc_t* gv = gp + p * C;
      scalar_t* y = yp + p * C;
      for (int64_t c = 0; c < full; c += VL) {
        V u = load_as<acc_t>(x + c);
        if (aff.scale) u = Vec::load(aff.scale + c) * (u - Vec::load(aff.center + c)) + Vec::load(aff.shift + c);
        store_as<acc_t>(y + c, u + Vec::load(scale + c) * Vec::load(gv + c) + Vec::load(shift + c));
      }
      for (int64_t c = full; c < C; ++c) {
        acc_t u = static_cast<acc_t>(x[c]);
        if (aff.scale) u = aff.scale[c] * (u - aff.center[c]) + aff.shift[c];
        y[c] = static_cast<scalar_t>(u + scale[c] * gv[c] + shift[c]);
      }
    }
  });
}

// Per-thread working memory, allocated once per parallel chunk (zeroed once: halos and lane padding
// are never written afterwards).
template <typename acc_t, bool CL>
struct Scratch {
  AVec<acc_t> pad, plane, aux, batch;
  Scratch(const PlaneGeom& g, bool need_batch) {
    constexpr int CB = TileShape<acc_t, CL>::CB;
    const int64_t len = plane_len<acc_t, CL>(g);
    pad.assign(g.buf_h * g.buf_w * CB, acc_t(0));
    plane.assign(len, acc_t(0));
    aux.assign(len, acc_t(0));
    if (need_batch) batch.assign(g.N * len, acc_t(0));
  }
};

template <typename scalar_t, bool CL>
void forward_impl(const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                  const at::Tensor& in_shift, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
                  const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats, double eps,
                  int64_t act, at::Tensor& y, at::Tensor& var, bool stats_only = false) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CB = TileShape<acc_t, CL>::CB, VL = Simd<acc_t>::N;
  const PlaneGeom g = make_geom<acc_t, CL>(x, weight.size(2));
  const int64_t len = plane_len<acc_t, CL>(g);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias.const_data_ptr<scalar_t>();
  const acc_t* gp = gamma.const_data_ptr<acc_t>();
  const acc_t* betap = beta.const_data_ptr<acc_t>();
  acc_t* meanp = mean.data_ptr<acc_t>();
  acc_t* rstdp = rstd.data_ptr<acc_t>();
  acc_t* varp = batch_stats ? var.data_ptr<acc_t>() : nullptr;
  scalar_t* yp = stats_only ? nullptr : y.data_ptr<scalar_t>();
  const ChannelAffine<acc_t> affp = channel_affine<acc_t>(in_center, in_scale, in_shift);

  dispatch_act(act, [&](auto ACT) {
    constexpr int A = decltype(ACT)::value;
    // Per-lane BN affine: scale = gamma*rstd, shift = beta - mean*scale.
    auto affine = [&](int64_t group, AVec<acc_t>& scale, AVec<acc_t>& shift) {
      const auto ga = group_lanes<acc_t, CL>(g, gp, group), be = group_lanes<acc_t, CL>(g, betap, group);
      const auto mu = group_lanes<acc_t, CL>(g, meanp, group), rs = group_lanes<acc_t, CL>(g, rstdp, group);
      scale.resize(VL);
      shift.resize(VL);
      for (int l = 0; l < VL; ++l) {
        scale[l] = ga[l] * rs[l];
        shift[l] = be[l] - mu[l] * scale[l];
      }
    };
    // y = x + scale*g + shift on one plane (xb: the plane of x, dense; overwritten with y).
    auto apply = [&](acc_t* xb, const acc_t* gv, const acc_t* scale, const acc_t* shift) {
      for (int64_t e = 0; e < len; e += VL)
        for (int l = 0; l < VL; ++l) xb[e + l] = xb[e + l] + scale[l] * gv[e + l] + shift[l];
    };

    if (!batch_stats) {
      // Eval: planes are independent; one pass over x (the residual comes from the padded copy). In
      // channels_last a work item is kEvalGroups channel groups of one image, loaded and stored together
      // (load_padded_groups); each group's y goes to a dense plane first, then out with the others.
      constexpr int64_t G = CL ? kEvalGroups : 1;
      const int64_t blocks = (g.groups + G - 1) / G;
      const bool pairs = use_pair_dots<scalar_t, acc_t, CL>(g);  // bf16 pair dots instead of fp32 FMAs
      if constexpr (CL) {
        if (!pairs) {
          AVec<acc_t> sc(g.C), sh(g.C);  // y = u + sc*g + sh
          for (int64_t c = 0; c < g.C; ++c) {
            sc[c] = gp[c] * rstdp[c];
            sh[c] = betap[c] - meanp[c] * sc[c];
          }
          if (ring_pass<RingOut::kApply, scalar_t, acc_t, A>(g, xp, wp, bp, sc.data(), sh.data(), affp, yp, nullptr))
            return;
        }
      }
      at::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
        const int64_t pad_len = g.buf_h * g.buf_w * CB, pair_len = g.buf_h * g.buf_w;
        AVec<acc_t> pads(pairs ? 0 : G * pad_len, acc_t(0)), outs(CL ? G * len : 0), plane, aux;  // k > 9
        std::vector<Bf16Pairs> pair_pads(pairs ? G * pair_len : 0, Bf16Pairs{}), pair_wt[G];
        AVec<acc_t> scale[G], shift[G], in_lanes[G][3], wt[G], bv[G];
        InputAffine<acc_t> in_aff[G];
        int64_t cur = -1;
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t blk = idx / g.N, n = idx % g.N;  // block-major: weights reused across n
          const int64_t group0 = blk * G, ng = std::min<int64_t>(G, g.groups - group0);
          if (blk != cur) {
            for (int64_t j = 0; j < ng; ++j) {
              if constexpr (pair_dots_possible<scalar_t, acc_t, CL>()) {
                if (pairs) pair_wt[j] = group_pair_weights(g, wp, group0 + j);
              }
              if (!pairs) wt[j] = group_weights<scalar_t, acc_t, CL>(g, wp, group0 + j, false);
              bv[j] = group_lanes<acc_t, CL>(g, bp, group0 + j);
              affine(group0 + j, scale[j], shift[j]);
              in_aff[j] = group_input_affine<acc_t, CL>(g, affp, group0 + j, in_lanes[j]);
            }
            cur = blk;
          }
          if constexpr (pair_dots_possible<scalar_t, acc_t, CL>()) {
            if (pairs)
              load_pair_padded_groups(g, xp, n, group0, ng, g.pl, pair_pads.data(), pair_len, in_aff);
          }
          if (!pairs) load_padded_groups<scalar_t, acc_t, CL>(g, xp, n, group0, ng, g.pl, pads.data(), pad_len, in_aff);
          for (int64_t j = 0; j < ng; ++j) {
            const int64_t group = group0 + j;
            // y = x + scale*act(t) + shift straight from each register tile, x from the padded copy.
            const acc_t* pad = pairs ? nullptr : pads.data() + j * pad_len;
            const Bf16Pairs* pair_pad = pairs ? pair_pads.data() + j * pair_len : nullptr;
            // x at (h, w) as a vector of channels_last lanes (the low half of a pair: see load_pair_padded_groups).
            auto residual = [&](int64_t h, int64_t w) {
              if constexpr (pair_dots_possible<scalar_t, acc_t, CL>()) {
                if (pairs) return low_bf16_as_float(pair_pad[(h + g.pl) * g.buf_w + w + g.pl]);
              }
              return Simd<acc_t>::load(pad + ((h + g.pl) * g.buf_w + w + g.pl) * CB);
            };
            const acc_t* sc = scale[j].data();
            const acc_t* sh = shift[j].data();
            acc_t* out = CL ? outs.data() + j * len : nullptr;
            scalar_t* yplane = yp + elem_offset<CL>(g, n, group * CB, 0);
            auto epilogue = [&](int64_t h0, int64_t w0, auto& acc) {
              constexpr int NACC = sizeof(acc) / sizeof(acc[0]);
              acc_t t[NACC][VL];
              for (int a = 0; a < NACC; ++a) Simd<acc_t>::store(t[a], acc[a]);
              if constexpr (CL) {
                // Vectors (y, x and the affine are all acc_t: a scalar loop could not rule out aliasing).
                // act over the whole tile as one flat loop, which vectorizes: per-pixel 16-lane loops
                // were unrolled into scalar stores that the next vector load waited on (store forwarding).
                using Vec = Simd<acc_t>;
                const auto scv = Vec::load(sc), shv = Vec::load(sh);
                acc_t* tt = &t[0][0];
                for (int e = 0; e < NACC * VL; ++e) tt[e] = act_forward<A>(tt[e]);
                for (int w = 0; w < NACC && w0 + w < g.W; ++w) {
                  const auto xr = residual(h0, w0 + w);
                  Vec::store(out + (h0 * g.W + w0 + w) * CB, xr + scv * Vec::load(t[w]) + shv);
                }
              } else {
                const int64_t nw = std::min<int64_t>(VL, g.W - w0);
                const acc_t a0 = sc[0], b0 = sh[0];
                for (int r = 0; r < NACC && h0 + r < g.H; ++r) {
                  const acc_t* xr = pad + (h0 + r + g.pl) * g.buf_w + w0 + g.pl;
                  scalar_t* yo = yplane + (h0 + r) * g.W + w0;
                  if (nw == VL) {
                    for (int l = 0; l < VL; ++l) yo[l] = static_cast<scalar_t>(xr[l] + a0 * act_forward<A>(t[r][l]) + b0);
                  } else {
                    for (int64_t l = 0; l < nw; ++l) yo[l] = static_cast<scalar_t>(xr[l] + a0 * act_forward<A>(t[r][l]) + b0);
                  }
                }
              }
            };
            if constexpr (pair_dots_possible<scalar_t, acc_t, CL>()) {
              if (pairs) {
                conv_tiles_pairs(g, pair_pad, pair_wt[j].data(), bv[j].data(), epilogue);
                continue;
              }
            }
            if (conv_tiles<acc_t, CL>(g, pad, wt[j].data(), bv[j].data(), epilogue)) continue;
            // k > 9: plane by plane.
            plane.resize(len);
            aux.resize(len);
            conv_plane_generic<acc_t, CL>(g, pad, wt[j].data(), bv[j].data(), plane.data());
            for (int64_t e = 0; e < len; ++e) plane[e] = act_forward<A>(plane[e]);
            padded_to_plane<acc_t, CL>(g, pad, g.pl, aux.data());
            apply(aux.data(), plane.data(), sc, sh);
            if constexpr (CL)
              std::copy(aux.begin(), aux.end(), outs.begin() + j * len);
            else
              scatter_plane<scalar_t, acc_t, CL>(g, aux.data(), n, group, yp);
          }
          if constexpr (CL) scatter_planes<scalar_t, acc_t, CL>(g, outs.data(), len, n, group0, ng, yp);
        }
      });
      return;
    }

    const int64_t M = g.N * g.HW;
    if constexpr (CL) {
      // Training in channels_last, k <= 9: one ring pass (ring_k) reading x once as a stream gives g and every
      // output row's mean and M2 of g; those are merged here per channel in row order (Chan, in double: the
      // same result for any thread count); an elementwise pass then applies the BN to the kept g. The plane
      // path below read each channel group of x with a stride of C elements three times (conv, and the
      // apply's gather and scatter).
      if (g.k <= 9) {
        const int64_t lanes = g.groups * VL, rows = g.N * g.H;
        AVec<acc_t> row_stats(rows * 2 * lanes);
        // Pass 1 also leaves g (in acc_t: in y itself where y is acc_t, else in a scratch as large as y in
        // acc_t), and the apply is one elementwise pass instead of a second conv pass.
        constexpr bool g_in_y = std::is_same_v<scalar_t, acc_t>;
        AVecU<acc_t> g_scratch(g_in_y || stats_only ? 0 : M * g.C);
        acc_t* g_keep = stats_only ? nullptr : g_in_y ? reinterpret_cast<acc_t*>(yp) : g_scratch.data();
        ring_pass<RingOut::kRowStats, scalar_t, acc_t, A>(g, xp, wp, bp, nullptr, nullptr, affp, nullptr,
                                                          row_stats.data(), g_keep);
        std::vector<Welford<double>> st(lanes);
        at::parallel_for(0, g.groups, 1, [&](int64_t begin, int64_t end) {
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t* rs = row_stats.data() + r * 2 * lanes;
            for (int64_t l = begin * VL; l < end * VL; ++l) st[l].merge(double(g.W), rs[l], rs[lanes + l]);
          }
        });
        AVec<acc_t> sc(g.C), sh(g.C);
        for (int64_t c = 0; c < g.C; ++c) {
          const double v = st[c].m2 / static_cast<double>(M);
          meanp[c] = static_cast<acc_t>(st[c].mean);
          varp[c] = static_cast<acc_t>(v);
          rstdp[c] = static_cast<acc_t>(1.0 / std::sqrt(v + eps));
          sc[c] = gp[c] * rstdp[c];
          // the unrounded mean: the acc_t one is off by up to ulp(mean)/2 (see the plane path's shift)
          sh[c] = static_cast<acc_t>(betap[c] - st[c].mean * sc[c]);
        }
        if (stats_only) return;
        apply_bn_over_g<scalar_t, acc_t>(g, xp, affp, sc.data(), sh.data(), g_keep, yp);
        return;
      }
    }
    // Training: each thread owns whole channel groups; g of the whole batch stays in its scratch.
    at::parallel_for(0, g.groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t, CL> s(g, true);
      AVec<acc_t> scale, shift, in_lanes[3];
      for (int64_t group = begin; group < end; ++group) {
        const auto wt = group_weights<scalar_t, acc_t, CL>(g, wp, group, false);
        const auto bv = group_lanes<acc_t, CL>(g, bp, group);
        const InputAffine<acc_t> in_aff = group_input_affine<acc_t, CL>(g, affp, group, in_lanes);
        acc_t* G = s.batch.data();
        double sum[VL] = {0}, m2[VL] = {0};
        for (int64_t n = 0; n < g.N; ++n) {
          load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data(), in_aff);
          acc_t* gn = G + n * len;
          conv_plane<acc_t, CL>(g, s.pad.data(), wt.data(), bv.data(), gn);
          acc_t part[VL] = {0};
          for (int64_t e = 0; e < g.HW * CB; e += VL)  // lanes past H*W*CB (NCHW) stay out of the sums
            for (int l = 0; l < VL; ++l) {
              gn[e + l] = act_forward<A>(gn[e + l]);
              part[l] += (e + l < g.HW * CB) ? gn[e + l] : acc_t(0);
            }
          reduce_lanes<acc_t, CL>(part, sum);
        }
        // Exact two-pass statistics over the cached g.
        AVec<acc_t> mu(VL);
        for (int l = 0; l < VL; ++l) mu[l] = static_cast<acc_t>(sum[CL ? l : 0] / static_cast<double>(M));
        for (int64_t n = 0; n < g.N; ++n) {
          const acc_t* gn = G + n * len;
          acc_t part[VL] = {0};
          for (int64_t e = 0; e < g.HW * CB; e += VL)
            for (int l = 0; l < VL; ++l) {
              const acc_t d = (e + l < g.HW * CB) ? gn[e + l] - mu[l] : acc_t(0);
              part[l] += d * d;
            }
          reduce_lanes<acc_t, CL>(part, m2);
        }
        for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c) {
          const int64_t ch = group * CB + c;
          const double v = m2[c] / static_cast<double>(M);
          meanp[ch] = mu[c];
          varp[ch] = static_cast<acc_t>(v);
          rstdp[ch] = static_cast<acc_t>(1.0 / std::sqrt(v + eps));
        }
        if (stats_only) continue;  // synchronized BN: the apply runs later with the global statistics
        affine(group, scale, shift);
        // shift = beta - mean*scale with the unrounded mean: the acc_t mean is off by up to ulp(mean)/2,
        // an output error of scale*ulp(mean)/2 when |mean| >> std (the backward's delta, see backward_impl).
        const auto be = group_lanes<acc_t, CL>(g, betap, group);
        for (int l = 0; l < VL; ++l)
          shift[l] = static_cast<acc_t>(be[l] - sum[CL ? l : 0] / static_cast<double>(M) * scale[l]);
        for (int64_t n = 0; n < g.N; ++n) {
          gather_plane<scalar_t, acc_t, CL>(g, xp, n, group, s.aux.data(), in_aff);
          apply(s.aux.data(), G + n * len, scale.data(), shift.data());
          scatter_plane<scalar_t, acc_t, CL>(g, s.aux.data(), n, group, yp);
        }
      }
    });
  });
}

// Per-channel coefficients of the backward's  dt = a*(dy - c1 - ghat*c2)*act'(t),  ghat = ((g - mean) - dl)*rstd.
// From this call's sums (sdy = sum dy, sdyg = sum dy*(g - mean)*rstd, sgc = sum (g - mean) over the M values of
// the channel): training c1 = mean(dy), c2 = mean(dy*ghat); eval c1 = c2 = 0. `recentre`: dl = sgc/M, the
// distance of the saved (rounded) mean from the exact mean of g (see backward_impl's pass 1); sdyg is
// corrected in place to sum(dy*ghat). Under synchronized BN dm holds the global [mean dy, mean dy*ghat, dl*rstd]
// at stride C (the local sums are then unused).
template <typename acc_t>
struct DtCoefs {
  acc_t a, c1, c2, dl;
};
template <typename acc_t>
DtCoefs<acc_t> dt_coefs(double sdy, double& sdyg, double sgc, int64_t M, acc_t gamma, acc_t rstd, bool batch_stats,
                        bool recentre, const acc_t* dm, int64_t C) {
  DtCoefs<acc_t> k;
  k.a = gamma * rstd;
  if (dm != nullptr) {
    k.c1 = dm[0];
    k.c2 = dm[C];
    k.dl = rstd != acc_t(0) ? dm[2 * C] / rstd : acc_t(0);  // g units
    return k;
  }
  const double delta = (batch_stats && recentre) ? sgc / static_cast<double>(M) : 0.0;
  sdyg -= delta * static_cast<double>(rstd) * sdy;
  k.c1 = batch_stats ? static_cast<acc_t>(sdy / static_cast<double>(M)) : acc_t(0);
  k.c2 = batch_stats ? static_cast<acc_t>(sdyg / static_cast<double>(M)) : acc_t(0);
  k.dl = static_cast<acc_t>(delta);
  return k;
}

// Pointers of one backward call (the tensors of backward_impl).
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t *dy, *x, *w, *b;
  const acc_t *gamma, *mean, *rstd;
  const acc_t* dm;  // synchronized BN's (3, C) global means, or null
  ChannelAffine<acc_t> aff;
  bool batch_stats;
  scalar_t *dx, *dw, *db;
  acc_t *dgamma, *dbeta, *dscale, *dshift;
  acc_t* reduce;  // reduce only: the (3, C) local sums [sum dy, sum dy*ghat, sum ghat]; no pass 2
};

// ---- channels_last backward on rings (k <= 9) --------------------------------------------------------
// A work item is a block of GB channel groups across the whole batch, so every per-channel reduction runs in
// one thread in (n, h, w) order, as on the plane path: the result does not depend on the thread count or GB.
// Rows are read as whole-pixel runs of the block's channels (read_row_groups), never one group at a stride of
// C elements.
//   pass 1, per row h: t = b + conv(u ring) into the item's t buffer (N*H*W values per lane); per-image fp32
//           sums of dy, dy*(g - mean)*rstd and g - mean per lane, added into double at the end of each image.
//   pass 2, per row r: dt row r (dt_coefs) into a ring of K zero-haloed dt rows; db; dw[i][j] += sum_w dt[r][w]
//           * u[r - pl + i][w - pl + j] from the u ring, which holds exactly the rows t[r] came from; then
//           du row h = r - pl = conv(dt rows h - pr .. h + pl, flipped w), and dx = dy + du (times the
//           input affine's scale, whose gradients take du*(x - center) and du). pl rows past the image close
//           it with zero dt rows. dy rows wait in a ring of pl + 1 for their dx row, and with an input affine
//           the raw x rows ride in a ring beside u's: pass 2 reads x and dy once each.
// Per-image fp32 partials then double, in the plane path's order, so the ring and the plane path agree to
// rounding. GELU: pass 1 keeps g = act(t) and act'(t) (two buffers) instead of t, so pass 2 evaluates no
// activation (it is compute-bound: its act and act' were ~30% of the kernel); ReLU's are a compare, t is kept.
constexpr int64_t kRingBackwardTBytes = int64_t(64) << 20;  // t buffer of one item, unless one group needs more
constexpr int kDwTaps = 8;  // dt values per sliding window of the weight gradient (round_up(W, 8) <= ring row)

template <int K, typename scalar_t, typename acc_t, int A>
void ring_backward_k(const PlaneGeom& g, const BackwardArgs<scalar_t, acc_t>& p) {
  using Vec = Simd<acc_t>;
  using V = typename Vec::V;
  constexpr int VL = Vec::N, WB = kRingTile, USLOTS = K + 1;
  const int64_t G = g.groups, C = g.C, N = g.N, H = g.H, W = g.W, pl = g.pl, pr = K - 1 - pl, M = N * g.HW;
  const int64_t Wp = round_up(W, WB) + K - 1;
  const int64_t uplane = USLOTS * Wp * VL, dplane = K * Wp * VL, slot = Wp * VL, rowlen = W * VL;
  // Channel blocks: two per thread where there are enough groups, within the L2 budget of the rings.
  // The t buffer (N*H*W values per lane) is the item's other memory; it is streamed, not cache-resident.
  const LaneAffine<acc_t> laff(g, p.aff);
  const int64_t DYSLOTS = pl + 1, xslots = laff.on ? USLOTS : 0;
  const int64_t group_bytes = ((USLOTS + xslots + K) * Wp + (DYSLOTS + 1) * W) * VL * int64_t(sizeof(acc_t));
  constexpr bool kKeepGrad = A != kRelu;  // pass 1 leaves g and act'(t) for pass 2 (see above)
  const int64_t t_bytes = (kKeepGrad ? 2 : 1) * N * g.HW * VL * int64_t(sizeof(acc_t));
  const int64_t per_thread = (G + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t GB = std::clamp<int64_t>(
      std::min({per_thread, kRingBufferBytes / group_bytes, kRingBackwardTBytes / std::max<int64_t>(t_bytes, 1)}), 1, G);
  const int64_t blocks = (G + GB - 1) / GB;
  const AVec<acc_t> wt = ring_weights<K, acc_t>(g, p.w, false), wflip = ring_weights<K, acc_t>(g, p.w, true);
  const AVec<acc_t> bias = channel_lanes<acc_t>(g, p.b), mu = channel_lanes<acc_t>(g, p.mean);
  const AVec<acc_t> rs = channel_lanes<acc_t>(g, p.rstd), ga = channel_lanes<acc_t>(g, p.gamma);
  auto uslot = [](int64_t h) { return ((h % USLOTS) + USLOTS) % USLOTS; };
  auto dslot = [](int64_t h) { return ((h % K) + K) % K; };
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t g0 = blk * GB, ng = std::min(GB, G - g0), L = ng * VL, l0 = g0 * VL;
      AVec<acc_t> ur(ng * uplane, acc_t(0)), xring(laff.on ? ng * uplane : 0, acc_t(0)), dr(ng * dplane, acc_t(0));
      AVecU<acc_t> tb(N * H * ng * rowlen), gb(kKeepGrad ? N * H * ng * rowlen : 0);  // written in full by pass 1
      AVec<acc_t> dyr(DYSLOTS * ng * rowlen), dxr(ng * rowlen);
      // with_raw: the raw x rows into xring too (pass 2 with an input affine; pass 1 needs only u).
      auto load_u = [&](int64_t n, int64_t h, int64_t w_lo, int64_t w_hi, bool with_raw = false) {
        const int64_t o = uslot(h) * slot + (pl + w_lo) * VL;
        read_row_groups<scalar_t, acc_t>(g, p.x, &laff, n, g0, ng, h, w_lo, w_hi, ur.data() + o, uplane,
                                         with_raw ? xring.data() + o : nullptr, true);
      };
      auto dy_row = [&](int64_t h) { return dyr.data() + (h % DYSLOTS) * ng * rowlen; };
      // t (ReLU) or g (GELU) of row h, group j; and act'(t) beside it (GELU)
      auto t_row = [&](int64_t n, int64_t h, int64_t j) { return tb.data() + ((n * H + h) * ng + j) * rowlen; };
      auto dact_row = [&](int64_t n, int64_t h, int64_t j) { return gb.data() + ((n * H + h) * ng + j) * rowlen; };
      // Pass 1.
      std::vector<double> sdy(L, 0.0), sdyg(L, 0.0), sgc(L, 0.0);
      for (int64_t n = 0; n < N; ++n) {
        AVec<acc_t> p1(L, acc_t(0)), p2(L, acc_t(0)), p3(L, acc_t(0));
        for (int64_t h = -pl; h < K - pl; ++h) load_u(n, h, 0, W);
        for (int64_t h = 0; h < H; ++h) {
          if (!p.dm)
            read_row_groups<scalar_t, acc_t>(g, p.dy, nullptr, n, g0, ng, h, 0, W, dyr.data(), rowlen, nullptr, true);
          for (int64_t j = 0; j < ng; ++j) {
            const int64_t l = l0 + j * VL;
            const acc_t* wj = wt.data() + (g0 + j) * K * K * VL;
            const acc_t* rows[K];
            for (int i = 0; i < K; ++i) rows[i] = ur.data() + j * uplane + uslot(h - pl + i) * slot;
            acc_t* tr = t_row(n, h, j);
            for (int64_t w0 = 0; w0 < W; w0 += WB) {
              V acc[WB];
              for (int a = 0; a < WB; ++a) acc[a] = Vec::load(&bias[l]);
              ring_conv_tile<K, acc_t>(acc, rows, w0, wj);
              const int nw = static_cast<int>(std::min<int64_t>(WB, W - w0));
              for (int a = 0; a < nw; ++a) Vec::store(tr + (w0 + a) * VL, acc[a]);
            }
            if constexpr (kKeepGrad) {
              acc_t* da = dact_row(n, h, j);
              for (int64_t e = 0; e < rowlen; ++e) {
                const ActGrad<acc_t> ag = act_with_grad<A>(tr[e]);
                tr[e] = ag.g;
                da[e] = ag.dg;
              }
            }
            if (!p.dm) {
              const acc_t* d = dyr.data() + j * rowlen;
              const V mv = Vec::load(&mu[l]), rv = Vec::load(&rs[l]);
              V s1 = Vec::load(&p1[j * VL]), s2 = Vec::load(&p2[j * VL]), s3 = Vec::load(&p3[j * VL]);
              for (int64_t w = 0; w < W; ++w) {
                const V tv = Vec::load(tr + w * VL), dv = Vec::load(d + w * VL);
                const V gc = (kKeepGrad ? tv : act_lanes<A, false, acc_t>(tv)) - mv;
                s1 = s1 + dv;
                s2 = s2 + dv * (gc * rv);
                s3 = s3 + gc;
              }
              Vec::store(&p1[j * VL], s1);
              Vec::store(&p2[j * VL], s2);
              Vec::store(&p3[j * VL], s3);
            }
            // Slice j of the next input row (see ring_k's SLOTS).
            if (h + 1 < H) load_u(n, h + K - pl, W * j / ng, W * (j + 1) / ng);
          }
        }
        for (int64_t c = 0; c < L; ++c) {
          sdy[c] += p1[c];
          sdyg[c] += p2[c];
          sgc[c] += p3[c];
        }
      }
      const int64_t nc = std::min(L, C - l0);  // valid channels of the block
      if (p.reduce) {
        for (int64_t c = 0; c < nc; ++c) {
          p.reduce[l0 + c] = static_cast<acc_t>(sdy[c]);
          p.reduce[C + l0 + c] = static_cast<acc_t>(sdyg[c]);
          p.reduce[2 * C + l0 + c] = static_cast<acc_t>(sgc[c] * static_cast<double>(rs[l0 + c]));
        }
        continue;
      }
      AVec<acc_t> af(L, acc_t(0)), c1(L, acc_t(0)), c2(L, acc_t(0)), dl(L, acc_t(0));
      for (int64_t c = 0; c < nc; ++c) {
        const DtCoefs<acc_t> k = dt_coefs<acc_t>(sdy[c], sdyg[c], sgc[c], M, ga[l0 + c], rs[l0 + c], p.batch_stats,
                                                 true, p.dm ? p.dm + l0 + c : nullptr, C);
        af[c] = k.a;
        c1[c] = k.c1;
        c2[c] = k.c2;
        dl[c] = k.dl;
      }
      // Pass 2.
      std::vector<double> dwacc(L * K * K, 0.0), dbacc(L, 0.0), dscacc(L, 0.0), dshacc(L, 0.0);
      for (int64_t n = 0; n < N; ++n) {
        AVec<acc_t> pdw(L * K * K, acc_t(0)), pdb(L, acc_t(0)), psc(L, acc_t(0)), psh(L, acc_t(0));
        for (int64_t j = 0; j < ng; ++j)  // dt rows before the image are zero
          std::fill(dr.begin() + j * dplane, dr.begin() + (j + 1) * dplane, acc_t(0));
        for (int64_t h = -pl; h < K - pl; ++h) load_u(n, h, 0, W, laff.on);
        for (int64_t r = 0; r < H + pl; ++r) {
          const bool in = r < H;
          if (in)
            read_row_groups<scalar_t, acc_t>(g, p.dy, nullptr, n, g0, ng, r, 0, W, dy_row(r), rowlen, nullptr, true);
          for (int64_t j = 0; j < ng; ++j) {
            acc_t* dt = dr.data() + j * dplane + dslot(r) * slot + pr * VL;  // dt[r][0]
            if (!in) {
              std::fill(dt, dt + rowlen, acc_t(0));
              continue;
            }
            const int64_t lj = j * VL;
            const acc_t* tr = t_row(n, r, j);
            const acc_t* da = kKeepGrad ? dact_row(n, r, j) : nullptr;
            const acc_t* d = dy_row(r) + j * rowlen;
            const V muv = Vec::load(&mu[l0 + lj]), dlv = Vec::load(&dl[lj]), rsv = Vec::load(&rs[l0 + lj]);
            const V afv = Vec::load(&af[lj]), c1v = Vec::load(&c1[lj]), c2v = Vec::load(&c2[lj]);
            V qb = Vec::load(&pdb[lj]);
            for (int64_t w = 0; w < W; ++w) {
              const V t = Vec::load(tr + w * VL);
              const V gv = kKeepGrad ? t : act_lanes<A, false, acc_t>(t);
              const V dact = kKeepGrad ? Vec::load(da + w * VL) : act_lanes<A, true, acc_t>(t);
              const V gh = ((gv - muv) - dlv) * rsv;
              const V v = afv * (Vec::load(d + w * VL) - c1v - gh * c2v) * dact;
              Vec::store(dt + w * VL, v);
              qb = qb + v;
            }
            Vec::store(&pdb[lj], qb);
            // dw[i][jj] += sum_w dt[w] * u_i[w + jj]: a sliding window along the row with the dt values as
            // its taps (8 at a time), so each u vector is loaded once per 8 dt values instead of once per
            // FMA (meant to relieve the loads; no time change was measurable when it came in). dt is zero past W
            // up to the ring row's end.
            for (int i = 0; i < K; ++i) {
              const acc_t* u = ur.data() + j * uplane + uslot(r - pl + i) * slot;
              acc_t* q = &pdw[(j * K * K + i * K) * VL];
              V acc[K];
              for (int jj = 0; jj < K; ++jj) acc[jj] = Vec::load(q + jj * VL);
              for (int64_t w0 = 0; w0 < W; w0 += kDwTaps)
                sliding_window<1, kDwTaps, K, 1>(
                    acc, [&](int, int v) { return Vec::load(u + (w0 + v) * VL); },
                    [&](int, int sx) { return Vec::load(dt + (w0 + sx) * VL); }, [](V a, V d, V v) { return a + d * v; });
              for (int jj = 0; jj < K; ++jj) Vec::store(q + jj * VL, acc[jj]);
            }
            if (r + 1 < H) load_u(n, r + K - pl, W * j / ng, W * (j + 1) / ng, laff.on);
          }
          // The dx row whose dt rows are all in the ring now. Its u (and raw x) row is too: the loads above
          // filled row r + K - pl, whose slot held row h - 1.
          const int64_t h = r - pl;
          if (h < 0) continue;
          for (int64_t j = 0; j < ng; ++j) {
            const int64_t lj = j * VL, l = l0 + lj;
            const acc_t* wj = wflip.data() + (g0 + j) * K * K * VL;
            const acc_t* rows[K];  // dt rows h - pr + i, column 0 of the padded row
            for (int i = 0; i < K; ++i) rows[i] = dr.data() + j * dplane + dslot(h - pr + i) * slot;
            const acc_t* d = dy_row(h) + j * rowlen;
            acc_t* o = dxr.data() + j * rowlen;
            for (int64_t w0 = 0; w0 < W; w0 += WB) {
              V acc[WB] = {};
              ring_conv_tile<K, acc_t>(acc, rows, w0, wj);
              const int nw = static_cast<int>(std::min<int64_t>(WB, W - w0));
              for (int a = 0; a < nw; ++a) Vec::store(o + (w0 + a) * VL, Vec::load(d + (w0 + a) * VL) + acc[a]);
            }
            if (laff.on) {
              // u = scale*(x - center) + shift:  dx = scale*du,  dscale = sum(du*(x - center)),  dshift = sum(du)
              const acc_t* xv = xring.data() + j * uplane + uslot(h) * slot + pl * VL;
              const V cev = Vec::load(&laff.ce[l]), scv = Vec::load(&laff.sc[l]);
              V qs = Vec::load(&psc[lj]), qh = Vec::load(&psh[lj]);
              for (int64_t w = 0; w < W; ++w) {
                const V du = Vec::load(o + w * VL);
                qs = qs + du * (Vec::load(xv + w * VL) - cev);
                qh = qh + du;
                Vec::store(o + w * VL, scv * du);
              }
              Vec::store(&psc[lj], qs);
              Vec::store(&psh[lj], qh);
            }
          }
          write_row_groups<scalar_t, acc_t>(g, p.dx, n, g0, ng, h, 0, W, dxr.data(), rowlen);
        }
        for (int64_t c = 0; c < L; ++c) {
          dbacc[c] += pdb[c];
          dscacc[c] += psc[c];
          dshacc[c] += psh[c];
        }
        for (int64_t e = 0; e < L * K * K; ++e) dwacc[e] += pdw[e];
      }
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t ch = l0 + c, j = c / VL, lane = c % VL;
        for (int t = 0; t < K * K; ++t) p.dw[ch * K * K + t] = static_cast<scalar_t>(dwacc[(j * K * K + t) * VL + lane]);
        p.db[ch] = static_cast<scalar_t>(dbacc[c]);
        if (!p.dm) {
          p.dgamma[ch] = static_cast<acc_t>(sdyg[c]);
          p.dbeta[ch] = static_cast<acc_t>(sdy[c]);
        }
        if (laff.on) {
          p.dscale[ch] = static_cast<acc_t>(dscacc[c]);
          p.dshift[ch] = static_cast<acc_t>(dshacc[c]);
        }
      }
    }
  });
}

// The channels_last backward on rings for k <= 9; returns false for larger k (callers take the plane path).
template <typename scalar_t, typename acc_t, int A>
bool ring_backward(const PlaneGeom& g, const BackwardArgs<scalar_t, acc_t>& p) {
  return dispatch_k(g.k, [&](auto KC) { ring_backward_k<decltype(KC)::value, scalar_t, acc_t, A>(g, p); });
}

template <typename scalar_t, bool CL>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                   const at::Tensor& in_shift, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                   const at::Tensor& dy_means, int64_t act, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias,
                   at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dscale, at::Tensor& dshift,
                   at::Tensor* reduce_out = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CB = TileShape<acc_t, CL>::CB, VL = Simd<acc_t>::N;
  const PlaneGeom g = make_geom<acc_t, CL>(x, weight.size(2));
  const int64_t kk = g.k * g.k, pr = g.k - 1 - g.pl, M = g.N * g.HW, len = plane_len<acc_t, CL>(g);
  const int64_t valid = g.HW * CB;  // NCHW planes end mid-vector; lanes past it are masked out of sums
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias.const_data_ptr<scalar_t>();
  const acc_t* gp = gamma.const_data_ptr<acc_t>();
  const acc_t* meanp = mean.const_data_ptr<acc_t>();
  const acc_t* rstdp = rstd.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  scalar_t* dwp = dweight.data_ptr<scalar_t>();
  scalar_t* dbp = dbias.data_ptr<scalar_t>();
  acc_t* dgp = dgamma.data_ptr<acc_t>();
  acc_t* dbetap = dbeta.data_ptr<acc_t>();
  const bool has_affine = in_scale.numel() > 0;
  const ChannelAffine<acc_t> affp = channel_affine<acc_t>(in_center, in_scale, in_shift);
  acc_t* dscp = has_affine ? dscale.data_ptr<acc_t>() : nullptr;
  acc_t* dshp = has_affine ? dshift.data_ptr<acc_t>() : nullptr;
  // Synchronized BN: dy_means (3, C) = the global [mean dy, mean dy*(ghat - dhat), dhat = mean ghat] (c1, c2 and
  // the recentring of ghat, in rstd units); the local sums are not output.
  const acc_t* dmp = dy_means.numel() ? dy_means.const_data_ptr<acc_t>() : nullptr;
  // reduce only: the (3, C) local sums [sum dy, sum dy*ghat, sum ghat]
  acc_t* redp = reduce_out ? reduce_out->data_ptr<acc_t>() : nullptr;

  dispatch_act(act, [&](auto ACT) {
    constexpr int A = decltype(ACT)::value;
    if constexpr (CL) {
      const BackwardArgs<scalar_t, acc_t> args{dyp, xp, wp, bp, gp, meanp, rstdp, dmp, affp, batch_stats,
                                               dxp, dwp, dbp, dgp, dbetap, dscp, dshp, redp};
      if (ring_backward<scalar_t, acc_t, A>(g, args)) return;
    }
    at::parallel_for(0, g.groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t, CL> s(g, true);
      AVec<acc_t> dtpad(s.pad.size(), acc_t(0));
      AVec<acc_t> xraw(has_affine ? plane_len<acc_t, CL>(g) : 0, acc_t(0));  // x before the affine
      AVec<acc_t> zero(VL, acc_t(0));
      for (int64_t group = begin; group < end; ++group) {
        const int64_t c0 = group * CB, cb = std::min<int64_t>(CB, g.C - c0);
        const auto wt = group_weights<scalar_t, acc_t, CL>(g, wp, group, false);
        const auto wflip = group_weights<scalar_t, acc_t, CL>(g, wp, group, true);
        const auto bv = group_lanes<acc_t, CL>(g, bp, group);
        const auto mu = group_lanes<acc_t, CL>(g, meanp, group);
        const auto rs = group_lanes<acc_t, CL>(g, rstdp, group);
        const auto ga = group_lanes<acc_t, CL>(g, gp, group);
        AVec<acc_t> in_lanes[3];
        const InputAffine<acc_t> in_aff = group_input_affine<acc_t, CL>(g, affp, group, in_lanes);
        acc_t* T = s.batch.data();
        acc_t* dyb = s.aux.data();

        // Pass 1: recompute t into the scratch, reduce sum(dy), sum(dy * ghat) and sum(g - mean) (not
        // with dy_means: a synchronized BN's reduce op already formed them).
        //
        // Why sum(g - mean): the saved mean is the batch mean rounded to acc_t, off from the mean of g by
        // delta <= ulp(mean)/2, which is large against std when |mean| >> std or M is tiny. ghat computed
        // with it then does not sum to zero, and dg = a*(dy - c1 - ghat*c2) gets a common component
        // a*rstd*delta*c2 that dw = sum dt*x and db = sum dt multiply by the full mean of x and act'(t):
        // with few values per channel that was our gradients' dominant error (5-10x PyTorch's fp32 error).
        // So delta = sum(g - mean)/M is measured here (g recomputed bitwise as in the forward) and
        // ghat = ((g - mean) - delta)*rstd is centred exactly; sum(dy*ghat) is corrected by -delta*rstd*sum(dy).
        double sdy[VL] = {0}, sdyg[VL] = {0}, sgc[VL] = {0};
        for (int64_t n = 0; n < g.N; ++n) {
          load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data(), in_aff);
          acc_t* tn = T + n * len;
          conv_plane<acc_t, CL>(g, s.pad.data(), wt.data(), bv.data(), tn);
          if (dmp) continue;
          gather_plane<scalar_t, acc_t, CL>(g, dyp, n, group, dyb);
          acc_t p1[VL] = {0}, p2[VL] = {0}, p3[VL] = {0};
          for (int64_t e = 0; e < len; e += VL)
            for (int l = 0; l < VL; ++l) {
              const bool in = e + l < valid;
              const acc_t d = in ? dyb[e + l] : acc_t(0);
              const acc_t gc = in ? act_forward<A>(tn[e + l]) - mu[l] : acc_t(0);
              p1[l] += d;
              p2[l] += d * (gc * rs[l]);
              p3[l] += gc;
            }
          reduce_lanes<acc_t, CL>(p1, sdy);
          reduce_lanes<acc_t, CL>(p2, sdyg);
          reduce_lanes<acc_t, CL>(p3, sgc);
        }
        if (redp) {
          for (int64_t c = 0; c < cb; ++c) {
            redp[c0 + c] = static_cast<acc_t>(sdy[c]);
            redp[g.C + c0 + c] = static_cast<acc_t>(sdyg[c]);
            redp[2 * g.C + c0 + c] = static_cast<acc_t>(sgc[c] * static_cast<double>(rs[c]));
          }
          continue;
        }
        // The coefficients in acc_t, so the lane loop below stays vectorized (double there halved the fused
        // backward's speed); with few values per channel, where these terms cancel, the training passes run
        // in double anyway (use_exact_training).
        acc_t af[VL], c1f[VL], c2f[VL], dlf[VL];
        for (int l = 0; l < VL; ++l) {
          if (!CL && l > 0) {  // NCHW: every lane is the plane's channel
            af[l] = af[0], c1f[l] = c1f[0], c2f[l] = c2f[0], dlf[l] = dlf[0];
            continue;
          }
          const DtCoefs<acc_t> k = dt_coefs<acc_t>(sdy[l], sdyg[l], sgc[l], M, ga[l], rs[l], batch_stats, true,
                                                   dmp && c0 + l < g.C ? dmp + c0 + l : nullptr, g.C);
          af[l] = k.a, c1f[l] = k.c1, c2f[l] = k.c2, dlf[l] = k.dl;
        }

        // Pass 2: dt, db, dw, dx.
        std::vector<double> dwacc(kk * CB, 0.0);
        double dbacc[VL] = {0}, dscacc[VL] = {0}, dshacc[VL] = {0};
        acc_t* dtb = s.plane.data();
        for (int64_t n = 0; n < g.N; ++n) {
          const acc_t* tn = T + n * len;
          gather_plane<scalar_t, acc_t, CL>(g, dyp, n, group, dyb);
          acc_t pdb[VL] = {0};
          for (int64_t e = 0; e < len; e += VL)
            for (int l = 0; l < VL; ++l) {
              const ActGrad<acc_t> ag = act_with_grad<A>(tn[e + l]);
              const acc_t gh = ((ag.g - mu[l]) - dlf[l]) * rs[l];
              const acc_t dg = af[l] * (dyb[e + l] - c1f[l] - gh * c2f[l]);
              const acc_t dt = (e + l < valid) ? dg * ag.dg : acc_t(0);
              dtb[e + l] = dt;
              pdb[l] += dt;
            }
          reduce_lanes<acc_t, CL>(pdb, dbacc);
          // dt into the dx buffer, placed so that conv with the flipped kernel gives conv_transpose
          // (its halo stays zero: only the H x W interior is ever written).
          plane_to_padded<acc_t, CL>(g, dtb, pr, dtpad.data());
          // dw[c,i,j] += sum_{h,w} dt[h,w] * upad[h+i, w+j]; with an input affine x is read once into
          // xraw (its gradient sums below need x itself) and u = scale*x + shift padded from there.
          if (has_affine) {
            gather_plane<scalar_t, acc_t, CL>(g, xp, n, group, xraw.data());
            plane_to_padded<acc_t, CL>(g, xraw.data(), g.pl, s.pad.data(), in_aff);
          } else {
            load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data());
          }
          weight_grad_plane<acc_t, CL>(g, dtpad.data(), pr, s.pad.data(), dwacc.data());
          // du = dy + conv(dtpad, flipped w)
          conv_plane<acc_t, CL>(g, dtpad.data(), wflip.data(), zero.data(), dtb);
          for (int64_t e = 0; e < len; ++e) dyb[e] += dtb[e];
          if (has_affine) {
            // u = scale*(x - center) + shift:  dx = scale*du,  dscale = sum(du*(x - center)),  dshift = sum(du)
            acc_t p1[VL] = {0}, p2[VL] = {0};
            for (int64_t e = 0; e < len; e += VL)
              for (int l = 0; l < VL; ++l) {
                const acc_t du = (e + l < valid) ? dyb[e + l] : acc_t(0);
                p1[l] += du * (xraw[e + l] - in_aff.center[l]);
                p2[l] += du;
                dyb[e + l] = in_aff.scale[l] * du;
              }
            reduce_lanes<acc_t, CL>(p1, dscacc);
            reduce_lanes<acc_t, CL>(p2, dshacc);
          }
          scatter_plane<scalar_t, acc_t, CL>(g, dyb, n, group, dxp);
        }
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t ch = c0 + c;
          for (int64_t t = 0; t < kk; ++t) dwp[ch * kk + t] = static_cast<scalar_t>(dwacc[t * CB + c]);
          dbp[ch] = static_cast<scalar_t>(dbacc[c]);
          if (!dmp) {
            dgp[ch] = static_cast<acc_t>(sdyg[c]);
            dbetap[ch] = static_cast<acc_t>(sdy[c]);
          }
          if (has_affine) {
            dscp[ch] = static_cast<acc_t>(dscacc[c]);
            dshp[ch] = static_cast<acc_t>(dshacc[c]);
          }
        }
      }
    });
  });
}

}  // namespace

std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                                         const at::Tensor& in_shift, const at::Tensor& weight, const at::Tensor& bias,
                                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                         const at::Tensor& rstd, bool batch_stats, double eps, int64_t act) {
  check_dw_inputs(x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats);
  if (use_exact_training(x.scalar_type(), batch_stats, x.size(0) * x.size(2) * x.size(3))) {
    auto o = dw_block_forward(to_double(x), to_double(in_center), to_double(in_scale), to_double(in_shift),
                              to_double(weight), to_double(bias), to_double(gamma), to_double(beta), to_double(mean),
                              to_double(rstd), batch_stats, eps, act);
    const auto acc = gamma.scalar_type();
    return {o[0].to(x.scalar_type()), o[1].to(acc), o[2].to(acc), o[3].to(acc)};
  }
  const bool cl = is_channels_last(x);
  const auto acc_opts = gamma.options();
  at::Tensor y = poisoned(at::empty_like(x));  // preserves x's strides (the fake impl does the same)
  at::Tensor mean_out = batch_stats ? poisoned(at::empty({x.size(1)}, acc_opts)) : mean.contiguous();
  at::Tensor rstd_out = batch_stats ? poisoned(at::empty({x.size(1)}, acc_opts)) : rstd.contiguous();
  at::Tensor var_out = batch_stats ? poisoned(at::empty({x.size(1)}, acc_opts)) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_forward_cpu", [&] {
    if (cl)
      forward_impl<scalar_t, true>(x, in_center, in_scale, in_shift, weight.contiguous(), bias, gamma, beta, mean_out,
                                   rstd_out, batch_stats, eps, act, y, var_out);
    else
      forward_impl<scalar_t, false>(x, in_center, in_scale, in_shift, weight.contiguous(), bias, gamma, beta, mean_out,
                                    rstd_out, batch_stats, eps, act, y, var_out);
  });
  if (!batch_stats) return {y, at::empty({0}, acc_opts), at::empty({0}, acc_opts), var_out};
  return {y, mean_out, rstd_out, var_out};
}

namespace {
// dy in x's layout, after the shape/dtype checks every backward entry point shares.
at::Tensor dense_grad_output(const char* op, const at::Tensor& dy_in, const at::Tensor& x) {
  TORCH_CHECK(dy_in.sizes() == x.sizes(), op, ": grad_output has shape ", dy_in.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), op, ": grad_output dtype ", dy_in.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  return dy_in.contiguous(is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// The (3, C) per-channel [mean dy, mean dy*ghat, mean ghat] of a synchronized BN, or empty.
void check_dy_means(const at::Tensor& dy_means, bool batch_stats, int64_t C, at::ScalarType acc) {
  if (dy_means.numel() == 0) return;
  TORCH_CHECK(batch_stats, "dw_block_backward: dy_means is only meaningful with batch statistics");
  TORCH_CHECK(dy_means.device().is_cpu() && dy_means.dim() == 2 && dy_means.size(0) == 3 &&
                  dy_means.size(1) == C && dy_means.is_contiguous() && dy_means.scalar_type() == acc,
              "dw_block_backward: dy_means must be a contiguous (3, ", C, ") ", acc, " CPU tensor, got ",
              dy_means.scalar_type(), " ", dy_means.sizes());
}
}  // namespace

bool bf16_pair_dots_built() { return kHasBf16Dot; }

std::vector<at::Tensor> dw_block_batch_stats(const at::Tensor& x, const at::Tensor& in_center,
                                             const at::Tensor& in_scale, const at::Tensor& in_shift,
                                             const at::Tensor& weight, const at::Tensor& bias, int64_t act) {
  const auto acc_opts = x.options().dtype(acc_type_for(x.scalar_type()));
  const int64_t C = x.size(1);
  const at::Tensor unused = at::zeros({C}, acc_opts);  // gamma/beta: read only by the apply pass
  check_dw_inputs(x, in_center, in_scale, in_shift, weight, bias, unused, unused, unused, unused, true);
  at::Tensor mean = poisoned(at::empty({C}, acc_opts));
  at::Tensor rstd = at::empty({C}, acc_opts);
  at::Tensor var = poisoned(at::empty({C}, acc_opts));
  at::Tensor no_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_batch_stats_cpu", [&] {
    if (is_channels_last(x))
      forward_impl<scalar_t, true>(x, in_center, in_scale, in_shift, weight.contiguous(), bias, unused, unused, mean,
                                   rstd, true, 1.0, act, no_y, var, /*stats_only=*/true);
    else
      forward_impl<scalar_t, false>(x, in_center, in_scale, in_shift, weight.contiguous(), bias, unused, unused, mean,
                                    rstd, true, 1.0, act, no_y, var, /*stats_only=*/true);
  });
  return {mean, var};
}

std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_center,
                                          const at::Tensor& in_scale, const at::Tensor& in_shift,
                                          const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
                                          const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                                          const at::Tensor& dy_means, int64_t act) {
  check_dw_inputs(x, in_center, in_scale, in_shift, weight, bias, gamma, gamma, mean, rstd, false);
  check_dy_means(dy_means, batch_stats, x.size(1), gamma.scalar_type());
  const at::Tensor dy = dense_grad_output("dw_block_backward", dy_in, x);
  if (dy_means.numel() == 0 && use_exact_training(x.scalar_type(), batch_stats, x.size(0) * x.size(2) * x.size(3))) {
    auto o = dw_block_backward(to_double(dy), to_double(x), to_double(in_center), to_double(in_scale),
                               to_double(in_shift), to_double(weight), to_double(bias), to_double(gamma),
                               to_double(mean), to_double(rstd), batch_stats, to_double(dy_means), act);
    const auto acc = gamma.scalar_type();
    return {o[0].to(x.scalar_type()), o[1].to(weight.scalar_type()), o[2].to(bias.scalar_type()), o[3].to(acc),
            o[4].to(acc), o[5].to(acc), o[6].to(acc)};
  }
  const bool cl = is_channels_last(x);
  const bool local_sums = dy_means.numel() == 0;  // else dgamma/dbeta (local sums) come from the reduce op
  at::Tensor dx = poisoned(at::empty_like(x));
  at::Tensor dweight = poisoned(at::empty_like(weight, weight.options(), at::MemoryFormat::Contiguous));
  at::Tensor dbias = poisoned(at::empty_like(bias));
  at::Tensor dgamma = poisoned(local_sums ? at::empty_like(gamma) : gamma.new_empty({0}));
  at::Tensor dbeta = poisoned(local_sums ? at::empty_like(gamma) : gamma.new_empty({0}));
  at::Tensor dscale = poisoned(at::empty_like(in_scale));
  at::Tensor dshift = poisoned(at::empty_like(in_shift));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_backward_cpu", [&] {
    if (cl)
      backward_impl<scalar_t, true>(dy, x, in_center, in_scale, in_shift, weight.contiguous(), bias, gamma, mean, rstd,
                                    batch_stats, dy_means, act, dx, dweight, dbias, dgamma, dbeta, dscale, dshift);
    else
      backward_impl<scalar_t, false>(dy, x, in_center, in_scale, in_shift, weight.contiguous(), bias, gamma, mean, rstd,
                                     batch_stats, dy_means, act, dx, dweight, dbias, dgamma, dbeta, dscale, dshift);
  });
  return {dx, dweight, dbias, dgamma, dbeta, dscale, dshift};
}

at::Tensor dw_block_backward_reduce(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_center,
                                    const at::Tensor& in_scale, const at::Tensor& in_shift, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                    int64_t act) {
  check_dw_inputs(x, in_center, in_scale, in_shift, weight, bias, mean, mean, mean, rstd, false);
  const at::Tensor dy = dense_grad_output("dw_block_backward_reduce", dy_in, x);
  at::Tensor sums = poisoned(at::empty({3, x.size(1)}, mean.options()));
  at::Tensor none_x = x.new_empty({0}), none_w = weight.new_empty({0}), none = mean.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_backward_reduce_cpu", [&] {
    if (is_channels_last(x))
      backward_impl<scalar_t, true>(dy, x, in_center, in_scale, in_shift, weight.contiguous(), bias, mean, mean, rstd,
                                    true, none, act, none_x, none_w, none_w, none, none, none, none, &sums);
    else
      backward_impl<scalar_t, false>(dy, x, in_center, in_scale, in_shift, weight.contiguous(), bias, mean, mean, rstd,
                                     true, none, act, none_x, none_w, none_w, none, none, none, none, &sums);
  });
  return sums;
}

}  // namespace cpu
}  // namespace cmk
