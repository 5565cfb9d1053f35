// Torch-free entry points of the CUDA kernels (raw pointers, sizes and a
// stream), so that the .cu files compile in seconds without ATen; the ATen
// wrappers and TORCH_LIBRARY_IMPL(nnk, CUDA) live in the *_cuda.cpp files.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace nnk {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// x, y: (n, d) row-major of `dtype`; norm: (n,) float64 for kFloat64, else float32.
cudaError_t launch_row_normalize_fwd(DType dtype, const void* x, void* y, void* norm,
                                     int64_t n, int64_t d, double eps,
                                     cudaStream_t stream);

// g, y, dx: (n, d) row-major of `dtype`; norm as above.
cudaError_t launch_row_normalize_bwd(DType dtype, const void* g, const void* y,
                                     const void* norm, void* dx, int64_t n, int64_t d,
                                     double eps, cudaStream_t stream);

}  // namespace cuda
}  // namespace nnk
