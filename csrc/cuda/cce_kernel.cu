// The two fused epilogues of the chunked cosine cross-entropy (the GEMMs
// around them are cuBLAS, called from cce_cuda.cpp). Every per-element formula
// is an element function of nnk/cce_chunk.h (built on nnk/math.h), the same
// ones the CPU implementation loops over.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "device_convert.cuh"
#include "launchers.h"
#include "nnk/cce_chunk.h"
#include "nnk/math.h"

namespace nnk {
namespace cuda {
namespace {

// Forward: threads per row, up to 1024 (32 warps): a row of a block holds
// thousands of classes (all C, or a class chunk of 8576 at C = 131072, D =
// 4096 in bf16: cce_driver.h tiling), which one CUDA block reduces with many
// loads in flight. Untimed; a candidate for tuning on a GPU.
constexpr int kMaxThreads = 1024;
constexpr int kColumnsPerBlock = 256;  // backward: columns per block

// Forward: one block per row. Each thread runs an online log-sum-exp over its
// strided columns (one exp per entry), then the (max, rest) pairs merge across
// the warp and the block with the same lse_merge. Thread 0 recomputes z at the
// target column (when this class chunk holds it) from the same element
// function and merges the row into its state (cce::merge_row): the finished
// row after the last class chunk.
template <typename A>
__global__ void __launch_bounds__(kMaxThreads) cce_forward_kernel(const cce::Chunk<A> ch,
                                                                 const cce::RowState<A> st) {
  const int64_t r = blockIdx.x;
  const int64_t t = cce::target_column(ch, r);
  // 1. Per-thread online lse and sum of logits over columns c = tid + k * blockDim.
  A run_max = -INFINITY, run_rest = 0, sum_z = 0;
  for (int64_t c = threadIdx.x; c < ch.classes; c += blockDim.x) {
    A cos_prime;
    const A z = cce::logit(ch, r, c, c == t, &cos_prime);
    math::lse_merge(run_max, run_rest, z, A(0));
    sum_z += z;
  }
  // 2. Warp merge (butterfly: every lane ends with the warp's pair, up to the
  //    last bit of rest where maxima tie; lane 0's is the one read).
  for (int off = 16; off > 0; off >>= 1) {
    const A o_max = __shfl_xor_sync(0xffffffffu, run_max, off);
    const A o_rest = __shfl_xor_sync(0xffffffffu, run_rest, off);
    math::lse_merge(run_max, run_rest, o_max, o_rest);
    sum_z += __shfl_xor_sync(0xffffffffu, sum_z, off);
  }
  // 3. Block merge through shared memory, in warp 0.
  __shared__ A s_max[kMaxThreads / 32], s_rest[kMaxThreads / 32], s_z[kMaxThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_warps = blockDim.x / 32;
  if (lane == 0) {
    s_max[warp] = run_max;
    s_rest[warp] = run_rest;
    s_z[warp] = sum_z;
  }
  __syncthreads();
  if (warp != 0) return;
  run_max = lane < n_warps ? s_max[lane] : A(-INFINITY);
  run_rest = lane < n_warps ? s_rest[lane] : A(0);
  sum_z = lane < n_warps ? s_z[lane] : A(0);
  for (int off = 16; off > 0; off >>= 1) {
    const A o_max = __shfl_xor_sync(0xffffffffu, run_max, off);
    const A o_rest = __shfl_xor_sync(0xffffffffu, run_rest, off);
    math::lse_merge(run_max, run_rest, o_max, o_rest);
    sum_z += __shfl_xor_sync(0xffffffffu, sum_z, off);
  }
  // 4. Into the row's state; after the last class chunk its lse (and the
  //    rounding residue) and loss (0 on ignored rows).
  if (lane != 0) return;
  A cos_prime, z_t = 0;
  if (t >= 0) z_t = cce::logit(ch, r, t, true, &cos_prime);
  cce::merge_row(ch, st, r, run_max, run_rest, sum_z, t >= 0, z_t);
}

// Backward: elementwise given the saved lse. Block (part, column tile): each
// thread owns one column and walks the kRowsPerPart rows of its band, writing
// d cos over the block (coalesced along the row) and keeping the band's column
// sums of d z and d z * cos' in registers: one partial per (band, column), no
// atomics, so d bias and d scale are reproducible. `dcos` may alias ch.block.
template <typename A, typename O>
__global__ void cce_backward_kernel(const cce::Chunk<A> ch, const cce::ChunkGrad<A> gr,
                                    O* dcos) {
  const int64_t part = blockIdx.x;
  const int64_t r_begin = part * cce::kRowsPerPart;
  const int64_t r_end =
      ch.rows < r_begin + cce::kRowsPerPart ? ch.rows : r_begin + cce::kRowsPerPart;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < ch.classes;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    A db = 0, ds = 0;
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t t = cce::target_column(ch, r);
      const A g = (cce::ignored(ch, r) || gr.grad_loss == nullptr) ? A(0) : gr.grad_loss[r];
      const A g_lse = gr.grad_lse != nullptr ? gr.grad_lse[r] : A(0);
      A dz, cos_prime;
      const A v = cce::dcosine(ch, r, c, c == t, gr.lse[r], gr.lse_lo[r], g, g_lse, &dz, &cos_prime);
      dcos[r * ch.classes + c] = from_acc<O>(v);
      if (c == t && gr.dcos_target != nullptr) gr.dcos_target[r] = v;
      db += dz;
      ds += dz * cos_prime;
    }
    if (gr.dbias_part != nullptr) gr.dbias_part[part * ch.classes + c] = db;
    if (gr.dscale_part != nullptr) gr.dscale_part[part * ch.classes + c] = ds;
  }
}

// The target-column terms of the 16-bit backward under the exact ArcFace
// gradient (CudaBackend in cce_cuda.cpp says why). Each warp takes
// kTermCols columns of its row or class, kTermColsPerLane per lane: that
// many independent coalesced loads per row, and gridDim.y column tiles, so
// that a class with many rows (C = 10, N = 8192, D = 4096: 820 rows each)
// spreads over D / kTermCols warps instead of walking D in one.
constexpr int kTermWarps = 4;
constexpr int kTermColsPerLane = 8;
constexpr int64_t kTermCols = 32 * kTermColsPerLane;

// One warp per row whose target is in the class chunk, per column tile:
// d xn_r += v w_t / max(||w_t||, eps) - round(v) wn_t, with v the target
// column's d cos (unrounded) and round(v), wn_t the 16-bit values the d xn
// GEMM multiplied: that GEMM's target term, recomputed in fp32 from W's raw
// row.
template <typename T>
__global__ void target_term_kernel(const cce::Chunk<float> ch, const float* __restrict__ dcos_t,
                                   const T* __restrict__ dcos, const T* __restrict__ w_rows,
                                   const T* __restrict__ wn, float* __restrict__ dxn, int64_t d) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kTermWarps + threadIdx.x / 32;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTermCols + threadIdx.x % 32;
  if (r >= ch.rows) return;
  const int64_t c = cce::target_column(ch, r);
  if (c < 0) return;
  const float v = dcos_t[r];
  const float used = to_acc(dcos[r * ch.classes + c]);
  const float denom = ch.w_norm != nullptr ? math::norm_divisor(ch.w_norm[c], ch.eps) : 1.0f;
#pragma unroll
  for (int u = 0; u < kTermColsPerLane; ++u) {
    const int64_t j = j0 + 32 * u;
    if (j < d) dxn[r * d + j] += v * (to_acc(w_rows[c * d + j]) / denom) - used * to_acc(wn[c * d + j]);
  }
}

// The same for d wn: one warp per class of the chunk that is some row's
// target, d wn_c += sum over those rows r, in row order, of v_r y_r -
// round(v_r) xn_r, y_r = x_r / max(||x_r||, eps) in fp32 from the raw row.
// `order` lists the block's rows stably sorted by their targets `sorted_t`
// (global classes; C for ignored rows), so each class's rows are a segment,
// whose first row's warp does the class. The lanes load 32 rows' scalars at
// a time and broadcast them. Each class is one warp's (per column tile): no
// atomics, the sums in a fixed order.
template <typename T>
__global__ void target_term_w_kernel(const cce::Chunk<float> ch, const float* __restrict__ dcos_t,
                                     const T* __restrict__ dcos, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ sorted_t,
                                     const T* __restrict__ x_rows, const T* __restrict__ xn,
                                     float* __restrict__ dwn, int64_t d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTermWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTermCols + lane;
  if (i >= ch.rows) return;
  const int64_t t = sorted_t[i], c = t - ch.c0;
  // Not a class of the chunk, or not its segment's first row.
  if (c < 0 || c >= ch.classes || (i > 0 && sorted_t[i - 1] == t)) return;
  float acc[kTermColsPerLane] = {};
  for (int64_t k0 = i;; k0 += 32) {
    // 1. This lane's row of the next 32 (the segment's rows are a prefix:
    //    sorted_t is sorted).
    const int64_t k = k0 + lane;
    const bool in = k < ch.rows && sorted_t[k] == t;
    int64_t r = 0;
    float v = 0.0f, used = 0.0f, denom = 1.0f;
    if (in) {
      r = order[k];
      v = dcos_t[r];
      used = to_acc(dcos[r * ch.classes + c]);
      if (ch.x_norm != nullptr) denom = math::norm_divisor(ch.x_norm[r], ch.eps);
    }
    const int count = warp_sum(static_cast<int>(in));
    // 2. Their terms, row after row, in this lane's columns.
    for (int q = 0; q < count; ++q) {
      const int64_t rq = __shfl_sync(0xffffffffu, r, q);
      const float vq = __shfl_sync(0xffffffffu, v, q), uq = __shfl_sync(0xffffffffu, used, q);
      const float dq = __shfl_sync(0xffffffffu, denom, q);
#pragma unroll
      for (int u = 0; u < kTermColsPerLane; ++u) {
        const int64_t j = j0 + 32 * u;
        if (j < d) acc[u] += vq * (to_acc(x_rows[rq * d + j]) / dq) - uq * to_acc(xn[rq * d + j]);
      }
    }
    if (count < 32) break;
  }
#pragma unroll
  for (int u = 0; u < kTermColsPerLane; ++u) {
    const int64_t j = j0 + 32 * u;
    if (j < d) dwn[c * d + j] += acc[u];
  }
}

// One warp per row: the float64 sums of math::target_sine over strided
// features (memory-bound; O(N D) against the GEMMs' O(N C D)).
constexpr int kSineWarps = 4;

template <typename T>
__global__ void target_sine_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                   const int64_t* __restrict__ target, int64_t n, int64_t d,
                                   int64_t classes, double eps, double threshold,
                                   float* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  const int64_t t = (target[row] >= 0 && target[row] < classes) ? target[row] : 0;
  const T* xr = x + row * d;
  const T* wr = w + t * d;
  double xx = 0, ww = 0, xw = 0;
  for (int64_t j = lane; j < d; j += 32) {
    const double xv = static_cast<double>(to_acc(xr[j]));
    const double wv = static_cast<double>(to_acc(wr[j]));
    xx += xv * xv;
    ww += wv * wv;
    xw += xv * wv;
  }
  xx = warp_sum(xx);
  ww = warp_sum(ww);
  xw = warp_sum(xw);
  if (lane == 0) out[row] = static_cast<float>(math::target_sine(xx, ww, xw, eps, threshold));
}

template <typename T>
cudaError_t target_sine(const void* x, const void* w, const int64_t* target, int64_t n, int64_t d,
                        int64_t classes, double eps, double threshold, float* out, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kSineWarps - 1) / kSineWarps;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  target_sine_kernel<T><<<static_cast<unsigned>(blocks), kSineWarps * 32, 0, s>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), target, n, d, classes, eps, threshold, out);
  return cudaGetLastError();
}

// The target-term kernels' grid: kTermWarps rows per block, column tiles
// over y. False if it does not fit.
bool term_grid(int64_t rows, int64_t d, dim3* grid) {
  const int64_t blocks = (rows + kTermWarps - 1) / kTermWarps, tiles = (d + kTermCols - 1) / kTermCols;
  if (!grid_fits(blocks, tiles)) return false;
  *grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles));
  return true;
}

template <typename T>
cudaError_t target_term(const cce::Chunk<float>& ch, const float* dcos_t, const void* dcos,
                        const void* w_rows, const void* wn, float* dxn, int64_t d, cudaStream_t s) {
  if (ch.rows == 0 || d == 0) return cudaSuccess;
  dim3 grid;
  if (!term_grid(ch.rows, d, &grid)) return cudaErrorInvalidConfiguration;
  target_term_kernel<T><<<grid, kTermWarps * 32, 0, s>>>(
      ch, dcos_t, static_cast<const T*>(dcos), static_cast<const T*>(w_rows),
      static_cast<const T*>(wn), dxn, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t target_term_w(const cce::Chunk<float>& ch, const float* dcos_t, const void* dcos,
                          const int64_t* order, const int64_t* sorted_t, const void* x_rows,
                          const void* xn, float* dwn, int64_t d, cudaStream_t s) {
  if (ch.rows == 0 || d == 0) return cudaSuccess;
  dim3 grid;
  if (!term_grid(ch.rows, d, &grid)) return cudaErrorInvalidConfiguration;
  target_term_w_kernel<T><<<grid, kTermWarps * 32, 0, s>>>(
      ch, dcos_t, static_cast<const T*>(dcos), order, sorted_t, static_cast<const T*>(x_rows),
      static_cast<const T*>(xn), dwn, d);
  return cudaGetLastError();
}

template <typename A>
cudaError_t forward(const cce::Chunk<A>& ch, const cce::RowState<A>& st, cudaStream_t s) {
  if (ch.rows == 0) return cudaSuccess;
  // Enough warps to cover C once, at most kMaxThreads.
  int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (ch.classes + 31) / 32 * 32));
  if (!grid_fits(ch.rows)) return cudaErrorInvalidConfiguration;
  cce_forward_kernel<A><<<static_cast<unsigned>(ch.rows), threads, 0, s>>>(ch, st);
  return cudaGetLastError();
}

template <typename A, typename O>
cudaError_t backward(const cce::Chunk<A>& ch, const cce::ChunkGrad<A>& gr, void* dcos,
                     cudaStream_t s) {
  if (ch.rows == 0) return cudaSuccess;
  const int64_t tiles = (ch.classes + kColumnsPerBlock - 1) / kColumnsPerBlock;
  if (!grid_fits(cce::num_parts(ch.rows))) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(cce::num_parts(ch.rows)),
                  static_cast<unsigned>(std::min<int64_t>(tiles, 65535)));
  cce_backward_kernel<A, O><<<grid, kColumnsPerBlock, 0, s>>>(ch, gr, static_cast<O*>(dcos));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_target_sine(DType dtype, const void* x, const void* w, const int64_t* target,
                               int64_t n, int64_t d, int64_t classes, double eps, double threshold,
                               float* out, cudaStream_t s) {
  switch (dtype) {
    case DType::kFloat32:
      return target_sine<float>(x, w, target, n, d, classes, eps, threshold, out, s);
    case DType::kFloat16:
      return target_sine<__half>(x, w, target, n, d, classes, eps, threshold, out, s);
    case DType::kBFloat16:
      return target_sine<__nv_bfloat16>(x, w, target, n, d, classes, eps, threshold, out, s);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_cce_target_term(const cce::Chunk<float>& ch, const float* dcos_target,
                                   DType gemm_dtype, const void* dcos, const void* w_rows,
                                   const void* wn, float* dxn, int64_t d, cudaStream_t s) {
  switch (gemm_dtype) {
    case DType::kFloat16: return target_term<__half>(ch, dcos_target, dcos, w_rows, wn, dxn, d, s);
    case DType::kBFloat16:
      return target_term<__nv_bfloat16>(ch, dcos_target, dcos, w_rows, wn, dxn, d, s);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_cce_target_term_w(const cce::Chunk<float>& ch, const float* dcos_target,
                                     DType gemm_dtype, const void* dcos, const int64_t* order,
                                     const int64_t* sorted_t, const void* x_rows, const void* xn,
                                     float* dwn, int64_t d, cudaStream_t s) {
  switch (gemm_dtype) {
    case DType::kFloat16:
      return target_term_w<__half>(ch, dcos_target, dcos, order, sorted_t, x_rows, xn, dwn, d, s);
    case DType::kBFloat16:
      return target_term_w<__nv_bfloat16>(ch, dcos_target, dcos, order, sorted_t, x_rows, xn,
                                          dwn, d, s);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_cce_forward_epilogue(const cce::Chunk<float>& ch,
                                        const cce::RowState<float>& st, cudaStream_t s) {
  return forward<float>(ch, st, s);
}

cudaError_t launch_cce_forward_epilogue(const cce::Chunk<double>& ch,
                                        const cce::RowState<double>& st, cudaStream_t s) {
  return forward<double>(ch, st, s);
}

cudaError_t launch_cce_backward_epilogue(const cce::Chunk<float>& ch,
                                         const cce::ChunkGrad<float>& gr, void* dcos,
                                         DType dcos_dtype, cudaStream_t s) {
  switch (dcos_dtype) {
    case DType::kFloat32: return backward<float, float>(ch, gr, dcos, s);
    case DType::kFloat16: return backward<float, __half>(ch, gr, dcos, s);
    case DType::kBFloat16: return backward<float, __nv_bfloat16>(ch, gr, dcos, s);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_cce_backward_epilogue(const cce::Chunk<double>& ch,
                                         const cce::ChunkGrad<double>& gr, void* dcos,
                                         DType dcos_dtype, cudaStream_t s) {
  if (dcos_dtype != DType::kFloat64) return cudaErrorInvalidValue;
  return backward<double, double>(ch, gr, dcos, s);
}

}  // namespace cuda
}  // namespace nnk
