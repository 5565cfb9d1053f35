// Maps an ATen dtype to the launchers' DType, rejecting the others clearly.
#pragma once

#include <ATen/ATen.h>

#include "launchers.h"

namespace nnk {
namespace cuda {

inline DType to_launch_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

}  // namespace cuda
}  // namespace nnk
