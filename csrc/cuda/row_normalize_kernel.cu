// Row L2-normalization forward and backward: one warp per row, the sum of
// squares accumulated in fp64 for every dtype, <y, g> in fp32 (fp64 for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_convert.cuh"
#include "launchers.h"
#include "nnk/math.h"

namespace nnk {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void row_normalize_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                         typename Acc<T>::type* __restrict__ norm,
                                         int64_t n, int64_t d, double eps) {
  using A = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  const T* xr = x + row * d;
  // Squares summed in double: no overflow/underflow for any float input (a
  // float sum overflows above |x| ~ 1e19). The pass is memory-bound.
  double ss = 0;
  for (int64_t j = lane; j < d; j += 32) {
    const double v = static_cast<double>(to_acc(xr[j]));
    ss += v * v;
  }
  ss = warp_sum(ss);
  const A nr = static_cast<A>(sqrt(ss));
  const A denom = math::norm_divisor(nr, A(eps));
  if (lane == 0) norm[row] = nr;
  if (y == nullptr) return;  // norms only
  T* yr = y + row * d;
  for (int64_t j = lane; j < d; j += 32) yr[j] = from_acc<T>(to_acc(xr[j]) / denom);
}

// g may be T or the accumulation type (an fp32 gradient of fp16/bf16 rows is
// projected without first rounding it to 16 bits). `rows` are y, or with
// `raw` the rows x that y normalizes, y = x / max(||x||, eps) then taken in
// the accumulation type as the forward kernel forms it before rounding:
// with fp16/bf16 y, <y, y> is 1 only to ~2^-8 (bf16), and (g - y <y, g>)
// keeps that fraction of g's component along y. The fused cross-entropy
// (CudaBackend) projects this way: its exact ArcFace gradient near
// theta = 0 puts a component along y 1e2-1e3 times the result into g.
template <typename T, typename G>
__global__ void row_normalize_bwd_kernel(const G* __restrict__ g, const T* __restrict__ rows,
                                         bool raw, const typename Acc<T>::type* __restrict__ norm,
                                         T* __restrict__ dx, int64_t n, int64_t d,
                                         double eps) {
  using A = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  const G* gr = g + row * d;
  const T* yr = rows + row * d;
  const A nr = norm[row];
  // A division, as the forward's: x / ||x|| is +-1 exactly at D = 1, where a
  // reciprocal times x is not (test_one_feature_rows_get_no_input_gradient).
  const A denom = math::norm_divisor(nr, A(eps));
  const auto y_at = [&](int64_t j) { return raw ? to_acc(yr[j]) / denom : to_acc(yr[j]); };
  A dot = 0;
  for (int64_t j = lane; j < d; j += 32) dot += to_acc(gr[j]) * y_at(j);
  dot = warp_sum(dot);
  T* dr = dx + row * d;
  for (int64_t j = lane; j < d; j += 32) {
    dr[j] = from_acc<T>(math::normalize_grad<A>(to_acc(gr[j]), y_at(j), dot, nr, A(eps)));
  }
}

int64_t blocks_for(int64_t n) { return (n + kWarpsPerBlock - 1) / kWarpsPerBlock; }

template <typename T>
cudaError_t fwd(const void* x, void* y, void* norm, int64_t n, int64_t d, double eps,
                cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (!grid_fits(blocks_for(n))) return cudaErrorInvalidConfiguration;
  row_normalize_fwd_kernel<T><<<static_cast<unsigned>(blocks_for(n)), kWarpsPerBlock * 32, 0, s>>>(
      static_cast<const T*>(x), static_cast<T*>(y),
      static_cast<typename Acc<T>::type*>(norm), n, d, eps);
  return cudaGetLastError();
}

template <typename T, typename G = T>
cudaError_t bwd(const void* g, const void* rows, bool raw, const void* norm, void* dx, int64_t n,
                int64_t d, double eps, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (!grid_fits(blocks_for(n))) return cudaErrorInvalidConfiguration;
  row_normalize_bwd_kernel<T, G><<<static_cast<unsigned>(blocks_for(n)), kWarpsPerBlock * 32, 0, s>>>(
      static_cast<const G*>(g), static_cast<const T*>(rows), raw,
      static_cast<const typename Acc<T>::type*>(norm), static_cast<T*>(dx), n, d, eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_normalize_fwd(DType dtype, const void* x, void* y, void* norm,
                                     int64_t n, int64_t d, double eps, cudaStream_t s) {
  switch (dtype) {
    case DType::kFloat32: return fwd<float>(x, y, norm, n, d, eps, s);
    case DType::kFloat16: return fwd<__half>(x, y, norm, n, d, eps, s);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(x, y, norm, n, d, eps, s);
    case DType::kFloat64: return fwd<double>(x, y, norm, n, d, eps, s);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_row_normalize_bwd(DType dtype, DType g_dtype, const void* g,
                                     const void* rows, bool raw, const void* norm, void* dx,
                                     int64_t n, int64_t d, double eps, cudaStream_t s) {
  if (g_dtype == DType::kFloat32 && dtype != DType::kFloat32 && dtype != DType::kFloat64) {
    if (dtype == DType::kFloat16) return bwd<__half, float>(g, rows, raw, norm, dx, n, d, eps, s);
    return bwd<__nv_bfloat16, float>(g, rows, raw, norm, dx, n, d, eps, s);
  }
  if (g_dtype != dtype) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return bwd<float>(g, rows, raw, norm, dx, n, d, eps, s);
    case DType::kFloat16: return bwd<__half>(g, rows, raw, norm, dx, n, d, eps, s);
    case DType::kBFloat16: return bwd<__nv_bfloat16>(g, rows, raw, norm, dx, n, d, eps, s);
    case DType::kFloat64: return bwd<double>(g, rows, raw, norm, dx, n, d, eps, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace nnk
