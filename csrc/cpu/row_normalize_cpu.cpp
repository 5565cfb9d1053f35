// CPU implementation of nnk::row_normalize and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "nnk/math.h"
#include "nnk/row_normalize_checks.h"
#include "row_normalize_cpu.h"

namespace nnk {

namespace {

// Norms of x's rows, and with `y` defined the rows normalized into it.
at::Tensor normalize_rows(const at::Tensor& x_in, double eps, at::Tensor* y_out) {
  check_row_normalize_input(x_in, eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  if (y_out != nullptr) *y_out = at::empty_like(x);
  at::Tensor norm = at::empty({n}, x.options().dtype(norm_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "nnk_row_normalize_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* yp = y_out != nullptr ? y_out->mutable_data_ptr<scalar_t>() : nullptr;
        acc_t* np = norm.mutable_data_ptr<acc_t>();
        at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* xr = xp + r * d;
            // Squares summed in double: no overflow/underflow for any float
            // input (a float sum overflows above |x| ~ 1e19).
            double ss = 0;
            for (int64_t j = 0; j < d; ++j) {
              const double v = static_cast<double>(xr[j]);
              ss += v * v;
            }
            const acc_t nr = static_cast<acc_t>(std::sqrt(ss));
            const acc_t denom = math::norm_divisor(nr, acc_t(eps));
            np[r] = nr;
            if (yp == nullptr) continue;  // norms only
            for (int64_t j = 0; j < d; ++j) {
              yp[r * d + j] = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) / denom);
            }
          }
        });
      });
  return norm;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_normalize_cpu(const at::Tensor& x, double eps) {
  at::Tensor y;
  at::Tensor norm = normalize_rows(x, eps, &y);
  return {y, norm};
}

at::Tensor row_norms_cpu(const at::Tensor& x, double eps) { return normalize_rows(x, eps, nullptr); }

at::Tensor row_normalize_backward_cpu(const at::Tensor& g, const at::Tensor& y,
                                      const at::Tensor& norm, double eps) {
  check_row_normalize_backward_input(g, y, norm, eps);
  at::Tensor dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  row_normalize_backward_cpu_into(g, y, norm, eps, dx);
  return dx;
}

void row_normalize_backward_cpu_into(const at::Tensor& g_in, const at::Tensor& y_in,
                                     const at::Tensor& norm_in, double eps, at::Tensor& dx) {
  const at::Tensor g = g_in.contiguous().to(y_in.scalar_type());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor norm = norm_in.contiguous();
  const int64_t n = y.size(0), d = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "nnk_row_normalize_bwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        const scalar_t* yp = y.const_data_ptr<scalar_t>();
        const acc_t* np = norm.const_data_ptr<acc_t>();
        scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            acc_t dot = 0;
            for (int64_t j = 0; j < d; ++j) {
              dot += static_cast<acc_t>(gp[r * d + j]) * static_cast<acc_t>(yp[r * d + j]);
            }
            for (int64_t j = 0; j < d; ++j) {
              dp[r * d + j] = static_cast<scalar_t>(math::normalize_grad<acc_t>(
                  static_cast<acc_t>(gp[r * d + j]), static_cast<acc_t>(yp[r * d + j]),
                  dot, np[r], acc_t(eps)));
            }
          }
        });
      });
}

TORCH_LIBRARY_IMPL(nnk, CPU, m) {
  m.impl("row_normalize", &row_normalize_cpu);
  m.impl("row_normalize_backward", &row_normalize_backward_cpu);
}

}  // namespace nnk
