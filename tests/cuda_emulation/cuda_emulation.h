// Runs the extension's CUDA sources on the CPU, for tests only: each CUDA
// thread of a block is a fiber, the block's threads run one at a time until
// they reach __syncthreads or a warp shuffle, and the blocks of a grid run
// one after another. Force-included (-include) in every CUDA source of the
// emulated build (tests/cuda_emulation/build.py), whose kernel launches
// `k<<<grid, block, smem, stream>>>(args)` are rewritten as
// `::nnk_cuda_emulation::launch(grid, block, [&] { k(args); })`.
//
// What it checks beyond the results: a __syncthreads or shuffle that not every
// thread it needs reaches (a deadlock on a GPU, or undefined behaviour) is a
// launch error (cudaErrorLaunchFailure from cudaGetLastError, which the
// extension turns into a RuntimeError); the threads of a block, and the
// blocks of a launch, can be run in reverse order
// (NNK_CUDA_EMULATION_ORDER=reverse), so that a result that depends on the
// order of unsynchronized threads or blocks differs between two runs; and
// exp, expm1 and log1p err as much as CUDA's may (the end of this file).
//
// What it does not model: blocks run one at a time, and so do threads (no
// memory-ordering effects); shuffles or barriers at different call sites
// release together; dynamic shared memory (refused by build.py); CUDA's
// device math's actual errors (the model takes each at its documented bound).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// Host definitions of the CUDA qualifiers (cuda_runtime.h maps them to
// attributes that g++ ignores with a warning, and __shared__ would not be shared).
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace nnk_cuda_emulation {

// The current thread's coordinates, set by the scheduler before it resumes a fiber.
struct Coordinates {
  dim3 grid, block, block_idx, thread_idx;
};
Coordinates& coordinates();

// Runs body once per thread of every block of grid x block.
void launch(dim3 grid, dim3 block, std::function<void()> body);

// Suspends the calling thread until every live thread of its block (warp)
// has reached a block (warp) barrier.
void block_barrier();
void warp_barrier();

// The 8-byte exchange slot of a thread (warp shuffles).
uint64_t& slot(unsigned thread);
unsigned linear_thread();

// The launch status (cudaGetLastError): libcudart's, loaded with torch,
// would answer for a GPU that is not there.
cudaError_t get_last_error();

}  // namespace nnk_cuda_emulation

#define cudaGetLastError ::nnk_cuda_emulation::get_last_error
#define threadIdx (::nnk_cuda_emulation::coordinates().thread_idx)
#define blockIdx (::nnk_cuda_emulation::coordinates().block_idx)
#define blockDim (::nnk_cuda_emulation::coordinates().block)
#define gridDim (::nnk_cuda_emulation::coordinates().grid)

inline void __syncthreads() { ::nnk_cuda_emulation::block_barrier(); }

namespace nnk_cuda_emulation {

// A warp shuffle: every lane writes v, then reads lane `src`'s. The kernels
// shuffle whole warps only; anything else is not emulated.
template <typename T>
T warp_exchange(unsigned mask, T v, unsigned src, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "8-byte values at most");
  if (mask != 0xffffffffu || width != 32 || src >= 32) __builtin_trap();
  const unsigned me = linear_thread();
  std::memcpy(&slot(me), &v, sizeof(T));
  warp_barrier();  // every lane has written
  T out;
  std::memcpy(&out, &slot((me & ~31u) | src), sizeof(T));
  warp_barrier();  // every lane has read, before a next shuffle writes
  return out;
}

}  // namespace nnk_cuda_emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = ::nnk_cuda_emulation::linear_thread() & 31u;
  return ::nnk_cuda_emulation::warp_exchange(mask, v, lane ^ static_cast<unsigned>(lane_mask), width);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::nnk_cuda_emulation::warp_exchange(mask, v, static_cast<unsigned>(src_lane), width);
}

// Fibers of one block run one at a time: a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

// CUDA's device exp, expm1 and log1p, at least as far off as their
// documented error allows (CUDA C++ Programming Guide, "Mathematical
// Functions", without fast math: expf 2 ulp; expm1f, log1pf and the double
// functions 1 ulp), where glibc's are within about half an ulp: glibc's
// moved by the bound errs up to half an ulp more (more where it crosses a
// power of two). nnk/math.h takes these in place of <cmath>'s
// (NNK_EMULATED_DEVICE_MATH). Each result is glibc's moved that many ulps, in
// the direction NNK_CUDA_EMULATION_MATH (read at each launch) gives:
//   "random" (the default): up or down by a hash of the argument, the same
//     for the same argument, as a deterministic function's error; a result
//     that cancels against another (p - 1 of a confident row) errs by the
//     full bound either way;
//   "high" / "low": every result up / down, a bias no sum averages out;
//   "exact": glibc's.
// The exact values (exp(0) = 1, expm1(0) = log1p(0) = 0, zeros, infinities,
// NaN) stay exact.
#define NNK_EMULATED_DEVICE_MATH

#include <cmath>

namespace nnk_cuda_emulation {

enum class DeviceMath { kExact, kHigh, kLow, kRandom };
extern DeviceMath device_math;  // set by launch()

template <typename T>
T off_by_ulps(T arg, T result, int ulps, uint64_t salt) {
  if (arg == T(0) || result == T(0) || !std::isfinite(result) || device_math == DeviceMath::kExact) {
    return result;
  }
  bool up = device_math == DeviceMath::kHigh;
  if (device_math == DeviceMath::kRandom) {
    uint64_t h = 0;
    std::memcpy(&h, &arg, sizeof(T));
    h ^= salt;  // splitmix64's finalizer
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    up = ((h ^ (h >> 31)) & 1) != 0;
  }
  const T toward = up ? T(INFINITY) : T(-INFINITY);
  for (int i = 0; i < ulps; ++i) result = std::nextafter(result, toward);
  return result;
}

}  // namespace nnk_cuda_emulation

namespace nnk {
namespace math {

inline float exp(float x) { return ::nnk_cuda_emulation::off_by_ulps(x, std::exp(x), 2, 1); }
inline double exp(double x) { return ::nnk_cuda_emulation::off_by_ulps(x, std::exp(x), 1, 1); }
inline float expm1(float x) { return ::nnk_cuda_emulation::off_by_ulps(x, std::expm1(x), 1, 2); }
inline double expm1(double x) { return ::nnk_cuda_emulation::off_by_ulps(x, std::expm1(x), 1, 2); }
inline float log1p(float x) { return ::nnk_cuda_emulation::off_by_ulps(x, std::log1p(x), 1, 3); }
inline double log1p(double x) { return ::nnk_cuda_emulation::off_by_ulps(x, std::log1p(x), 1, 3); }

}  // namespace math
}  // namespace nnk
