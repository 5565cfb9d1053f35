// Argument checks of nnk::row_normalize(_backward), shared by the CPU and CUDA
// wrappers so that both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <cmath>

#include "nnk/dtypes.h"

namespace nnk {

inline at::ScalarType norm_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_row_normalize_input(const at::Tensor& x, double eps) {
  TORCH_CHECK(x.dim() == 2, "nnk::row_normalize: x must be 2-D (N, D), got ",
              x.dim(), "-D");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()),
              "nnk::row_normalize: x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps > 0,
              "nnk::row_normalize: eps must be finite and > 0, got ", eps);
}

inline void check_row_normalize_backward_input(const at::Tensor& g,
                                               const at::Tensor& y,
                                               const at::Tensor& norm,
                                               double eps) {
  check_row_normalize_input(y, eps);
  TORCH_CHECK(g.sizes() == y.sizes(), "nnk::row_normalize_backward: grad_y shape ",
              g.sizes(), " does not match y shape ", y.sizes());
  TORCH_CHECK(is_kernel_dtype(g.scalar_type()),
              "nnk::row_normalize_backward: grad_y must be float16, bfloat16, float32 or "
              "float64, got ", g.scalar_type());
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == y.size(0),
              "nnk::row_normalize_backward: norm must have shape (", y.size(0),
              ",), got ", norm.sizes());
  TORCH_CHECK(norm.scalar_type() == norm_dtype(y),
              "nnk::row_normalize_backward: norm must be ", norm_dtype(y), ", got ",
              norm.scalar_type());
  TORCH_CHECK(g.device() == y.device() && norm.device() == y.device(),
              "nnk::row_normalize_backward: grad_y, y and norm must be on one device");
}

}  // namespace nnk
