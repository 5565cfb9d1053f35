// ATen wrappers of the neural-collapse CUDA kernels: checks, device guard,
// label sort / counts, launch on the current stream, split reduction.
//
// Labels are range-checked on the device without a host synchronization
// (at::_assert_async: a device-side assert at the next synchronization, as in
// PyTorch's own indexing kernels); the kernels never read out of bounds for a
// bad label.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dtype.h"
#include "launchers.h"
#include "nnk/nc_checks.h"

namespace nnk {
namespace {

// gridDim.y/z of the kernels carry batches x splits.
constexpr int64_t kMaxGridYZ = 65535;

std::tuple<at::Tensor, at::Tensor> nc_class_sums_cuda(const at::Tensor& features,
                                                      const at::Tensor& labels,
                                                      int64_t num_classes) {
  constexpr const char* op = "nnk::nc_class_sums";
  // Checked first: the guard would reject a CPU tensor with a less clear message.
  const nc::Batched f = nc::check_features(op, features, labels);
  const c10::cuda::CUDAGuard guard(features.device());
  TORCH_CHECK(num_classes >= 0, op, ": num_classes must be >= 0, got ", num_classes);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = nc::sums_dtype(features);

  // 1. Counts (integer atomics: exact), and the out-of-range labels.
  at::Tensor counts = at::zeros({num_classes}, f.labels.options());
  at::Tensor bad = at::zeros({1}, f.labels.options());
  C10_CUDA_CHECK(cuda::launch_nc_count(f.labels.const_data_ptr<int64_t>(), f.n, num_classes,
                                       counts.mutable_data_ptr<int64_t>(),
                                       bad.mutable_data_ptr<int64_t>(), stream));
  if (f.n > 0) at::_assert_async(bad.eq(0).squeeze(0), "nnk::nc_class_sums: labels out of range");

  // 2. Rows grouped by class (stable: original order within a class).
  const at::Tensor perm = at::argsort(f.labels, /*stable=*/true, 0);
  const at::Tensor offsets = counts.cumsum(0) - counts;

  // 3. Per-class sums over row splits, summed in a fixed order.
  const int64_t splits = cuda::nc_class_sums_splits(f.b, f.n, f.d, num_classes);
  TORCH_CHECK(f.b * splits <= kMaxGridYZ, op, ": too many batches (", f.b, ")");
  at::Tensor partial = at::empty({splits, f.b, num_classes, f.d}, f.features.options().dtype(acc));
  C10_CUDA_CHECK(cuda::launch_nc_class_sums(
      cuda::to_launch_dtype(f.features.scalar_type(), op), cuda::to_launch_dtype(acc, op),
      f.features.const_data_ptr(), perm.const_data_ptr<int64_t>(),
      offsets.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(), f.b, f.n, f.d,
      num_classes, splits, partial.mutable_data_ptr(), stream));
  at::Tensor sums = splits == 1 ? partial[0] : partial.sum(0);
  return {counts, f.batched ? sums : sums[0]};
}

at::Tensor nc_centered_gram_cuda(const at::Tensor& features, const at::Tensor& labels,
                                 const at::Tensor& shifts) {
  constexpr const char* op = "nnk::nc_centered_gram";
  // Checked first: the guard would reject a CPU tensor with a less clear message.
  const nc::Batched f = nc::check_features(op, features, labels);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::ScalarType acc = nc::gram_dtype(features, shifts);
  const at::Tensor c = nc::check_shifts(op, shifts, f, acc);
  const int64_t classes = c.size(1);
  if (f.n > 0) {
    const at::Tensor ok = ((f.labels >= 0) & (f.labels < classes)).all();
    at::_assert_async(ok, "nnk::nc_centered_gram: labels out of range");
  }
  TORCH_CHECK(f.b <= kMaxGridYZ, op, ": too many batches (", f.b, ")");
  const int64_t splits = cuda::nc_gram_splits(f.b, f.n, f.d);
  // float64 partials (the kernel's chunk totals), summed and rounded once.
  at::Tensor partial = at::empty({splits, f.b, f.d, f.d}, f.features.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::launch_nc_centered_gram(
      cuda::to_launch_dtype(f.features.scalar_type(), op), cuda::to_launch_dtype(acc, op),
      f.features.const_data_ptr(), f.labels.const_data_ptr<int64_t>(), c.const_data_ptr(),
      /*shifts_batched=*/c.size(0) > 1, f.b, f.n, f.d, classes,
      splits, partial.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  at::Tensor gram = (splits == 1 ? partial[0] : partial.sum(0)).to(acc);
  return f.batched ? gram : gram[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(nnk, CUDA, m) {
  m.impl("nc_class_sums", &nc_class_sums_cuda);
  m.impl("nc_centered_gram", &nc_centered_gram_cuda);
}

}  // namespace nnk
