// The floating dtypes every nnk kernel takes, for the argument checks of the
// ops (at::isFloatingType also admits the float8 types, which no kernel
// dispatches on: they would fail in the dispatch with a less clear message).
#pragma once

#include <ATen/ATen.h>

namespace nnk {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

}  // namespace nnk
