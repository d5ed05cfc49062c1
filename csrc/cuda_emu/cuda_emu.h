// A host-C++ emulation of the small part of CUDA that csrc/cuda/*.cu uses, so the same kernel
// sources compile with g++ and run on the CPU in the tests (backend "cuda_emu").
//
// Model: a launch runs the grid's blocks one after another; each block's threads are real
// std::threads (created once per launch and reused for every block) that meet at a real barrier in
// __syncthreads. threadIdx/blockIdx/blockDim/gridDim are thread_local. Static __shared__ arrays are
// function-scope statics (one block runs at a time, so "shared by the block" is exact); dynamic
// shared memory is one buffer per launch, shared by the block's threads. Warp shuffles exchange
// values through a per-warp slot area between two per-warp barriers, so every lane of a warp must
// reach the shuffle (as __shfl_*_sync(0xffffffff, ...) requires on the GPU). Not modelled: memory
// ordering beyond barrier semantics, timing, occupancy/registers, lock-step warps without a sync,
// Hopper-only instructions (see README "CUDA emulator").
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

namespace cmk_emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int kWarpSize = 32;

// Reusable barrier for a fixed number of threads (generation counter: safe to reuse at once).
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(m_);
    const unsigned gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, arrived_ = 0, gen_ = 0;
};

// Everything the threads of the running block share.
struct BlockContext {
  unsigned nthreads;
  Barrier block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<uint64_t> warp_slots;  // kWarpSize 8-byte slots per warp
  std::vector<uint64_t> dyn_smem;    // dynamic shared memory, 8-byte aligned (16 via over-allocation)
  BlockContext(unsigned n, size_t smem_bytes) : nthreads(n), block_barrier(n) {
    const unsigned warps = (n + kWarpSize - 1) / kWarpSize;
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned lanes = std::min<unsigned>(kWarpSize, n - w * kWarpSize);
      warp_barriers.emplace_back(new Barrier(lanes));
    }
    warp_slots.assign(static_cast<size_t>(warps) * kWarpSize, 0);
    dyn_smem.assign(smem_bytes / 8 + 4, 0);
  }
};

inline thread_local dim3 tl_threadIdx, tl_blockIdx, tl_blockDim, tl_gridDim;
inline thread_local unsigned tl_linear_tid = 0;
inline thread_local BlockContext* tl_ctx = nullptr;

inline void syncthreads() { tl_ctx->block_barrier.arrive_and_wait(); }

inline void* dynamic_shared() {
  auto addr = reinterpret_cast<uintptr_t>(tl_ctx->dyn_smem.data());
  return reinterpret_cast<void*>((addr + 15) & ~uintptr_t(15));
}

// Lane `src_lane`'s value of v within this thread's warp (own value when src_lane is not a lane
// of this warp). Every lane of the warp must call it.
template <typename T>
T warp_exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an 8-byte trivial type");
  const unsigned warp = tl_linear_tid / kWarpSize, lane = tl_linear_tid % kWarpSize;
  const unsigned lanes = std::min<unsigned>(kWarpSize, tl_ctx->nthreads - warp * kWarpSize);
  uint64_t* slots = tl_ctx->warp_slots.data() + static_cast<size_t>(warp) * kWarpSize;
  std::memcpy(&slots[lane], &v, sizeof(T));
  tl_ctx->warp_barriers[warp]->arrive_and_wait();
  T out = v;
  if (src_lane >= 0 && static_cast<unsigned>(src_lane) < lanes) std::memcpy(&out, &slots[src_lane], sizeof(T));
  tl_ctx->warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before all have read
  return out;
}

// One kernel launch at a time (the statics standing in for __shared__ are per kernel, not per launch).
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  std::lock_guard<std::mutex> guard(launch_mutex());
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || grid.x * grid.y * grid.z == 0) return;
  BlockContext ctx(nthreads, smem_bytes);
  std::tuple<std::decay_t<KArgs>...> kargs(std::forward<Args>(args)...);
  auto body = [&](unsigned tid) {
    tl_linear_tid = tid;
    tl_threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    tl_blockDim = block;
    tl_gridDim = grid;
    tl_ctx = &ctx;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          tl_blockIdx = dim3(bx, by, bz);
          std::apply(kernel, kargs);
          ctx.block_barrier.arrive_and_wait();  // the block ends before the next one reuses shared memory
        }
    tl_ctx = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) threads.emplace_back(body, t);
  for (auto& th : threads) th.join();
}

}  // namespace cmk_emu

// --- the CUDA spellings the kernels use -------------------------------------------------------------
using cmk_emu::dim3;
using cudaStream_t = void*;
#define threadIdx (cmk_emu::tl_threadIdx)
#define blockIdx (cmk_emu::tl_blockIdx)
#define blockDim (cmk_emu::tl_blockDim)
#define gridDim (cmk_emu::tl_gridDim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() cmk_emu::syncthreads()

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = cmk_emu::kWarpSize) {
  const int lane = static_cast<int>(cmk_emu::tl_linear_tid % cmk_emu::kWarpSize);
  const int src = lane ^ lane_mask;
  return cmk_emu::warp_exchange(v, (src / width == lane / width) ? src : lane);
}
template <typename T>
inline T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta, int width = cmk_emu::kWarpSize) {
  const int lane = static_cast<int>(cmk_emu::tl_linear_tid % cmk_emu::kWarpSize);
  const int src = lane + static_cast<int>(delta);
  return cmk_emu::warp_exchange(v, (src / width == lane / width) ? src : lane);
}
inline float atomicAdd(float* addr, float v) { return std::atomic_ref<float>(*addr).fetch_add(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

#define CMK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(cmk_emu::dynamic_shared())
#define CMK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  do {                                                      \
    (void)(stream);                                         \
    cmk_emu::launch(kernel, grid, block, smem, __VA_ARGS__); \
  } while (0)
#define CMK_CHECK_LAUNCH(what) ((void)0)
