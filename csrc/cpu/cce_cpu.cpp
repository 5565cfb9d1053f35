// CPU implementation of nnk::cosine_cross_entropy_fwd / _bwd / _fwd_bwd: the chunk loop
// of nnk/cce_driver.h with GEMMs in the accumulation dtype (float32, float64
// for float64) and the epilogues as loops over the element functions of
// nnk/cce_chunk.h, the same ones the CUDA kernels call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "nnk/cce_chunk.h"
#include "nnk/cce_driver.h"
#include "row_normalize_cpu.h"

namespace nnk {
namespace {

struct CpuBackend {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  // The CPU has no fast half GEMM: operands are converted once to the
  // accumulation dtype, so every product and the d cos block are fp32/fp64,
  // and no GEMM operand is rounded (no add_target_term).
  static at::ScalarType gemm_dtype(at::ScalarType t) { return cce::acc_dtype(t); }
  static constexpr bool kTargetTerm = false;

  static at::Tensor row_norms(const at::Tensor& x, double eps) {
    return row_norms_cpu(x, eps);
  }

  static std::tuple<at::Tensor, at::Tensor> row_normalize(const at::Tensor& x, double eps) {
    return row_normalize_cpu(x, eps);
  }

  // Into the gradient's rows; the normalized rows y are float32 for 16-bit
  // inputs (gemm_dtype), whose gradient rows are written through a copy.
  // y is x / max(norm, eps) unrounded in the accumulation dtype already: the
  // raw rows x are not needed.
  static void row_normalize_backward(const at::Tensor& g, const at::Tensor& y,
                                     const at::Tensor& /*x*/, const at::Tensor& norm, double eps,
                                     at::Tensor& out) {
    if (out.scalar_type() == y.scalar_type()) {
      row_normalize_backward_cpu_into(g, y, norm, eps, out);
    } else {
      out.copy_(row_normalize_backward_cpu(g, y, norm, eps));
    }
  }

  static void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  }

  // Checked eagerly: on the CPU this costs no device synchronization.
  static void check_values(const char* op, const at::Tensor& target, int64_t classes,
                           int64_t ignore_index, const at::Tensor& scale, at::ScalarType acc) {
    TORCH_CHECK(cce::scale_ok(scale, acc).item<bool>(), op, ": scale must be finite and > 0 in ", acc);
    const at::Tensor t = target.contiguous();
    const int64_t* p = t.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < classes),
                  op, ": target values must be in [0, ", classes,
                  ") or ignore_index=", ignore_index, ", got ", p[i], " at row ", i);
    }
  }

  // x, w: contiguous float32 (the GEMM dtype of 16/32-bit inputs on the CPU).
  static at::Tensor target_sines(const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& target, const cce::Options& o) {
    TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                          x.is_contiguous() && w.is_contiguous() && target.is_contiguous());
    const int64_t n = x.size(0), d = x.size(1), classes = w.size(0);
    at::Tensor out = at::empty({n}, x.options());
    const float* xp = x.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    const int64_t* tp = target.const_data_ptr<int64_t>();
    float* op = out.mutable_data_ptr<float>();
    const double threshold = -std::cos(o.angular_margin);
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        // Ignored rows (and, on this path unreachable, bad targets) use class 0.
        const int64_t t = (tp[r] >= 0 && tp[r] < classes) ? tp[r] : 0;
        const float* xr = xp + r * d;
        const float* wr = wp + t * d;
        double xx = 0, ww = 0, xw = 0;
        for (int64_t j = 0; j < d; ++j) {
          const double xv = xr[j], wv = wr[j];
          xx += xv * xv;
          ww += wv * wv;
          xw += xv * wv;
        }
        op[r] = static_cast<float>(math::target_sine(xx, ww, xw, o.eps, threshold));
      }
    });
    return out;
  }

  static constexpr int64_t kSumBlock = 256;

  template <typename A>
  static void forward_epilogue(const cce::Chunk<A>& ch, const cce::RowState<A>& st) {
    at::parallel_for(0, ch.rows, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = cce::target_column(ch, r);
        // Two-level sums: sequential within blocks of kSumBlock classes, then
        // across blocks. A single running sum over C = 1e6 classes loses
        // ~sqrt(C) ulps (measured 6x the reference's lse error at N=1,
        // C=1e6); the GPU kernel gets the same effect from its thread tree.
        A run_max = -INFINITY, run_rest = 0, sum_z = 0, z_t = 0;
        for (int64_t c0 = 0; c0 < ch.classes; c0 += kSumBlock) {
          const int64_t c1 = std::min(ch.classes, c0 + kSumBlock);
          A blk_max = -INFINITY, blk_rest = 0, blk_z = 0;
          for (int64_t c = c0; c < c1; ++c) {
            A cos_prime;
            const A z = cce::logit(ch, r, c, c == t, &cos_prime);
            math::lse_merge(blk_max, blk_rest, z, A(0));
            blk_z += z;
            if (c == t) z_t = z;
          }
          math::lse_merge(run_max, run_rest, blk_max, blk_rest);
          sum_z += blk_z;
        }
        cce::merge_row(ch, st, r, run_max, run_rest, sum_z, t >= 0, z_t);
      }
    });
  }

  template <typename A>
  static void backward_epilogue(const cce::Chunk<A>& ch, const cce::ChunkGrad<A>& gr,
                                at::Tensor& dcos) {
    TORCH_INTERNAL_ASSERT(dcos.scalar_type() == c10::CppTypeToScalarType<A>::value);
    A* out = dcos.mutable_data_ptr<A>();  // may alias ch.block: each entry is read first
    const int64_t cls = ch.classes;
    // One band of kRowsPerPart rows per task, each with its own partial row:
    // the sums do not depend on the thread count.
    at::parallel_for(0, cce::num_parts(ch.rows), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        A* db = gr.dbias_part != nullptr ? gr.dbias_part + part * cls : nullptr;
        A* ds = gr.dscale_part != nullptr ? gr.dscale_part + part * cls : nullptr;
        if (db != nullptr) std::fill(db, db + cls, A(0));
        if (ds != nullptr) std::fill(ds, ds + cls, A(0));
        const int64_t r_end = std::min(ch.rows, (part + 1) * cce::kRowsPerPart);
        for (int64_t r = part * cce::kRowsPerPart; r < r_end; ++r) {
          const int64_t t = cce::target_column(ch, r);
          const A g = (cce::ignored(ch, r) || gr.grad_loss == nullptr) ? A(0) : gr.grad_loss[r];
          const A g_lse = gr.grad_lse != nullptr ? gr.grad_lse[r] : A(0);
          for (int64_t c = 0; c < cls; ++c) {
            A dz, cos_prime;
            out[r * cls + c] = cce::dcosine(ch, r, c, c == t, gr.lse[r], gr.lse_lo[r], g, g_lse, &dz,
                                            &cos_prime);
            if (c == t && gr.dcos_target != nullptr) gr.dcos_target[r] = out[r * cls + c];
            if (db != nullptr) db[c] += dz;
            if (ds != nullptr) ds[c] += dz * cos_prime;
          }
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(nnk, CPU, m) {
  m.impl("cosine_cross_entropy_fwd", &cce::forward_op<CpuBackend>);
  m.impl("cosine_cross_entropy_bwd", &cce::backward_op<CpuBackend>);
  m.impl("cosine_cross_entropy_fwd_bwd", &cce::forward_backward_op<CpuBackend>);
}

}  // namespace nnk
