// Emulated build (tests/cuda_emulation): a launch error becomes a C++ error.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t nnk_emulated_error = (EXPR);                                    \
    TORCH_CHECK(nnk_emulated_error == cudaSuccess, "emulated CUDA error ",            \
                static_cast<int>(nnk_emulated_error), " from ", #EXPR);               \
  } while (0)
