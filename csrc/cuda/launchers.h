// Torch-free entry points of the CUDA kernels (raw pointers, sizes and a
// stream), so that the .cu files compile in seconds without ATen; the ATen
// wrappers and TORCH_LIBRARY_IMPL(nnk, CUDA) live in the *_cuda.cpp files.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "nnk/cce_chunk.h"

namespace nnk {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Whether a grid fits the hardware (x < 2^31, y and z < 2^16). The launchers
// return cudaErrorInvalidConfiguration before launching one that does not:
// the casts to unsigned would otherwise wrap and leave rows or classes
// unwritten. Reached only at sizes far beyond the ones nnk is built for
// (e.g. 2^31 classes in nc_class_sums).
inline bool grid_fits(int64_t x, int64_t y = 1, int64_t z = 1) {
  return x <= 2147483647 && y <= 65535 && z <= 65535;
}

// x, y: (n, d) row-major of `dtype`; norm: (n,) float64 for kFloat64, else float32.
// y == nullptr computes the norms only.
cudaError_t launch_row_normalize_fwd(DType dtype, const void* x, void* y, void* norm,
                                     int64_t n, int64_t d, double eps,
                                     cudaStream_t stream);

// rows, dx: (n, d) row-major of `dtype`; g: (n, d) of `g_dtype`, which is
// `dtype` or, for kFloat16 / kBFloat16 rows, kFloat32; norm as above. rows:
// the normalized rows y, or with `raw` the rows x they normalize (y is then
// formed in the accumulation type, unrounded).
cudaError_t launch_row_normalize_bwd(DType dtype, DType g_dtype, const void* g,
                                     const void* rows, bool raw, const void* norm, void* dx,
                                     int64_t n, int64_t d, double eps, cudaStream_t stream);

// --- Fused cosine cross-entropy epilogues (cce_kernel.cu) ---------------------
// Forward: per row of the chunk, its reductions over the chunk's classes
// merged into the row state, and after the last class chunk its lse (and the
// residue of its rounding, math::lse_finish) and loss (cce::merge_row).
cudaError_t launch_cce_forward_epilogue(const cce::Chunk<float>& ch,
                                        const cce::RowState<float>& st, cudaStream_t stream);
cudaError_t launch_cce_forward_epilogue(const cce::Chunk<double>& ch,
                                        const cce::RowState<double>& st, cudaStream_t stream);

// Backward: d cos of every entry into `dcos` ((rows, classes) of `dcos_dtype`;
// it may alias ch.block when the types agree) and the per-band partial column
// sums of d z and d z * cos' (grad.dbias_part / dscale_part, when not null).
// dcos_dtype: kFloat32 / kFloat16 / kBFloat16 for float chunks, kFloat64 for double.
// The d xn GEMM's target term again in fp32 (target_term_kernel): dxn
// (rows, d) float32 += for each row r whose target column c this chunk holds,
// dcos_target[r] * w_rows[c] / max(w_norm[c], eps) - dcos[r, c] * wn[c];
// dcos (rows, classes), w_rows and wn (classes, d) of gemm_dtype (kFloat16 or
// kBFloat16), w_rows W's raw rows and wn their normalized copy.
cudaError_t launch_cce_target_term(const cce::Chunk<float>& ch, const float* dcos_target,
                                   DType gemm_dtype, const void* dcos, const void* w_rows,
                                   const void* wn, float* dxn, int64_t d, cudaStream_t stream);

// The d wn GEMM's target terms again in fp32 (target_term_w_kernel): dwn
// (classes, d) float32 += for each class c, over the rows r whose target it
// is, dcos_target[r] * x_rows[r] / max(x_norm[r], eps) - dcos[r, c] * xn[r];
// order / sorted_t (rows,): the block's rows (local indices) stably sorted by
// target, and those targets (global classes; C for ignored rows);
// x_rows (x's raw rows) and xn (their normalized copy) (rows, d) of gemm_dtype.
cudaError_t launch_cce_target_term_w(const cce::Chunk<float>& ch, const float* dcos_target,
                                     DType gemm_dtype, const void* dcos, const int64_t* order,
                                     const int64_t* sorted_t, const void* x_rows, const void* xn,
                                     float* dwn, int64_t d, cudaStream_t stream);

cudaError_t launch_cce_backward_epilogue(const cce::Chunk<float>& ch,
                                         const cce::ChunkGrad<float>& grad, void* dcos,
                                         DType dcos_dtype, cudaStream_t stream);
cudaError_t launch_cce_backward_epilogue(const cce::Chunk<double>& ch,
                                         const cce::ChunkGrad<double>& grad, void* dcos,
                                         DType dcos_dtype, cudaStream_t stream);

// out[r] = math::target_sine of row r of x and row t of w (t = target[r], or 0
// when outside [0, classes): ignored rows), the float64 sums over d features,
// -1 where the cosine is below `threshold` (-cos m). x: (n, d), w: (classes,
// d), row-major of `dtype` (kFloat32 / kFloat16 / kBFloat16); out: (n,) float32.
cudaError_t launch_target_sine(DType dtype, const void* x, const void* w, const int64_t* target,
                               int64_t n, int64_t d, int64_t classes, double eps, double threshold,
                               float* out, cudaStream_t stream);

// --- Neural-collapse statistics (nc_kernel.cu) --------------------------------
// Both reductions are deterministic (a fixed summation order, no float
// atomics); for parallelism they split the rows into `splits` ranges whose
// partial results the caller sums in a fixed order (splits == 1: the final
// result is written directly).

// counts[k] = #{i : labels[i] = k} (int64, zeroed by the caller); labels outside
// [0, classes) are not counted and add 1 to *bad (int64, zeroed by the caller).
cudaError_t launch_nc_count(const int64_t* labels, int64_t n, int64_t classes, int64_t* counts,
                            int64_t* bad, cudaStream_t stream);

// partial[s, b, k, :] = sum of features[b, perm[r], :] over the s-th of
// `splits` equal ranges of r in [offsets[k], offsets[k] + counts[k]) (perm: the
// rows sorted by label, offsets: the exclusive prefix sum of counts).
// features: (batches, n, d) row-major of `dtype`; partial in `acc`, which must
// be kFloat64 (nc::sums_dtype) for every feature dtype.
int64_t nc_class_sums_splits(int64_t batches, int64_t n, int64_t d, int64_t classes);
cudaError_t launch_nc_class_sums(DType dtype, DType acc, const void* features,
                                 const int64_t* perm, const int64_t* offsets,
                                 const int64_t* counts, int64_t batches, int64_t n, int64_t d,
                                 int64_t classes, int64_t splits, void* partial,
                                 cudaStream_t stream);

// partial[s, b] = sum over the s-th row range of (h_i - c[y_i]) (h_i - c[y_i])^T
// with h_i = features[b, i], c = shifts[b] if shifts_batched else shifts[0]:
// a (d, d) Gram, the centering fused into the tile loads. features: (batches,
// n, d) of `dtype`; shifts (*, classes, d) in `acc` (kFloat32 or kFloat64;
// kFloat64 accepts every feature dtype), the type of the products, which are
// summed in float64 over chunks of rows; partial float64 whatever `acc`.
// Labels outside [0, classes) center on 0 (never read out of bounds).
int64_t nc_gram_splits(int64_t batches, int64_t n, int64_t d);
cudaError_t launch_nc_centered_gram(DType dtype, DType acc, const void* features,
                                    const int64_t* labels, const void* shifts,
                                    bool shifts_batched, int64_t batches, int64_t n, int64_t d,
                                    int64_t classes, int64_t splits, void* partial,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace nnk
