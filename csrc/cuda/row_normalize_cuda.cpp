// ATen wrappers of the row-normalization kernels: checks, device guard,
// allocation, launch on the current stream, launch check.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dtype.h"
#include "launchers.h"
#include "nnk/row_normalize_checks.h"

namespace nnk {
namespace {

std::tuple<at::Tensor, at::Tensor> row_normalize_cuda(const at::Tensor& x_in, double eps) {
  check_row_normalize_input(x_in, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor norm = at::empty({x.size(0)}, x.options().dtype(norm_dtype(x)));
  C10_CUDA_CHECK(cuda::launch_row_normalize_fwd(
      cuda::to_launch_dtype(x.scalar_type(), "nnk::row_normalize"), x.const_data_ptr(),
      y.mutable_data_ptr(), norm.mutable_data_ptr(), x.size(0), x.size(1), eps,
      c10::cuda::getCurrentCUDAStream()));
  return {y, norm};
}

at::Tensor row_normalize_backward_cuda(const at::Tensor& g_in, const at::Tensor& y_in,
                                       const at::Tensor& norm_in, double eps) {
  check_row_normalize_backward_input(g_in, y_in, norm_in, eps);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor g = g_in.contiguous().to(y_in.scalar_type());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor norm = norm_in.contiguous();
  at::Tensor dx = at::empty_like(y);
  const cuda::DType dt = cuda::to_launch_dtype(y.scalar_type(), "nnk::row_normalize_backward");
  C10_CUDA_CHECK(cuda::launch_row_normalize_bwd(
      dt, dt, g.const_data_ptr(), y.const_data_ptr(), /*raw=*/false, norm.const_data_ptr(),
      dx.mutable_data_ptr(),
      y.size(0), y.size(1), eps, c10::cuda::getCurrentCUDAStream()));
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(nnk, CUDA, m) {
  m.impl("row_normalize", &row_normalize_cuda);
  m.impl("row_normalize_backward", &row_normalize_backward_cuda);
}

}  // namespace nnk
