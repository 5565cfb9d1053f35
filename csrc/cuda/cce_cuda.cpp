// CUDA implementation of nnk::cosine_cross_entropy_fwd / _bwd / _fwd_bwd: the chunk loop
// of nnk/cce_driver.h with cuBLAS GEMMs (through ATen, on the current stream)
// on the raw fp16/bf16/fp32 operands with fp32 output, and the fused
// epilogues and row-normalization kernels of cce_kernel.cu /
// row_normalize_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "dtype.h"
#include "launchers.h"
#include "nnk/cce_chunk.h"
#include "nnk/cce_driver.h"

namespace nnk {
namespace {

cuda::DType launch_dtype(const at::Tensor& t) {
  return cuda::to_launch_dtype(t.scalar_type(), "nnk::cosine_cross_entropy");
}

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  // Tensor-core GEMMs on the input dtype; cuBLAS accumulates in fp32.
  static at::ScalarType gemm_dtype(at::ScalarType t) { return t; }

  // fp16/bf16 GEMMs round d cos and the normalized rows of x and W to 16
  // bits. In d xn_r = sum_c d cos_rc wn_c and d wn_c = sum_r d cos_rc xn_r
  // that is harmless but on the target column, whose d cos the exact ArcFace
  // gradient multiplies by ~cos / sin near theta = 0: the rounding of wn_t
  // (xn_r) then dominates d x (d W), which the normalization backward takes
  // orthogonal to x (w_t), where the true term vanishes. Measured in the CUDA
  // emulation (tests/cuda_emulation) at x = 2 w_t, s = 64, m = 0.5: d x 117x
  // (fp16) and 170x (bf16) the reference's error. So those terms are taken
  // again in fp32 from the unrounded d cos and the raw rows
  // (launch_cce_target_term, launch_cce_target_term_w).
  static constexpr bool kTargetTerm = true;

  static void add_target_term(const cce::Chunk<float>& ch, const at::Tensor& dcos_target,
                              const at::Tensor& dcos, const at::Tensor& w_rows,
                              const at::Tensor& wn, at::Tensor& dxn) {
    TORCH_INTERNAL_ASSERT(dcos.scalar_type() == w_rows.scalar_type() &&
                          wn.scalar_type() == w_rows.scalar_type() && dxn.is_contiguous() &&
                          dcos.is_contiguous() && w_rows.is_contiguous() && wn.is_contiguous());
    C10_CUDA_CHECK(cuda::launch_cce_target_term(
        ch, dcos_target.const_data_ptr<float>(), launch_dtype(dcos), dcos.const_data_ptr(),
        w_rows.const_data_ptr(), wn.const_data_ptr(), dxn.mutable_data_ptr<float>(), dxn.size(1),
        c10::cuda::getCurrentCUDAStream()));
  }

  // Each row chunk's rows ([r0, r0 + rows), the last chunk partial) stably
  // sorted by target: (their local indices r - r0, their targets with
  // `classes` for ignored rows), both (N,) int64, chunk after chunk. One
  // device sort per backward (not one per block of the class-chunk loop),
  // no host sync.
  static std::pair<at::Tensor, at::Tensor> rows_by_target(const at::Tensor& target, int64_t rows,
                                                          int64_t classes, int64_t ignore_index) {
    const at::Tensor held = (target >= 0) & (target < classes) & (target != ignore_index);
    const at::Tensor chunk = at::div(at::arange(target.size(0), target.options()), rows, "floor");
    const auto [key, order] = at::sort(chunk * (classes + 1) + at::where(held, target, classes),
                                       /*stable=*/std::optional<bool>(true), /*dim=*/0,
                                       /*descending=*/false);
    // The chunk is the major key: position p holds a row of chunk p / rows.
    return {order - chunk * rows, key - chunk * (classes + 1)};
  }

  // order, sorted_t: the block's slices of rows_by_target's.
  static void add_target_term_w(const cce::Chunk<float>& ch, const at::Tensor& dcos_target,
                                const at::Tensor& dcos, const at::Tensor& order,
                                const at::Tensor& sorted_t, const at::Tensor& x_rows,
                                const at::Tensor& xn, at::Tensor& dwn) {
    TORCH_INTERNAL_ASSERT(dcos.scalar_type() == x_rows.scalar_type() &&
                          xn.scalar_type() == x_rows.scalar_type() && dwn.is_contiguous() &&
                          dcos.is_contiguous() && x_rows.is_contiguous() && xn.is_contiguous() &&
                          order.numel() == ch.rows && sorted_t.numel() == ch.rows);
    C10_CUDA_CHECK(cuda::launch_cce_target_term_w(
        ch, dcos_target.const_data_ptr<float>(), launch_dtype(dcos), dcos.const_data_ptr(),
        order.const_data_ptr<int64_t>(), sorted_t.const_data_ptr<int64_t>(),
        x_rows.const_data_ptr(), xn.const_data_ptr(), dwn.mutable_data_ptr<float>(), dwn.size(1),
        c10::cuda::getCurrentCUDAStream()));
  }

  static at::Tensor row_norms(const at::Tensor& x, double eps) {
    at::Tensor norm = at::empty({x.size(0)}, x.options().dtype(cce::acc_dtype(x.scalar_type())));
    C10_CUDA_CHECK(cuda::launch_row_normalize_fwd(launch_dtype(x), x.const_data_ptr(), nullptr,
                                                  norm.mutable_data_ptr(), x.size(0), x.size(1),
                                                  eps, c10::cuda::getCurrentCUDAStream()));
    return norm;
  }

  static std::tuple<at::Tensor, at::Tensor> row_normalize(const at::Tensor& x, double eps) {
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor norm = at::empty({x.size(0)}, x.options().dtype(cce::acc_dtype(x.scalar_type())));
    C10_CUDA_CHECK(cuda::launch_row_normalize_fwd(launch_dtype(x), x.const_data_ptr(),
                                                  y.mutable_data_ptr(), norm.mutable_data_ptr(),
                                                  x.size(0), x.size(1), eps,
                                                  c10::cuda::getCurrentCUDAStream()));
    return {y, norm};
  }

  // g: accumulation dtype (fp32 for fp16/bf16 rows: projected before
  // rounding); written straight into the gradient's rows `out` (contiguous,
  // x's dtype: the GEMM dtype is the input's), with no temporary. y is
  // formed from the raw rows x in the accumulation dtype (the GEMMs' 16-bit
  // y is not unit-norm to fp32 precision: launch_row_normalize_bwd).
  static void row_normalize_backward(const at::Tensor& g_in, const at::Tensor& /*y*/,
                                     const at::Tensor& x, const at::Tensor& norm, double eps,
                                     at::Tensor& out) {
    TORCH_INTERNAL_ASSERT(out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                          x.is_contiguous() && out.sizes() == x.sizes());
    const at::Tensor g = g_in.contiguous();
    C10_CUDA_CHECK(cuda::launch_row_normalize_bwd(
        launch_dtype(x), launch_dtype(g), g.const_data_ptr(), x.const_data_ptr(), /*raw=*/true,
        norm.const_data_ptr(), out.mutable_data_ptr(), x.size(0), x.size(1), eps,
        c10::cuda::getCurrentCUDAStream()));
  }

  // out (fp32/fp64) (+)= a @ b. fp16/bf16 operands use the out_dtype GEMMs
  // (aten::mm.dtype_out, aten::baddbmm.dtype_out): fp32 output and, for the
  // d W accumulator, beta = 1 on the fp32 buffer, with no 16-bit rounding.
  //
  // fp32 operands get fp32 products whatever torch's TF32 setting: a user's
  // torch.backends.cuda.matmul.allow_tf32 = True would otherwise round them
  // to 10-bit mantissas (cosine errors ~6e-5, 500x fp32's; 4e-3 in a logit
  // at s = 64), where the Triton path's tl.dot is "ieee" for fp32. The guard
  // is thread-local; torch's cuBLASLt path (preferred_blas_library
  // "cublaslt") does not consult it (README, "How the kernels work").
  static void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    at::NoTF32Guard full_fp32_products;
    if (a.scalar_type() == out.scalar_type()) {
      if (accumulate) {
        out.addmm_(a, b);
      } else {
        at::mm_out(out, a, b);
      }
    } else if (!accumulate) {
      at::mm_out(out, a, b, out.scalar_type());
    } else {
      at::Tensor out3 = out.unsqueeze(0);
      at::baddbmm_out(out3, out3, a.unsqueeze(0), b.unsqueeze(0), out.scalar_type());
    }
  }

  // x, w: contiguous in the input dtype (the GEMM dtype), float16 / bfloat16 / float32.
  static at::Tensor target_sines(const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& target, const cce::Options& o) {
    TORCH_INTERNAL_ASSERT(x.is_contiguous() && w.is_contiguous() && target.is_contiguous() &&
                          x.scalar_type() == w.scalar_type());
    at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::launch_target_sine(launch_dtype(x), x.const_data_ptr(), w.const_data_ptr(),
                                            target.const_data_ptr<int64_t>(), x.size(0), x.size(1),
                                            w.size(0), o.eps, -std::cos(o.angular_margin),
                                            out.mutable_data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream()));
    return out;
  }

  // On the device without a host synchronization: asynchronous asserts (a
  // device-side assert at the next synchronization, as PyTorch's own
  // indexing kernels). The epilogues never index memory by a target, so a bad
  // one cannot read out of bounds before the assert fires. nnk.functional
  // checks both eagerly (with a sync) outside torch.compile.
  static void check_values(const char* op, const at::Tensor& target, int64_t classes,
                           int64_t ignore_index, const at::Tensor& scale, at::ScalarType acc) {
    at::_assert_async(cce::scale_ok(scale, acc),
                      (std::string(op) + ": scale must be finite and > 0").c_str());
    if (target.numel() == 0) return;
    const at::Tensor ok = ((target >= 0) & (target < classes)) | (target == ignore_index);
    at::_assert_async(ok.all(), (std::string(op) + ": target values out of range").c_str());
  }

  template <typename A>
  static void forward_epilogue(const cce::Chunk<A>& ch, const cce::RowState<A>& st) {
    C10_CUDA_CHECK(cuda::launch_cce_forward_epilogue(ch, st, c10::cuda::getCurrentCUDAStream()));
  }

  template <typename A>
  static void backward_epilogue(const cce::Chunk<A>& ch, const cce::ChunkGrad<A>& gr,
                                at::Tensor& dcos) {
    C10_CUDA_CHECK(cuda::launch_cce_backward_epilogue(ch, gr, dcos.mutable_data_ptr(),
                                                      launch_dtype(dcos),
                                                      c10::cuda::getCurrentCUDAStream()));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(nnk, CUDA, m) {
  m.impl("cosine_cross_entropy_fwd", &cce::forward_op<CudaBackend>);
  m.impl("cosine_cross_entropy_bwd", &cce::backward_op<CudaBackend>);
  m.impl("cosine_cross_entropy_fwd_bwd", &cce::forward_backward_op<CudaBackend>);
}

}  // namespace nnk
