// Neural-collapse statistics: per-class counts and feature sums, and the Gram
// of features centered on per-class shifts. The sums accumulate in fp64; the
// Gram takes fp32 products (fp64 for fp64 inputs) over chunks of kGramChunkRows
// rows, summed in fp64. Every sum runs in a fixed order (no float atomics), so
// results are reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "device_convert.cuh"
#include "launchers.h"

namespace nnk {
namespace cuda {
namespace {

// Enough blocks to fill a large GPU several times over; the row splits that
// reach it are summed by the caller.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMaxSplits = 64;

int64_t splits_for(int64_t blocks, int64_t n, int64_t min_rows_per_split) {
  // Nothing to launch (D = 0 or no classes): a split would only multiply the
  // grid dimension that carries batches x splits.
  if (blocks == 0) return 1;
  const int64_t want = (kTargetBlocks + blocks - 1) / blocks;
  const int64_t rows_cap = std::max<int64_t>(1, n / min_rows_per_split);
  return std::max<int64_t>(1, std::min({want, kMaxSplits, rows_cap}));
}

// --- counts ------------------------------------------------------------------

__global__ void nc_count_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t classes,
                                unsigned long long* __restrict__ counts,
                                unsigned long long* __restrict__ bad) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t y = labels[i];
    if (y >= 0 && y < classes) {
      atomicAdd(counts + y, 1ull);  // integer: exact in any order
    } else {
      atomicAdd(bad, 1ull);
    }
  }
}

// --- class sums --------------------------------------------------------------

constexpr int kSumThreads = 128;

// Block (class k, column tile, batch x split): each thread owns one column and
// adds the rows of class k in its split's range of the label-sorted order.
// Reads are coalesced along the row; the order of the adds is fixed.
template <typename T, typename A>
__global__ void nc_class_sums_kernel(const T* __restrict__ features,
                                     const int64_t* __restrict__ perm,
                                     const int64_t* __restrict__ offsets,
                                     const int64_t* __restrict__ counts, int64_t batches,
                                     int64_t n, int64_t d, int64_t classes, int64_t splits,
                                     A* __restrict__ partial) {
  const int64_t k = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.z / splits, s = blockIdx.z % splits;
  if (col >= d) return;
  const int64_t cnt = counts[k], off = offsets[k];
  const int64_t r0 = off + cnt * s / splits, r1 = off + cnt * (s + 1) / splits;
  const T* fb = features + b * n * d + col;
  A acc = 0;
  for (int64_t r = r0; r < r1; ++r) acc += static_cast<A>(to_acc(fb[perm[r] * d]));
  partial[((s * batches + b) * classes + k) * d + col] = acc;
}

// --- centered Gram -----------------------------------------------------------

// A 64 x 64 output tile per block of 16 x 16 threads (4 x 4 outputs each),
// rows consumed kGramRows at a time through shared memory. Only tiles on or
// above the diagonal are computed; each is also written mirrored.
constexpr int kTile = 64;
constexpr int kGramRows = 16;
// Rows whose products one accumulator of type A sums before they are added to
// the fp64 total: an fp32 sum over a whole row split had an error growing with
// its rows. Each output is a sequential FMA chain over the chunk's rows, less
// exact than the reference's fp32 GEMM of up to 1024 rows
// (nnk.reference.GRAM_CHUNK_ROWS), which blocks the sum: in the CUDA emulation
// (tests/cuda_emulation), at N = 301, D = 130, 1024-row chunks erred by up to
// 2.4x the reference's error, 128-row chunks by at most 0.98x (0.6x for 64).
// The fp64 adds cost 16 per 2048 FMAs of a thread. A multiple of kGramRows.
constexpr int64_t kGramChunkRows = 128;
static_assert(kGramChunkRows % kGramRows == 0, "chunks hold whole row tiles");
constexpr int kGramThreads = 256;
constexpr int kMicro = 4;

template <typename T, typename A>
__global__ void nc_gram_kernel(const T* __restrict__ features, const int64_t* __restrict__ labels,
                               const A* __restrict__ shifts, bool shifts_batched,
                               int64_t batches, int64_t n, int64_t d, int64_t classes,
                               int64_t splits, double* __restrict__ partial) {
  // 1. Which tile (tp <= tq) of the upper triangle, batch and row range.
  const int64_t n_tiles = (d + kTile - 1) / kTile;
  int64_t idx = blockIdx.x, tp = 0;
  while (idx >= n_tiles - tp) {
    idx -= n_tiles - tp;
    ++tp;
  }
  const int64_t tq = tp + idx;
  const int64_t p0 = tp * kTile, q0 = tq * kTile;
  const int64_t b = blockIdx.z, s = blockIdx.y;
  const int64_t r_begin = n * s / splits, r_end = n * (s + 1) / splits;
  const T* fb = features + b * n * d;
  const A* cb = shifts + (shifts_batched ? b * classes * d : 0);

  __shared__ A tile_p[kGramRows][kTile];
  __shared__ A tile_q[kGramRows][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  A acc[kMicro][kMicro] = {};
  double total[kMicro][kMicro] = {};

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kGramRows) {
    // 2. Load kGramRows centered rows of both column ranges (coalesced along
    //    the columns): h[i, col] - shifts[y_i, col], zero past the edges.
    for (int e = threadIdx.x; e < kGramRows * kTile; e += kGramThreads) {
      const int rr = e / kTile, cc = e % kTile;
      const int64_t i = r0 + rr;
      A vp = 0, vq = 0;
      if (i < r_end) {
        const int64_t y = labels[i];
        const bool ok = y >= 0 && y < classes;
        const T* hr = fb + i * d;
        const A* cr = cb + (ok ? y : 0) * d;
        if (p0 + cc < d) vp = static_cast<A>(to_acc(hr[p0 + cc])) - (ok ? cr[p0 + cc] : A(0));
        if (q0 + cc < d) vq = static_cast<A>(to_acc(hr[q0 + cc])) - (ok ? cr[q0 + cc] : A(0));
      }
      tile_p[rr][cc] = vp;
      tile_q[rr][cc] = vq;
    }
    __syncthreads();
    // 3. Rank-kGramRows update of this thread's 4 x 4 outputs.
#pragma unroll
    for (int k = 0; k < kGramRows; ++k) {
      A a[kMicro], bq[kMicro];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) {
        a[u] = tile_p[k][ty * kMicro + u];
        bq[u] = tile_q[k][tx * kMicro + u];
      }
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) acc[u][v] += a[u] * bq[v];
    }
    __syncthreads();
    // 4. At the end of each chunk (and of the range), add its products to the
    //    fp64 total. Uniform across the block: r0 and r_end are.
    if ((r0 - r_begin + kGramRows) % kGramChunkRows == 0 || r0 + kGramRows >= r_end) {
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) {
          total[u][v] += static_cast<double>(acc[u][v]);
          acc[u][v] = 0;
        }
    }
  }
  // 5. Store the tile and, off the diagonal, its transpose.
  double* gb = partial + (s * batches + b) * d * d;
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
#pragma unroll
    for (int v = 0; v < kMicro; ++v) {
      const int64_t gp = p0 + ty * kMicro + u, gq = q0 + tx * kMicro + v;
      if (gp < d && gq < d) {
        gb[gp * d + gq] = total[u][v];
        if (tp != tq) gb[gq * d + gp] = total[u][v];
      }
    }
  }
}

template <typename T, typename A>
cudaError_t class_sums(const void* features, const int64_t* perm, const int64_t* offsets,
                       const int64_t* counts, int64_t batches, int64_t n, int64_t d,
                       int64_t classes, int64_t splits, void* partial, cudaStream_t s) {
  if (classes == 0 || d == 0 || batches == 0) return cudaSuccess;
  if (!grid_fits(classes, (d + kSumThreads - 1) / kSumThreads, batches * splits)) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(classes),
                  static_cast<unsigned>((d + kSumThreads - 1) / kSumThreads),
                  static_cast<unsigned>(batches * splits));
  nc_class_sums_kernel<T, A><<<grid, kSumThreads, 0, s>>>(
      static_cast<const T*>(features), perm, offsets, counts, batches, n, d, classes, splits,
      static_cast<A*>(partial));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t gram(const void* features, const int64_t* labels, const void* shifts,
                 bool shifts_batched, int64_t batches, int64_t n, int64_t d, int64_t classes,
                 int64_t splits, void* partial, cudaStream_t s) {
  if (d == 0 || batches == 0) return cudaSuccess;
  const int64_t t = (d + kTile - 1) / kTile;
  if (!grid_fits(t * (t + 1) / 2, splits, batches)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(t * (t + 1) / 2), static_cast<unsigned>(splits),
                  static_cast<unsigned>(batches));
  nc_gram_kernel<T, A><<<grid, kGramThreads, 0, s>>>(
      static_cast<const T*>(features), labels, static_cast<const A*>(shifts), shifts_batched,
      batches, n, d, classes, splits, static_cast<double*>(partial));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_nc_count(const int64_t* labels, int64_t n, int64_t classes, int64_t* counts,
                            int64_t* bad, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  nc_count_kernel<<<static_cast<unsigned>(blocks), 256, 0, s>>>(
      labels, n, classes, reinterpret_cast<unsigned long long*>(counts),
      reinterpret_cast<unsigned long long*>(bad));
  return cudaGetLastError();
}

int64_t nc_class_sums_splits(int64_t batches, int64_t n, int64_t d, int64_t classes) {
  const int64_t blocks = batches * classes * ((d + kSumThreads - 1) / kSumThreads);
  // A split must average >= 64 rows per class to be worth its partial.
  return splits_for(blocks, n / std::max<int64_t>(classes, 1), 64);
}

cudaError_t launch_nc_class_sums(DType dtype, DType acc, const void* features,
                                 const int64_t* perm, const int64_t* offsets,
                                 const int64_t* counts, int64_t batches, int64_t n, int64_t d,
                                 int64_t classes, int64_t splits, void* partial,
                                 cudaStream_t s) {
  // Sums are float64 for every input (nc::sums_dtype).
  if (acc != DType::kFloat64) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat64:
      return class_sums<double, double>(features, perm, offsets, counts, batches, n, d, classes,
                                        splits, partial, s);
    case DType::kFloat32:
      return class_sums<float, double>(features, perm, offsets, counts, batches, n, d, classes,
                                       splits, partial, s);
    case DType::kFloat16:
      return class_sums<__half, double>(features, perm, offsets, counts, batches, n, d, classes,
                                        splits, partial, s);
    case DType::kBFloat16:
      return class_sums<__nv_bfloat16, double>(features, perm, offsets, counts, batches, n, d,
                                               classes, splits, partial, s);
    default: return cudaErrorInvalidValue;
  }
}

int64_t nc_gram_splits(int64_t batches, int64_t n, int64_t d) {
  const int64_t t = (d + kTile - 1) / kTile;
  return splits_for(batches * t * (t + 1) / 2, n, 256);
}

cudaError_t launch_nc_centered_gram(DType dtype, DType acc, const void* features,
                                    const int64_t* labels, const void* shifts,
                                    bool shifts_batched, int64_t batches, int64_t n, int64_t d,
                                    int64_t classes, int64_t splits, void* partial,
                                    cudaStream_t s) {
#define NNK_GRAM(T, A)                                                                       \
  return gram<T, A>(features, labels, shifts, shifts_batched, batches, n, d, classes, splits, \
                    partial, s)
  if (acc == DType::kFloat64) {
    switch (dtype) {
      case DType::kFloat64: NNK_GRAM(double, double);
      case DType::kFloat32: NNK_GRAM(float, double);
      case DType::kFloat16: NNK_GRAM(__half, double);
      case DType::kBFloat16: NNK_GRAM(__nv_bfloat16, double);
    }
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32: NNK_GRAM(float, float);
    case DType::kFloat16: NNK_GRAM(__half, float);
    case DType::kBFloat16: NNK_GRAM(__nv_bfloat16, float);
    default: return cudaErrorInvalidValue;
  }
#undef NNK_GRAM
}

}  // namespace cuda
}  // namespace nnk
