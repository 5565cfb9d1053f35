// Emulated build (tests/cuda_emulation): one stream, the default.
#pragma once

#include <cuda_runtime.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
