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
// extension turns into a RuntimeError), and the threads of a block can be run in reverse order
// (NNK_CUDA_EMULATION_ORDER=reverse), so that a result that depends on the
// order of unsynchronized threads differs between two runs.
//
// What it does not model: blocks run in one fixed order (a race between
// blocks does not show); threads run one at a time (no memory-ordering
// effects); shuffles or barriers at different call sites release together;
// dynamic shared memory (refused by build.py); device math (exp, expm1,
// log1p, sqrt) is glibc's, where CUDA's may differ by an ulp or two.
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

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "8-byte values at most");
  namespace e = ::nnk_cuda_emulation;
  // The kernels shuffle whole warps only; anything else is not emulated.
  if (mask != 0xffffffffu || width != 32) __builtin_trap();
  const unsigned me = e::linear_thread();
  std::memcpy(&e::slot(me), &v, sizeof(T));
  e::warp_barrier();  // every lane has written
  T out;
  std::memcpy(&out, &e::slot((me & ~31u) | ((me & 31u) ^ static_cast<unsigned>(lane_mask))), sizeof(T));
  e::warp_barrier();  // every lane has read, before a next shuffle writes
  return out;
}

// Fibers of one block run one at a time: a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}
