// One chunk of the fused cosine cross-entropy, as its epilogues see it: a
// block of rows x classes (all C classes, or the class chunk [c0, c0 +
// classes) of a C too large for one block), its raw products block[r, c] =
// <x_r, w_c> (a GEMM on the un-normalized operands), the norms that turn them
// into cosines, and the options.
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
  int64_t classes = 0;        // the block's classes: c below is local, in [0, classes)
  int64_t c0 = 0;             // the class of local column 0
  int64_t total_classes = 0;  // C
  A inv_classes = A(0);       // 1 / C, the label-smoothing weight per class
  const A* x_norm = nullptr;  // (rows,) ||x_r||, or nullptr: x not normalized
  const A* w_norm = nullptr;  // (classes,) ||w_c||, or nullptr: W not normalized
  A eps = A(0);               // norms are clamped to >= eps, as F.normalize
  const int64_t* target = nullptr;  // (rows,) global class indices
  int64_t ignore_index = -100;
  const A* scale = nullptr;   // (classes,) if per_class_scale, else (1,)
  bool per_class_scale = false;
  const A* bias = nullptr;    // (classes,) or nullptr
  math::ArcMargin<A> arc{};
  // (rows,) each row's sin(theta) to its target, -1 on ArcFace's fallback
  // branch, from float64 sums (math::target_sine), with an angular margin and
  // 16/32-bit inputs; else nullptr: from the block's cosine (math::sine_of).
  const A* target_sine = nullptr;
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
  // (rows,) or nullptr: the target column's d cos, unrounded, for the rows
  // whose target this class chunk holds (other rows' entries are not written).
  A* dcos_target = nullptr;
};

// The forward's per-row reductions over the class chunks of its rows, each
// class chunk merged in order (the lse pair by math::lse_merge), and where
// the last one writes the finished rows. All pointers are at the chunk's
// first row; with a single class chunk (first and last) the running arrays
// are not used and may be nullptr.
template <typename A>
struct RowState {
  A* run_max = nullptr;   // (rows,) running max of the logits
  A* run_rest = nullptr;  // (rows,) sum of exp(z - run_max) without the max's 1
  A* sum_z = nullptr;     // (rows,) running sum of the logits (label smoothing)
  A* z_target = nullptr;  // (rows,) the target logit, once its chunk has passed
  bool first = true;      // the first class chunk: the state starts here
  bool last = true;       // the last: the rows are finished
  A* loss = nullptr;      // (rows,)
  A* lse = nullptr;       // (rows,)
  A* lse_lo = nullptr;    // (rows,) what rounding lse dropped (math::lse_finish)
};

// Row r's reductions over this chunk's classes (the pair (blk_max, blk_rest)
// of math::lse_merge, the sum of its logits, and its target logit when
// has_target) merged into the state, and the row finished after the last
// class chunk: lse, lse_lo and the loss (0 on ignored rows).
template <typename A>
NNK_HD void merge_row(const Chunk<A>& ch, const RowState<A>& st, int64_t r, A blk_max,
                      A blk_rest, A blk_sum_z, bool has_target, A blk_z_target) {
  A run_max = blk_max, run_rest = blk_rest, sum_z = blk_sum_z;
  A z_t = has_target ? blk_z_target : A(0);
  if (!st.first) {
    run_max = st.run_max[r];
    run_rest = st.run_rest[r];
    math::lse_merge(run_max, run_rest, blk_max, blk_rest);
    sum_z = st.sum_z[r] + blk_sum_z;
    if (!has_target) z_t = st.z_target[r];
  }
  if (!st.last) {
    st.run_max[r] = run_max;
    st.run_rest[r] = run_rest;
    st.sum_z[r] = sum_z;
    st.z_target[r] = z_t;
    return;
  }
  A lo;
  const A l = math::lse_finish(run_max, run_rest, &lo);
  st.lse[r] = l;
  st.lse_lo[r] = lo;
  st.loss[r] = ignored(ch, r) ? A(0)
                              : math::row_loss(l, lo, z_t, sum_z, ch.label_smoothing,
                                               ch.inv_classes, ch.z_loss);
}

inline int64_t num_parts(int64_t rows) {
  return (rows + kRowsPerPart - 1) / kRowsPerPart;
}

// Whether row r is ignored (a target outside [0, C), which the ops' checks
// refuse, counts as ignored: no index is ever formed from it).
template <typename A>
NNK_HD bool ignored(const Chunk<A>& ch, int64_t r) {
  const int64_t t = ch.target[r];
  return t == ch.ignore_index || t < 0 || t >= ch.total_classes;
}

// The local column of row r's target, or -1: the row is ignored or its
// target lies in another class chunk.
template <typename A>
NNK_HD int64_t target_column(const Chunk<A>& ch, int64_t r) {
  if (ignored(ch, r)) return -1;
  const int64_t t = ch.target[r] - ch.c0;
  return (t >= 0 && t < ch.classes) ? t : -1;
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

// Row r's sin(theta) (-1: the fallback branch) on its target column, whose
// cosine is c.
template <typename A>
NNK_HD A target_sine_of(const Chunk<A>& ch, int64_t r, A c) {
  return ch.target_sine != nullptr ? ch.target_sine[r] : math::sine_of(c, ch.arc);
}

template <typename A>
NNK_HD A scale_of(const Chunk<A>& ch, int64_t c) {
  return ch.per_class_scale ? ch.scale[c] : ch.scale[0];
}

// z[r, c], and what the scale multiplies (d z / d s_c).
template <typename A>
NNK_HD A logit(const Chunk<A>& ch, int64_t r, int64_t c, bool is_target, A* cos_prime) {
  const A cs = cosine(ch, r, c);
  const A sin_t = is_target ? target_sine_of(ch, r, cs) : A(0);
  return math::cosine_logit(cs, is_target, sin_t, ch.arc, ch.additive_margin, scale_of(ch, c),
                            ch.bias != nullptr ? ch.bias[c] : A(0), cos_prime);
}

// The backward of one entry: d z (returned through *dz, for d bias and
// d scale) and d cos, the gradient of the cosine that the d x / d W GEMMs
// consume (d z * s_c, times d psi / d cos on the target column). c is local;
// g is the row's upstream gradient, already zero on ignored rows.
template <typename A>
NNK_HD A dcosine(const Chunk<A>& ch, int64_t r, int64_t c, bool is_target, A lse, A lse_lo,
                 A g, A g_lse, A* dz, A* cos_prime) {
  const A cs = cosine(ch, r, c);
  const A s = scale_of(ch, c);
  const A sin_t = is_target ? target_sine_of(ch, r, cs) : A(0);
  const A z = math::cosine_logit(cs, is_target, sin_t, ch.arc, ch.additive_margin, s,
                                 ch.bias != nullptr ? ch.bias[c] : A(0), cos_prime);
  const A d = math::dlogit(z, lse, lse_lo, is_target, ch.label_smoothing, ch.inv_classes,
                           ch.z_loss, g, g_lse);
  *dz = d;
  const A dpsi = is_target ? math::margin_grad(cs, sin_t, ch.arc, ch.exact_margin) : A(1);
  return d * s * dpsi;
}

}  // namespace cce
}  // namespace nnk
