// Kernels that check the emulator itself (tests/test_cuda_emulation.py): a
// result it must get right, and faults it must report.
#include <cuda_runtime.h>

#include <cstdint>

#include "nnk/math.h"

namespace {

// Block sum: warp shuffles, then shared memory across the warps.
__global__ void block_sum_kernel(const float* x, int n, float* out) {
  __shared__ float partial[32];
  float v = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// A __syncthreads that half of the block skips.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

// A shuffle after some lanes of the warp have returned.
__global__ void partial_warp_shuffle_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// A race: every thread writes its index to the same word, with no order.
__global__ void racy_kernel(int* out) { out[0] = threadIdx.x; }

// A race between blocks: each block's first thread writes its block index
// to the same word.
__global__ void racy_blocks_kernel(int* out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x + 4 * blockIdx.y;
}

// __shfl_sync: each warp reads lane 7 + its warp index of its own values.
__global__ void lane_broadcast_kernel(int* out) {
  const int v = static_cast<int>(threadIdx.x) * 3;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, v, 7 + static_cast<int>(threadIdx.x / 32));
}

// nnk/math.h's exp, expm1 and log1p of each element: the emulation's model
// of CUDA's device functions.
__global__ void device_math_kernel(const float* x, int n, float* out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    out[i] = nnk::math::exp(x[i]);
    out[n + i] = nnk::math::expm1(x[i]);
    out[2 * n + i] = nnk::math::log1p(x[i]);
  }
}

}  // namespace

int64_t launch_selftest(const char* which, void* a, int n, void* out) {
  if (which[0] == 's') block_sum_kernel<<<2, 128, 0, 0>>>(static_cast<const float*>(a), n, static_cast<float*>(out));
  if (which[0] == 'b') divergent_barrier_kernel<<<1, 64, 0, 0>>>(static_cast<int*>(out));
  if (which[0] == 'w') partial_warp_shuffle_kernel<<<1, 32, 0, 0>>>(static_cast<int*>(out));
  if (which[0] == 'r') racy_kernel<<<1, 64, 0, 0>>>(static_cast<int*>(out));
  if (which[0] == 'l') lane_broadcast_kernel<<<1, 64, 0, 0>>>(static_cast<int*>(out));
  if (which[0] == 'm') device_math_kernel<<<1, 64, 0, 0>>>(static_cast<const float*>(a), n, static_cast<float*>(out));
  if (which[0] == 'g') racy_blocks_kernel<<<dim3(4, 3), 32, 0, 0>>>(static_cast<int*>(out));
  return static_cast<int64_t>(cudaGetLastError());
}

#include <torch/extension.h>

// which: "sum" (x (2, n) float32 -> out (2,)), "math" (x (n,) float32 ->
// out (3, n): exp, expm1, log1p), "barrier", "warp", "race", "grid race",
// "lane broadcast" (out int32, 64 entries); returns the launch's cudaError_t.
int64_t run(const std::string& which, torch::Tensor x, torch::Tensor out) {
  return launch_selftest(which.c_str(), x.data_ptr(), static_cast<int>(x.size(-1)), out.data_ptr());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
