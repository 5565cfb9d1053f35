// Argument checks and shapes of nnk::nc_class_sums / nnk::nc_centered_gram,
// shared by the CPU and CUDA implementations (same inputs rejected with the
// same messages). Label values are checked by each implementation: eagerly on
// the CPU, asynchronously on the GPU.
#pragma once

#include <ATen/ATen.h>

#include "nnk/dtypes.h"

namespace nnk {
namespace nc {

// features as (B, N, D) (a 2-D input is one batch) and whether it had a batch dim.
struct Batched {
  at::Tensor features;  // (B, N, D) contiguous, original dtype
  at::Tensor labels;    // (N,) int64 contiguous
  bool batched;
  int64_t b, n, d;
};

inline Batched check_features(const char* op, const at::Tensor& features,
                              const at::Tensor& labels) {
  TORCH_CHECK(features.dim() == 2 || features.dim() == 3, op,
              ": features must be (N, D) or (B, N, D), got shape ", features.sizes());
  const auto dt = features.scalar_type();
  TORCH_CHECK(is_kernel_dtype(dt),
              op, ": features must be float16, bfloat16, float32 or float64, got ", dt);
  const int64_t n = features.size(-2);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must have shape (", n,
              ",) like the rows of features, got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == features.device(), op, ": labels are on ", labels.device(),
              " but features are on ", features.device());
  Batched r;
  r.batched = features.dim() == 3;
  r.features = (r.batched ? features : features.unsqueeze(0)).contiguous();
  r.labels = labels.to(at::kLong).contiguous();
  r.b = r.features.size(0);
  r.n = n;
  r.d = features.size(-1);
  return r;
}

// shifts as (B or 1, K, D) in the accumulation dtype.
inline at::Tensor check_shifts(const char* op, const at::Tensor& shifts, const Batched& f,
                               at::ScalarType acc) {
  TORCH_CHECK(shifts.dim() == 2 || (shifts.dim() == 3 && f.batched && shifts.size(0) == f.b), op,
              ": shifts must be (K, D), or (B, K, D) with the B of 3-D features; got shifts ",
              shifts.sizes(), " for ", f.batched ? "3-D" : "2-D", " features with B=", f.b);
  TORCH_CHECK(shifts.size(-1) == f.d, op, ": shifts must have D=", f.d, " columns, got ",
              shifts.sizes());
  TORCH_CHECK(is_kernel_dtype(shifts.scalar_type()), op,
              ": shifts must be float16, bfloat16, float32 or float64, got ", shifts.scalar_type());
  TORCH_CHECK(shifts.device() == f.features.device(), op, ": shifts are on ", shifts.device(),
              " but features are on ", f.features.device());
  return (shifts.dim() == 3 ? shifts : shifts.unsqueeze(0)).to(acc).contiguous();
}

// Class sums are float64 for every input dtype: a float32 running sum of n
// rows is off by ~n u |mu|, which the Gram's centering turns into an error of
// Sigma_W of order (n u |mu|)^2, larger than the within-class scatter of
// collapsed features at a few thousand samples per class.
inline at::ScalarType sums_dtype(const at::Tensor&) { return at::kDouble; }

inline at::ScalarType gram_dtype(const at::Tensor& features, const at::Tensor& shifts) {
  return (features.scalar_type() == at::kDouble || shifts.scalar_type() == at::kDouble)
             ? at::kDouble
             : at::kFloat;
}

}  // namespace nc
}  // namespace nnk
