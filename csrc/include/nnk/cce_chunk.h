// One chunk of rows of the fused cosine cross-entropy, as its epilogues see
// it: the raw products block[r, c] = <x_r, w_c> (a GEMM on the un-normalized
// operands), the norms that turn them into cosines, and the options.
//
// Torch-free and __host__ __device__: the CPU loops (csrc/cpu/cce_cpu.cpp) and
// the CUDA kernels (csrc/cuda/cce_kernel.cu) call the same element functions
// below, built only from nnk/math.h, so the CPU build that CI runs checks the
// formulas the GPU runs.
#pragma once

#include <cstdint>

#include "nnk/math.h"

namespace nnk {
namespace cce {

// Rows per partial column sum in the backward epilogue: d bias and d scale are
// reduced over rows in bands of this many rows, one partial row per band, and
// the partials are summed afterwards in a fixed order (no atomics), so the
// gradients are bitwise reproducible.
constexpr int64_t kRowsPerPart = 64;

template <typename A>
struct Chunk {
  const A* block = nullptr;   // (rows, classes) row-major raw products
  int64_t rows = 0;
  int64_t classes = 0;
  A inv_classes = A(0);       // 1 / classes, the label-smoothing weight per class
  const A* x_norm = nullptr;  // (rows,) ||x_r||, or nullptr: x not normalized
  const A* w_norm = nullptr;  // (classes,) ||w_c||, or nullptr: W not normalized
  A eps = A(0);               // norms are clamped to >= eps, as F.normalize
  const int64_t* target = nullptr;  // (rows,)
  int64_t ignore_index = -100;
  const A* scale = nullptr;   // (classes,) if per_class_scale, else (1,)
  bool per_class_scale = false;
  const A* bias = nullptr;    // (classes,) or nullptr
  math::ArcMargin<A> arc{};
  A additive_margin = A(0);
  bool exact_margin = true;
  A label_smoothing = A(0);
  A z_loss = A(0);
};

// What the backward epilogue needs beyond the chunk: per-row lse (with its
// rounding residue) and upstream
// gradients (nullptr: zero), and where the partial column sums go.
template <typename A>
struct ChunkGrad {
  const A* lse = nullptr;        // (rows,)
  const A* lse_lo = nullptr;     // (rows,) what rounding lse dropped (math::lse_finish)
  const A* grad_loss = nullptr;  // (rows,) or nullptr
  const A* grad_lse = nullptr;   // (rows,) or nullptr
  A* dbias_part = nullptr;       // (ceil(rows / kRowsPerPart), classes) or nullptr
  A* dscale_part = nullptr;      // same shape, or nullptr
};

inline int64_t num_parts(int64_t rows) {
  return (rows + kRowsPerPart - 1) / kRowsPerPart;
}

// The target column of row r, or -1 for an ignored row.
template <typename A>
NNK_HD int64_t target_column(const Chunk<A>& ch, int64_t r) {
  const int64_t t = ch.target[r];
  return (t == ch.ignore_index || t < 0 || t >= ch.classes) ? -1 : t;
}

// cos(x_r, w_c) = <x_r, w_c> / (max(||x_r||, eps) max(||w_c||, eps)); a side
// that is not normalized contributes 1 (math::cosine_of: no overflow of the
// product of the norms).
template <typename A>
NNK_HD A cosine(const Chunk<A>& ch, int64_t r, int64_t c) {
  A dx = A(1), dw = A(1);
  if (ch.x_norm != nullptr) dx = math::norm_divisor(ch.x_norm[r], ch.eps);
  if (ch.w_norm != nullptr) dw = math::norm_divisor(ch.w_norm[c], ch.eps);
  return math::cosine_of(ch.block[r * ch.classes + c], dx, dw);
}

template <typename A>
NNK_HD A scale_of(const Chunk<A>& ch, int64_t c) {
  return ch.per_class_scale ? ch.scale[c] : ch.scale[0];
}

// z[r, c], and what the scale multiplies (d z / d s_c).
template <typename A>
NNK_HD A logit(const Chunk<A>& ch, int64_t r, int64_t c, bool is_target, A* cos_prime) {
  return math::cosine_logit(cosine(ch, r, c), is_target, ch.arc, ch.additive_margin,
                            scale_of(ch, c), ch.bias != nullptr ? ch.bias[c] : A(0),
                            cos_prime);
}

// The backward of one entry: d z (returned through *dz, for d bias and
// d scale) and d cos, the gradient of the cosine that the d x / d W GEMMs
// consume (d z * s_c, times d psi / d cos on the target column). g is the
// row's upstream gradient, already zero on ignored rows.
template <typename A>
NNK_HD A dcosine(const Chunk<A>& ch, int64_t r, int64_t c, bool is_target, A lse, A lse_lo,
                 A g, A g_lse, A* dz, A* cos_prime) {
  const A cs = cosine(ch, r, c);
  const A s = scale_of(ch, c);
  const A z = math::cosine_logit(cs, is_target, ch.arc, ch.additive_margin, s,
                                 ch.bias != nullptr ? ch.bias[c] : A(0), cos_prime);
  const A d = math::dlogit(z, lse, lse_lo, is_target, ch.label_smoothing, ch.inv_classes,
                           ch.z_loss, g, g_lse);
  *dz = d;
  const A dpsi = is_target ? math::margin_grad(cs, ch.arc, ch.exact_margin) : A(1);
  return d * s * dpsi;
}

}  // namespace cce
}  // namespace nnk
