// The CPU row-normalization kernels, for the CPU implementations of other ops
// (nnk::cosine_cross_entropy_*) that normalize inside their own loops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace nnk {

// (x / max(||x||, eps), ||x||) row-wise; norms in float32 (float64 for float64).
std::tuple<at::Tensor, at::Tensor> row_normalize_cpu(const at::Tensor& x, double eps);

// Its norms alone (bitwise the same), with no normalized copy of x.
at::Tensor row_norms_cpu(const at::Tensor& x, double eps);

// (g - y <y, g>) / ||x|| row-wise (g / eps where ||x|| <= eps), in y's dtype.
at::Tensor row_normalize_backward_cpu(const at::Tensor& g, const at::Tensor& y,
                                      const at::Tensor& norm, double eps);

// The same into dx: contiguous, of y's shape and dtype (the arguments
// unchecked: for callers that made them).
void row_normalize_backward_cpu_into(const at::Tensor& g, const at::Tensor& y,
                                     const at::Tensor& norm, double eps, at::Tensor& dx);

}  // namespace nnk
