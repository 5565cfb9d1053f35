// The chunk loops of nnk::cosine_cross_entropy_fwd / _bwd / _fwd_bwd, shared by the CPU
// and CUDA implementations. A backend K supplies the device-specific pieces:
//
//   K::Guard                         device guard constructed from a Device
//   K::gemm_dtype(t)                 dtype of the GEMM operands for inputs of t
//   K::row_norms(x, eps)             (n,) norms in the accumulation dtype
//   K::row_normalize(x, eps)         (x / max(||x||, eps), ||x||)
//   K::row_normalize_backward(g, y, x, norm, eps, out)   g in the accumulation
//                                    dtype, written into out (contiguous rows
//                                    of a gradient, x's dtype); y, norm from
//                                    K::row_normalize of x (the raw rows,
//                                    contiguous, GEMM dtype), which a backend
//                                    whose y is rounded to 16 bits uses instead
//   K::gemm(out, a, b, accumulate)   out (accumulation dtype) (+)= a @ b
//   K::check_values(op, t, C, ignore, scale, acc)   target range and scale > 0,
//                                    finite (eagerly or asynchronously: the backends)
//   K::target_sines(x, w, target, o) (n,) float32 sin(theta) of each row to its
//                                    target, -1 on ArcFace's fallback branch, from
//                                    float64 sums (math::target_sine; x, w
//                                    contiguous in the GEMM dtype)
//   K::forward_epilogue<A>(chunk, row_state)
//   K::backward_epilogue<A>(chunk, grad, dcos)
//   K::kTargetTerm                   whether 16-bit GEMMs need the target
//                                    column's terms of d xn and d wn again in fp32:
//   K::add_target_term(chunk, dcos_target, dcos, w_rows, wn, dxn)
//   K::rows_by_target(target, rows, classes, ignore_index) -> (order, sorted targets)
//   K::add_target_term_w(chunk, dcos_target, dcos, order, sorted_t, x_rows, xn, dwn)
//
// Design. The (N x C) logits are covered by blocks of rows x classes (tiling,
// below): all C classes per block when they fit the budget with enough rows,
// else class chunks, each walked over all rows (class-outer order, so that W
// is read once per pass and no (C x D) buffer is needed).
//   forward   per block: raw products x_r @ W_k^T (fp32 out), then one fused
//             epilogue applies the norms, scale, margins and bias and merges
//             each row's log-sum-exp pair, logit sum and target logit into
//             the row's state, finished into lse and loss by the last class
//             chunk (cce::merge_row). Nothing of the block is kept: saved for
//             backward are only the inputs, lse and lse_lo (what rounding lse
//             dropped: math::lse_finish).
//   backward  per class chunk: its rows of W normalized and a (classes x D)
//             fp32 d wn; per block the same GEMM recomputes the products, one
//             fused epilogue turns them into d cos (in place for fp32, or into
//             a GEMM-dtype buffer for fp16/bf16) and the partial column sums
//             of d bias / d scale; then d xn_r (+)= dcos @ Wn_k and d wn_k +=
//             dcos^T @ xn_r, and the fused normalization backwards: of the
//             class chunk's rows of W when its rows are done, of x's rows
//             when their (only) class chunk is (one class chunk) or at the
//             end (class chunks: an (N x D) fp32 d xn accumulator).
// _fwd_bwd runs both halves on each block when there is one class chunk (the
// gradients need each row's final lse); with class chunks it runs the
// forward and then the backward.
// Extra memory: the block (+ its GEMM-dtype copy for half inputs) and the
// class chunk's and row chunk's buffers within the budget (tiling: the op's
// chunk_bytes, kChunkBytes by default), plus, with class chunks, the (N x D)
// d xn accumulator.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "nnk/cce_chunk.h"
#include "nnk/dtypes.h"

namespace nnk {
namespace cce {

// Default budget of a block's buffers (tiling). Class chunks keep W's traffic at one
// read per pass whatever C, so the budget need not be large; it bounds the
// extra memory of the op (before: 1 GiB for the rows x C block alone, plus
// a normalized copy of W and an fp32 C x D d W, 4 GiB at N = 8192, D = 4096,
// C = 131072 in bf16, as much as the logits it avoids).
constexpr int64_t kChunkBytes = int64_t(256) << 20;

// Rows per block when C is split into class chunks: GEMMs of >= 1024 rows
// and classes run near the GEMM peak, and each class chunk re-reads x (N D
// values) once per pass, a small part of the block's 2 N C_k D flops.
constexpr int64_t kClassChunkRows = 1024;

// The largest CUDA grid x dimension (2^31 - 1), for the launches' checks.
constexpr int64_t kMaxGridX = 2147483647;

// Beyond pi every target takes ArcFace's fallback (nnk._options.MAX_ANGULAR_MARGIN).
constexpr double kMaxAngularMargin = 3.14159265358979323846;

struct Options {
  bool normalize_input = true;
  bool normalize_weight = true;
  double additive_margin = 0.0;
  double angular_margin = 0.0;
  bool exact_margin = true;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double eps = 1e-12;
  int64_t chunk_rows = 0;     // 0: from the budget (tiling)
  int64_t chunk_classes = 0;  // 0: from the budget (tiling)
  int64_t chunk_bytes = 0;    // the budget; 0: kChunkBytes
};

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Blocks of `rows` x `classes` cover the logits; classes == C: one class chunk.
struct Tiling {
  int64_t rows = 1;
  int64_t classes = 1;
  int64_t class_chunks(int64_t c) const { return (c + classes - 1) / classes; }
};

inline int64_t round_down_128(int64_t v) { return v >= 128 ? v - v % 128 : v; }

// The block shape for N rows, C classes of dimension D (requested sizes > 0
// win). Bytes counted against the budget (o.chunk_bytes, else kChunkBytes):
//   per entry of the block: the accumulation dtype, and for 16-bit GEMMs d
//     cos's copy; per band of kRowsPerPart rows and class: the partial
//     column sums of d bias and d scale;
//   per class of a class chunk: its normalized rows (GEMM dtype) and d wn
//     (accumulation dtype);
//   per row: the normalized rows (GEMM dtype), and with one class chunk
//     d xn (accumulation dtype). With class chunks d xn accumulates in an
//     (N x D) buffer made once instead, as the Triton path's d x, outside
//     the budget; the rows are normalized again for each block. A
//     normalized copy of all of x was 64 MiB at N = 8192, D = 4096 in bf16
//     (1.6% of the fp32 logits); the price is an N D elementwise pass per
//     class chunk, 4 N D bytes of traffic against the backward's 6 N C_k D
//     GEMM flops: about 117 / C_k of the chunk's time at ~4 TB/s and ~700
//     TFLOP/s (estimated, not measured: 1.4% at the default 8320-class
//     chunks of (8192, 4096, 131072), 6.5% at NNK_CHUNK_MB=64's 1792).
//   The normalization backward writes d W's and d x's rows in place, except
//   where the GEMM dtype is not x's (the CPU's 16-bit inputs): then through
//   a GEMM-dtype copy of the rows, counted per class and per row.
// One class chunk when its buffers fit with min(N, kClassChunkRows) rows
// (or the requested rows); the rows are then as many as fit (a multiple of
// 128 when possible: the GEMM tile height). Without the row buffers in the
// count a small C let a chunk grow to all N rows (C = 1000, D = 8192, bf16:
// 179k rows, 8 GiB of row buffers). Otherwise those rows and as many classes
// as fit (all C, with fewer rows, where only the row buffers overflowed).
// The forward and backward use the same shape, so the recomputed logits come
// from GEMMs of identical shapes and match the forward's bit for bit.
// At most 2^31 - 1 rows: the CUDA forward epilogue launches one block per
// row, and a grid's x dimension holds no more.
inline Tiling tiling(int64_t n, int64_t c, int64_t d, at::ScalarType acc, at::ScalarType gemm,
                     at::ScalarType x, const Options& o) {
  const int64_t a = at::elementSize(acc), g = at::elementSize(gemm);
  const int64_t entry = a + (gemm == acc ? 0 : g);
  // The class and row buffers above hold the same dtypes per D values.
  const int64_t per_class = d * (a + g + (gemm == x ? 0 : g)), per_row = per_class;
  const int64_t per_split_row = per_row - d * a;  // without d xn
  const int64_t n_cap = std::min<int64_t>(std::max<int64_t>(n, 1), kMaxGridX);
  const int64_t rows = std::min(n_cap, o.chunk_rows > 0 ? o.chunk_rows : kClassChunkRows);
  const int64_t budget = o.chunk_bytes > 0 ? o.chunk_bytes : kChunkBytes;
  // The buffers of a block of r rows x k classes.
  const auto bytes = [&](int64_t r, int64_t k) {
    return r * k * entry + 2 * num_parts(r) * k * a + k * per_class +
           r * (k == c ? per_row : per_split_row);
  };
  Tiling t;
  if (o.chunk_classes > 0) {
    t.classes = std::min(o.chunk_classes, c);
  } else if (bytes(rows, c) <= budget) {
    t.classes = c;
  } else {
    const int64_t per_k = rows * entry + 2 * num_parts(rows) * a + per_class;
    if (std::min(round_down_128(budget / per_k), c) == c) {
      t.classes = c;  // all C fit with fewer rows (below)
    } else {
      // Class chunks: the row chunk's normalized rows come out of the budget
      // too, but take at most half of it (else at D >~ 64k they would leave
      // a class or none per chunk).
      const int64_t left = std::max(budget - rows * per_split_row, budget / 2);
      t.classes = std::max<int64_t>(1, std::min(round_down_128(left / per_k), c));
    }
  }
  if (o.chunk_rows > 0 || t.classes < c) {
    t.rows = rows;
  } else {
    // num_parts(r) <= r / kRowsPerPart + 1.
    const int64_t left = budget - c * per_class - 2 * c * a;
    const int64_t per = c * entry + (2 * c * a + kRowsPerPart - 1) / kRowsPerPart + per_row;
    t.rows = left > 0 ? std::max<int64_t>(1, std::min(round_down_128(left / per), n_cap)) : rows;
  }
  return t;
}

inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& target, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias, const Options& o) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D (C, D), got shape ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), op, ": weight must have D=", x.size(1),
              " columns like x, got shape ", w.sizes());
  TORCH_CHECK(w.size(0) >= 1, op, ": weight must have at least one class (C >= 1)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(is_kernel_dtype(dt),
              op, ": x must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(w.scalar_type() == dt, op, ": weight dtype ", w.scalar_type(),
              " must match x dtype ", dt);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), op,
              ": target must have shape (", x.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(is_kernel_dtype(scale.scalar_type()), op,
              ": scale must be float16, bfloat16, float32 or float64, got ", scale.scalar_type());
  TORCH_CHECK(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == w.size(0)), op,
              ": scale must have shape () or (", w.size(0), ",), got ", scale.sizes());
  const auto dev = x.device();
  TORCH_CHECK(w.device() == dev && target.device() == dev && scale.device() == dev, op,
              ": x, weight, target and scale must be on one device, got ", dev, ", ",
              w.device(), ", ", target.device(), ", ", scale.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op,
                ": bias must have shape (", w.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(is_kernel_dtype(bias->scalar_type()), op,
                ": bias must be float16, bfloat16, float32 or float64, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == dev, op, ": bias is on ", bias->device(),
                " but x is on ", dev);
  }
  // The scalar options, as nnk.functional checks them (a direct call of the
  // op must not turn a NaN or a negative z-loss into plausible numbers).
  TORCH_CHECK(std::isfinite(o.eps) && o.eps > 0, op, ": eps must be finite and > 0, got ", o.eps);
  TORCH_CHECK(o.label_smoothing >= 0 && o.label_smoothing <= 1, op,
              ": label_smoothing must be in [0, 1], got ", o.label_smoothing);
  TORCH_CHECK(std::isfinite(o.z_loss) && o.z_loss >= 0, op, ": z_loss must be finite and >= 0, got ",
              o.z_loss);
  TORCH_CHECK(std::isfinite(o.additive_margin), op, ": additive_margin must be finite, got ",
              o.additive_margin);
  TORCH_CHECK(o.angular_margin >= 0 && o.angular_margin <= kMaxAngularMargin, op,
              ": angular_margin must be in [0, pi], got ", o.angular_margin);
  TORCH_CHECK(o.angular_margin == 0 || (o.normalize_input && o.normalize_weight), op,
              ": angular_margin needs normalize_input and normalize_weight");
  TORCH_CHECK(o.chunk_rows >= 0 && o.chunk_classes >= 0 && o.chunk_bytes >= 0, op,
              ": chunk_rows, chunk_classes and chunk_bytes must be >= 0 (0: from the budget), got ",
              o.chunk_rows, ", ", o.chunk_classes, ", ", o.chunk_bytes);
}

// Whether every scale is finite and > 0 in the dtype the kernels compute in
// (a float64 1e39 is finite but infinite in float32), as a 0-d bool tensor:
// the backends check it eagerly (CPU) or asynchronously (CUDA).
inline at::Tensor scale_ok(const at::Tensor& scale, at::ScalarType acc) {
  const at::Tensor s = scale.to(acc);
  return (s.isfinite() & (s > 0)).all();
}

// The per-row vectors of the backward (grad_loss, grad_lse, lse): shape (N,)
// and on x's device; they are converted to the accumulation dtype.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& v,
                             const at::Tensor& x) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), op, ": ", name, " must have shape (",
              x.size(0), ",), got ", v.sizes());
  TORCH_CHECK(is_kernel_dtype(v.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), op, ": ", name, " is on ", v.device(),
              " but x is on ", x.device());
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// t[c0, c0 + k), or undefined for an undefined t.
inline at::Tensor slice_or_undefined(const at::Tensor& t, int64_t c0, int64_t k) {
  return t.defined() ? t.narrow(0, c0, k) : at::Tensor();
}

// The first m x k entries of a flat buffer, as a contiguous (m, k) matrix:
// the blocks of the last row or class chunk are smaller than the buffer.
inline at::Tensor head(const at::Tensor& flat, int64_t m, int64_t k) {
  return flat.narrow(0, 0, m * k).view({m, k});
}

// The block of rows [r0, r0 + m) x classes [c0, c0 + k) over its (m, k)
// raw products; x_norm and w_norm are the block's own (from row r0 and
// class c0), scale (flattened: (1,) or (C,)), bias and target the whole op's.
template <typename A>
Chunk<A> make_chunk(const at::Tensor& block, const at::Tensor& x_norm, const at::Tensor& w_norm,
                    const at::Tensor& target, const at::Tensor& target_sine, int64_t r0, int64_t c0,
                    int64_t total_classes, const at::Tensor& scale, const at::Tensor& bias,
                    const Options& o) {
  Chunk<A> ch;
  ch.block = block.const_data_ptr<A>();
  ch.rows = block.size(0);
  ch.classes = block.size(1);
  ch.c0 = c0;
  ch.total_classes = total_classes;
  ch.inv_classes = A(1) / A(total_classes);
  ch.x_norm = ptr_or_null<A>(x_norm);
  ch.w_norm = ptr_or_null<A>(w_norm);
  ch.eps = A(o.eps);
  ch.target = target.const_data_ptr<int64_t>() + r0;
  ch.ignore_index = o.ignore_index;
  ch.per_class_scale = scale.numel() == total_classes;
  ch.scale = scale.const_data_ptr<A>() + (ch.per_class_scale ? c0 : 0);
  ch.bias = bias.defined() ? bias.const_data_ptr<A>() + c0 : nullptr;
  ch.arc = math::make_arc_margin<A>(o.angular_margin);
  ch.target_sine = target_sine.defined() ? target_sine.const_data_ptr<A>() + r0 : nullptr;
  ch.additive_margin = A(o.additive_margin);
  ch.exact_margin = o.exact_margin;
  ch.label_smoothing = A(o.label_smoothing);
  ch.z_loss = A(o.z_loss);
  return ch;
}

// Operands shared by both passes: GEMM-dtype contiguous x and W, the scale
// (flattened: (1,) or (C,)) and bias in the accumulation dtype, and with an
// angular margin (float32 accumulation) each row's target sine.
struct Operands {
  at::Tensor x, w, target, scale, bias, target_sine;
  at::ScalarType acc;
};

template <class K>
Operands prepare(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                 const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                 const Options& o) {
  Operands p;
  p.acc = acc_dtype(x.scalar_type());
  const auto g = K::gemm_dtype(x.scalar_type());
  p.x = x.to(g).contiguous();
  p.w = w.to(g).contiguous();
  p.target = target.contiguous();
  p.scale = scale.to(p.acc).contiguous().reshape({-1});
  if (bias.has_value()) p.bias = bias->to(p.acc).contiguous();
  // O(N D) in float64, once per pass (the backward recomputes it: bitwise the
  // same). float64 inputs take both from their float64 cosine (math::sine_of).
  if (o.angular_margin != 0.0 && p.acc == at::kFloat) {
    p.target_sine = K::target_sines(p.x, p.w, p.target, o);
  }
  return p;
}

// A power of two 2^k, as a 0-d tensor on the device (no host sync), by which
// the backward scales the upstream gradients so that the largest |d cos| the
// call can produce is near kDcosTarget; the gradients are divided by it after
// the GEMMs (exactly: powers of two). It matters for fp16 GEMMs: d cos =
// g s (p - y) is rounded to fp16 for them, and with a mean's g = 1 / N and
// p ~ 1 / C most entries would fall below fp16's normal range (6e-5) or to 0
// (measured in an fp16 emulation, N = 1024, C = 20k, s = 1: d x 36x the
// reference's error unscaled, 0.7x scaled), or, with a large upstream
// gradient (a loss scaler's 2^16), overflow to inf. The bound, from
// math::dlogit (p <= 1): |d z_rc| <= |g_r| (1 + |1 + 2 zl lse_r|) + |g_lse_r|,
// times max |s_c| and the margin's derivative (math::margin_grad: at most
// cos m + sin m / kArcSinMin). g counts on the rows it reaches (not ignored
// ones, as math::dlogit's caller zeroes it there), and a row whose bound is
// not finite (its gradients are NaN or inf whatever the scale) is left out,
// so that one such row does not turn the scaling off for the others. A zero
// or non-finite bound gives 2^0. Done for float16 inputs only (bfloat16 has
// float32's exponent range), on every backend: the CPU kernels, whose GEMMs
// run in float32, gain nothing from it, but CI's tests of float16 inputs run
// the scaling and its exact undoing there.
constexpr double kDcosTarget = 16384.0;  // 2^14: fp16's maximum is 65504

inline at::Tensor grad_scale(const at::Tensor& g_loss, const at::Tensor& g_lse, const at::Tensor& lse,
                             const at::Tensor& target, const at::Tensor& scale, const Options& o) {
  at::Tensor bound = at::zeros_like(lse);
  if (g_loss.defined()) {
    // With zl = 0 the factor is 2 whatever lse is (-inf included).
    bound = o.z_loss != 0 ? g_loss.abs() * ((2 * o.z_loss * lse + 1).abs() + 1) : g_loss.abs() * 2;
    bound = bound.masked_fill(target == o.ignore_index, 0);
  }
  if (g_lse.defined()) bound = bound + g_lse.abs();
  bound = bound.masked_fill(~bound.isfinite(), 0);
  double dpsi = 1;
  if (o.exact_margin && o.angular_margin != 0) {
    dpsi = std::max(1.0, std::abs(std::cos(o.angular_margin)) +
                             std::abs(std::sin(o.angular_margin)) / math::kArcSinMin);
  }
  const at::Tensor b = bound.max() * scale.abs().max() * dpsi;
  const at::Tensor k = at::floor(at::log2(kDcosTarget / b)).clamp(-64, 64);
  return at::exp2(k.masked_fill(~(b.isfinite() & (b > 0)), 0));
}

// The gradient half of the loops, shared by the backward op and the forward
// op that also computes gradients (chunk_loop): the buffers, the class
// chunk's normalized rows of W and d wn, the accumulators, and the final
// normalization backwards. Per class chunk: begin_classes, add_block for
// each of its row chunks, end_classes; then finish. output_mask selects
// (d x, d W, d scale, d bias); `work` false (no rows or no upstream
// gradient) leaves every asked-for gradient zero.
template <class K>
class GradPass {
 public:
  GradPass(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
           const Operands& p, const Options& o, std::array<bool, 4> mask, const Tiling& t,
           bool work)
      : o_(o), mask_(mask), per_class_(scale.dim() == 1), work_(work),
        split_(t.classes < p.w.size(0)), rows_(t.rows), x_(p.x) {
    const auto acc_opts = x.options().dtype(p.acc);
    const int64_t n = p.x.size(0), c = p.w.size(0), d = p.w.size(1);
    // Outputs not asked for are empty (0,) tensors; with class chunks d x
    // comes from the (N x D) accumulator in finish.
    dx_ = !mask[0] ? at::empty({0}, x.options())
          : !work  ? at::zeros_like(x, at::MemoryFormat::Contiguous)
          : split_ ? at::Tensor()
                   : at::empty_like(x, at::MemoryFormat::Contiguous);
    dw_ = !mask[1] ? at::empty({0}, weight.options())
          : work   ? at::empty_like(weight, at::MemoryFormat::Contiguous)
                   : at::zeros_like(weight, at::MemoryFormat::Contiguous);
    ds_ = at::zeros({per_class_ ? c : 1}, acc_opts);
    db_ = at::zeros({c}, acc_opts);
    if (!work) return;
    // fp32 GEMMs take d cos in place of the block; fp16/bf16 GEMMs a copy.
    if (p.x.scalar_type() != p.acc) {
      dcos_buf_ = at::empty({t.rows * t.classes}, p.x.options());
      // Only the exact ArcFace gradient magnifies the target column's d cos
      // (by ~cos / sin near theta = 0) past the other columns'; elsewhere its
      // 16-bit rounding is theirs, and the fp32 terms would cost for nothing.
      if constexpr (K::kTargetTerm) {
        if ((mask[0] || mask[1]) && o.angular_margin != 0 && o.exact_margin) {
          dcos_target_ = at::empty({t.rows}, acc_opts);
          if (mask[1]) {
            std::tie(target_order_, target_sorted_) =
                K::rows_by_target(p.target, t.rows, c, o.ignore_index);
          }
        }
      }
    }
    const int64_t parts = num_parts(t.rows);
    if (mask[3]) db_part_ = at::empty({parts * t.classes}, acc_opts);
    if (mask[2]) ds_part_ = at::empty({parts * t.classes}, acc_opts);
    if (split_) {
      if (mask[0]) dxn_all_ = at::zeros({n, d}, acc_opts);
    } else if (mask[0]) {
      dxn_buf_ = at::empty({t.rows, d}, acc_opts);
    }
  }

  // The upstream gradients were multiplied by 1 / inv (0-d, a power of two:
  // grad_scale): every gradient is multiplied by inv.
  void unscale_by(const at::Tensor& inv) { unscale_ = inv; }

  // Classes [c0, c0 + k): their rows of W normalized, d wn zeroed.
  void begin_classes(const Operands& p, int64_t c0, int64_t k) {
    c0_ = c0;
    w_rows_ = wn_ = p.w.narrow(0, c0, k);
    w_norm_ = at::Tensor();
    if (o_.normalize_weight) std::tie(wn_, w_norm_) = K::row_normalize(wn_, o_.eps);
    if (mask_[1]) dwn_ = at::zeros({k, p.w.size(1)}, ds_.options());
  }

  // ||w_c|| of the class chunk (undefined: W not normalized).
  const at::Tensor& w_norm() const { return w_norm_; }

  // The normalized rows [r0, r0 + m) and their norms (the raw rows and an
  // undefined norm when x is not normalized), made for the block at hand
  // (tiling): the norms are bitwise those of K::row_norms over any rows.
  std::pair<at::Tensor, at::Tensor> rows(int64_t r0, int64_t m) const {
    const at::Tensor xc = x_.narrow(0, r0, m);
    if (!o_.normalize_input) return {xc, at::Tensor()};
    auto [xn, x_norm] = K::row_normalize(xc, o_.eps);
    return {xn, x_norm};
  }

  // The block ch sees, blk its raw products; xn, x_norm from rows(); lse,
  // lse_lo, grad_loss, grad_lse point at the block's first row (grad
  // pointers may be null: zero).
  template <typename A>
  void add_block(const Chunk<A>& ch, at::Tensor& blk, const at::Tensor& xn,
                 const at::Tensor& x_norm, int64_t r0, const A* lse, const A* lse_lo,
                 const A* grad_loss, const A* grad_lse) {
    const int64_t m = blk.size(0), k = blk.size(1);
    // 1. One fused epilogue: d cos (in place or into the GEMM-dtype copy)
    //    and the per-band column sums of d z and d z * cos'.
    ChunkGrad<A> gr;
    gr.lse = lse;
    gr.lse_lo = lse_lo;
    gr.grad_loss = grad_loss;
    gr.grad_lse = grad_lse;
    gr.dbias_part = db_part_.defined() ? db_part_.mutable_data_ptr<A>() : nullptr;
    gr.dscale_part = ds_part_.defined() ? ds_part_.mutable_data_ptr<A>() : nullptr;
    at::Tensor dcos = dcos_buf_.defined() ? head(dcos_buf_, m, k) : blk;
    if (dcos_target_.defined()) gr.dcos_target = dcos_target_.mutable_data_ptr<A>();
    K::template backward_epilogue<A>(ch, gr, dcos);
    const int64_t used = num_parts(m);
    if (mask_[3]) db_.narrow(0, c0_, k).add_(head(db_part_, used, k).sum(0));
    if (mask_[2]) {
      const at::Tensor s_sum = head(ds_part_, used, k).sum(0);
      if (per_class_) {
        ds_.narrow(0, c0_, k).add_(s_sum);
      } else {
        ds_.add_(s_sum.sum().reshape({1}));
      }
    }
    // 2. d xn = d cos @ Wn: with one class chunk complete here, and taken
    //    through the normalization of x; with class chunks accumulated.
    if (mask_[0]) {
      if (split_) {
        at::Tensor dxn = dxn_all_.narrow(0, r0, m);
        K::gemm(dxn, dcos, wn_, true);
        add_target_term(ch, dcos, dxn);
      } else {
        at::Tensor dxn = dxn_buf_.narrow(0, 0, m);
        K::gemm(dxn, dcos, wn_, false);
        add_target_term(ch, dcos, dxn);
        if (unscale_.defined()) dxn.mul_(unscale_);
        at::Tensor dx_rows = dx_.narrow(0, r0, m);
        if (o_.normalize_input) {
          K::row_normalize_backward(dxn, xn, x_.narrow(0, r0, m), x_norm, o_.eps, dx_rows);
        } else {
          dx_rows.copy_(dxn);
        }
      }
    }
    // 3. d wn += d cos^T @ xn, accumulated in fp32 across row chunks.
    if (mask_[1]) {
      K::gemm(dwn_, dcos.t(), xn, true);
      add_target_term_w(ch, dcos, xn, r0, m);
    }
  }

  // The class chunk's d W, through the normalization of its rows.
  void end_classes() {
    if (mask_[1]) {
      if (unscale_.defined()) dwn_.mul_(unscale_);
      at::Tensor dw_rows = dw_.narrow(0, c0_, dwn_.size(0));
      if (o_.normalize_weight) {
        K::row_normalize_backward(dwn_, wn_, w_rows_, w_norm_, o_.eps, dw_rows);
      } else {
        dw_rows.copy_(dwn_);
      }
    }
    dwn_ = at::Tensor();
    wn_ = w_rows_ = at::Tensor();
    w_norm_ = at::Tensor();
  }

  // (d x, d W, d scale, d bias) in the dtypes of x, weight, scale and bias.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish(
      const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
    // The blocks' buffers are done with: freed before d x is formed.
    dcos_buf_ = db_part_ = ds_part_ = dxn_buf_ = dcos_target_ = at::Tensor();
    target_order_ = target_sorted_ = at::Tensor();
    if (unscale_.defined()) {
      ds_.mul_(unscale_);
      db_.mul_(unscale_);
    }
    if (mask_[0] && work_ && split_) {
      if (unscale_.defined()) dxn_all_.mul_(unscale_);
      if (o_.normalize_input) {
        // Row chunk by row chunk: no (N x D) normalized x. (CUDA's backward
        // forms y from the raw rows: its normalized rows here cost one N D
        // pass for nothing but the norms.)
        dx_ = at::empty_like(x, at::MemoryFormat::Contiguous);
        const int64_t n = x_.size(0);
        for (int64_t r0 = 0; r0 < n; r0 += rows_) {
          const int64_t m = std::min(rows_, n - r0);
          const auto [xn, x_norm] = rows(r0, m);
          at::Tensor dx_rows = dx_.narrow(0, r0, m);
          K::row_normalize_backward(dxn_all_.narrow(0, r0, m), xn, x_.narrow(0, r0, m), x_norm,
                                    o_.eps, dx_rows);
        }
      } else {
        dx_ = dxn_all_.to(x.scalar_type());
      }
    }
    at::Tensor d_scale = mask_[2] ? ds_.reshape(scale.sizes()).to(scale.scalar_type())
                                  : at::empty({0}, scale.options());
    at::Tensor d_bias = mask_[3]            ? db_.to(bias->scalar_type())
                       : bias.has_value() ? at::empty({0}, bias->options())
                                          : at::empty({0}, x.options());
    return {dx_, dw_, d_scale, d_bias};
  }

 private:
  // With a backend whose GEMMs round their operands (K::kTargetTerm), the
  // target column's terms of d xn (add_target_term) and of d wn
  // (add_target_term_w) again from d cos unrounded and the raw rows.
  template <typename A>
  void add_target_term(const Chunk<A>& ch, const at::Tensor& dcos, at::Tensor& dxn) const {
    if constexpr (K::kTargetTerm && std::is_same_v<A, float>) {
      if (dcos_target_.defined()) K::add_target_term(ch, dcos_target_, dcos, w_rows_, wn_, dxn);
    }
  }
  template <typename A>
  void add_target_term_w(const Chunk<A>& ch, const at::Tensor& dcos, const at::Tensor& xn,
                         int64_t r0, int64_t m) {
    if constexpr (K::kTargetTerm && std::is_same_v<A, float>) {
      if (dcos_target_.defined()) {
        K::add_target_term_w(ch, dcos_target_, dcos, target_order_.narrow(0, r0, m),
                             target_sorted_.narrow(0, r0, m), x_.narrow(0, r0, m), xn, dwn_);
      }
    }
  }

  Options o_;
  std::array<bool, 4> mask_;
  bool per_class_, work_, split_;
  int64_t rows_;  // rows per block (tiling)
  int64_t c0_ = 0;
  at::Tensor x_;  // x's raw rows (GEMM dtype)
  at::Tensor target_order_, target_sorted_;  // K::rows_by_target's (add_target_term_w)
  at::Tensor wn_, w_rows_, w_norm_, dwn_;  // the class chunk's: normalized, raw, norms, d wn
  at::Tensor dxn_all_;  // class chunks: (N x D) d xn
  at::Tensor dx_, dw_, ds_, db_;
  at::Tensor dcos_buf_, db_part_, ds_part_, dxn_buf_, dcos_target_;
  at::Tensor unscale_;
};

// The raw products of rows [r0, r0 + m) with classes [c0, c0 + k) into the
// head of the flat buffer `block`. The backward recomputes the forward's
// GEMMs on the same shapes (tiling), so its logits match the forward's bit
// for bit.
template <class K>
at::Tensor block_products(const Operands& p, at::Tensor& block, int64_t r0, int64_t m, int64_t c0,
                          int64_t k) {
  at::Tensor blk = head(block, m, k);
  K::gemm(blk, p.x.narrow(0, r0, m), p.w.narrow(0, c0, k).t(), false);
  return blk;
}

// The backward's loop over the blocks, its inputs checked and the device
// guard set by the caller (backward, or chunk_loop with class chunks).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_loop(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& lse_lo, const Options& o, std::array<bool, 4> mask) {
  const int64_t n = x.size(0), c = weight.size(0);
  const Operands p = prepare<K>(x, weight, target, scale, bias, o);

  const at::Tensor lse_a = lse.to(p.acc).contiguous();
  const at::Tensor lse_lo_a = lse_lo.to(p.acc).contiguous();
  at::Tensor g_loss = grad_loss.has_value() ? grad_loss->to(p.acc).contiguous() : at::Tensor();
  at::Tensor g_lse = grad_lse.has_value() ? grad_lse->to(p.acc).contiguous() : at::Tensor();
  const bool any_grad = mask[0] || mask[1] || mask[2] || mask[3];
  // Without rows or upstream gradients every gradient is zero.
  const bool work = n > 0 && any_grad && (g_loss.defined() || g_lse.defined());
  const Tiling t = tiling(n, c, x.size(1), p.acc, p.x.scalar_type(), x.scalar_type(), o);
  GradPass<K> grads(x, weight, scale, p, o, mask, t, work);
  if (work) {
    // 0. float16: upstream gradients scaled by a power of two (grad_scale),
    //    undone on the gradients: d cos in fp16 neither underflows nor
    //    overflows. New tensors: the caller's grad_loss may be g_loss itself.
    if (x.scalar_type() == at::kHalf) {
      const at::Tensor k = grad_scale(g_loss, g_lse, lse_a, p.target, p.scale, o);
      if (g_loss.defined()) g_loss = g_loss * k;
      if (g_lse.defined()) g_lse = g_lse * k;
      grads.unscale_by(k.reciprocal());
    }
    at::Tensor block = at::empty({t.rows * t.classes}, x.options().dtype(p.acc));
    AT_DISPATCH_FLOATING_TYPES(p.acc, "nnk_cce_backward", [&] {
      using A = scalar_t;
      for (int64_t c0 = 0; c0 < c; c0 += t.classes) {
        const int64_t k = std::min(t.classes, c - c0);
        grads.begin_classes(p, c0, k);
        for (int64_t r0 = 0; r0 < n; r0 += t.rows) {
          const int64_t m = std::min(t.rows, n - r0);
          // 1. Recompute the block's raw products exactly as the forward did.
          at::Tensor blk = block_products<K>(p, block, r0, m, c0, k);
          // 2. Its gradients.
          const auto [xn, x_norm] = grads.rows(r0, m);
          const Chunk<A> ch = make_chunk<A>(blk, x_norm, grads.w_norm(), p.target, p.target_sine,
                                            r0, c0, c, p.scale, p.bias, o);
          grads.template add_block<A>(ch, blk, xn, x_norm, r0, lse_a.const_data_ptr<A>() + r0,
                                      lse_lo_a.const_data_ptr<A>() + r0,
                                      g_loss.defined() ? g_loss.const_data_ptr<A>() + r0 : nullptr,
                                      g_lse.defined() ? g_lse.const_data_ptr<A>() + r0 : nullptr);
        }
        grads.end_classes();
      }
    });
  }
  return grads.finish(x, scale, bias);
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& lse_lo, const Options& o, std::array<bool, 4> mask) {
  constexpr const char* op = "nnk::cosine_cross_entropy_bwd";
  check_inputs(op, x, weight, target, scale, bias, o);
  check_row_vector(op, "lse", lse, x);
  check_row_vector(op, "lse_lo", lse_lo, x);
  if (grad_loss.has_value()) check_row_vector(op, "grad_loss", *grad_loss, x);
  if (grad_lse.has_value()) check_row_vector(op, "grad_lse", *grad_lse, x);
  TORCH_CHECK(!mask[3] || bias.has_value(), op, ": output_mask asks for grad_bias without a bias");
  const typename K::Guard guard(x.device());
  // A target >= C would otherwise be read as an ignored row: zero gradients.
  K::check_values(op, target, weight.size(0), o.ignore_index, scale, acc_dtype(x.scalar_type()));
  return backward_loop<K>(grad_loss, grad_lse, x, weight, target, scale, bias, lse, lse_lo, o, mask);
}

// The forward, and with one class chunk its gradients in the same loop (as
// Liger's fused linear cross-entropy): each block serves the loss epilogue
// and then, while it is still in memory, the gradient epilogue and GEMMs,
// with the upstream gradient grad_loss known in advance (the caller's
// reduction: 1 per row for "sum", 1 / #valid for "mean"). Training then costs
// 3 GEMM passes (6 N C D flops) instead of 4 (the backward's recomputation of
// the logits); the price is paid when no backward follows (3 passes instead
// of 1, and the gradients held in memory). With class chunks a row's
// gradients need its lse over every chunk first: the forward, then the
// backward op's loop.
//
// The forward op is this loop with no gradient asked for (grad_loss absent,
// mask all false): one GEMM and the loss epilogue per block.
// Returns (loss, lse, lse_lo, d x, d W, d scale, d bias). forward_loop is
// the loop itself, its inputs checked and the device guard set by chunk_loop;
// grads_asked implies one class chunk.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_loop(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
             const at::Tensor& scale, const std::optional<at::Tensor>& bias,
             const std::optional<at::Tensor>& grad_loss, const Options& o, std::array<bool, 4> mask,
             bool grads_asked, const Tiling& t) {
  const int64_t n = x.size(0), c = weight.size(0);
  const int64_t chunks = t.class_chunks(c);
  const Operands p = prepare<K>(x, weight, target, scale, bias, o);
  at::Tensor loss = at::empty({n}, x.options().dtype(p.acc));
  at::Tensor lse = at::empty({n}, x.options().dtype(p.acc));
  at::Tensor lse_lo = at::empty({n}, x.options().dtype(p.acc));
  const bool work = n > 0 && grads_asked;  // then one class chunk
  const at::Tensor g_loss = work ? grad_loss->to(p.acc).contiguous() : at::Tensor();
  GradPass<K> grads(x, weight, scale, p, o, mask, t, work);
  at::Tensor w_norm, x_norm_all;
  if (work) {
    grads.begin_classes(p, 0, c);
    w_norm = grads.w_norm();
  } else if (o.normalize_weight) {
    w_norm = K::row_norms(p.w, o.eps);
  }
  // With class chunks each row's norm serves every chunk.
  if (chunks > 1 && o.normalize_input) x_norm_all = K::row_norms(p.x, o.eps);
  // The rows' running reductions across class chunks (cce::RowState).
  at::Tensor state;
  if (chunks > 1) state = at::empty({4, n}, x.options().dtype(p.acc));
  if (n > 0) {
    at::Tensor block = at::empty({t.rows * t.classes}, x.options().dtype(p.acc));
    AT_DISPATCH_FLOATING_TYPES(p.acc, "nnk_cce_forward_backward", [&] {
      using A = scalar_t;
      for (int64_t c0 = 0; c0 < c; c0 += t.classes) {
        const int64_t k = std::min(t.classes, c - c0);
        for (int64_t r0 = 0; r0 < n; r0 += t.rows) {
          const int64_t m = std::min(t.rows, n - r0);
          // 1. The block's raw products and the rows' norms.
          at::Tensor blk = block_products<K>(p, block, r0, m, c0, k);
          at::Tensor xn, x_norm;
          if (work) {
            std::tie(xn, x_norm) = grads.rows(r0, m);
          } else if (x_norm_all.defined()) {
            x_norm = x_norm_all.narrow(0, r0, m);
          } else if (o.normalize_input) {
            x_norm = K::row_norms(p.x.narrow(0, r0, m), o.eps);
          }
          // 2. The rows' reductions over the block, finished by the last
          //    class chunk (reads the block, keeps it).
          const Chunk<A> ch = make_chunk<A>(blk, x_norm, slice_or_undefined(w_norm, c0, k),
                                            p.target, p.target_sine, r0, c0, c, p.scale, p.bias, o);
          RowState<A> st;
          if (chunks > 1) {
            st.run_max = state[0].mutable_data_ptr<A>() + r0;
            st.run_rest = state[1].mutable_data_ptr<A>() + r0;
            st.sum_z = state[2].mutable_data_ptr<A>() + r0;
            st.z_target = state[3].mutable_data_ptr<A>() + r0;
          }
          st.first = c0 == 0;
          st.last = c0 + k == c;
          st.loss = loss.mutable_data_ptr<A>() + r0;
          st.lse = lse.mutable_data_ptr<A>() + r0;
          st.lse_lo = lse_lo.mutable_data_ptr<A>() + r0;
          K::template forward_epilogue<A>(ch, st);
          // 3. Their gradients from the same block (one class chunk).
          if (work) {
            grads.template add_block<A>(ch, blk, xn, x_norm, r0, st.lse, st.lse_lo,
                                        g_loss.const_data_ptr<A>() + r0, nullptr);
          }
        }
      }
    });
  }
  if (work) grads.end_classes();
  auto [dx, dw, ds, db] = grads.finish(x, scale, bias);
  return {loss, lse, lse_lo, dx, dw, ds, db};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
chunk_loop(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
           const at::Tensor& scale, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& grad_loss, const Options& o, std::array<bool, 4> mask) {
  check_inputs(op, x, weight, target, scale, bias, o);
  if (grad_loss.has_value()) check_row_vector(op, "grad_loss", *grad_loss, x);
  TORCH_CHECK(!mask[3] || bias.has_value(), op, ": output_mask asks for grad_bias without a bias");
  const bool grads_asked = grad_loss.has_value() && (mask[0] || mask[1] || mask[2] || mask[3]);
  // Its upstream gradients are not scaled (grad_scale needs every row's lse
  // first): float16 d cos would underflow in the fp16 GEMMs.
  TORCH_CHECK(!grads_asked || K::gemm_dtype(x.scalar_type()) != at::kHalf, op,
              ": float16 gradients on this device are the backward op's "
              "(nnk::cosine_cross_entropy_bwd), which scales them against underflow");
  const typename K::Guard guard(x.device());
  const int64_t c = weight.size(0);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  K::check_values(op, target, c, o.ignore_index, scale, acc);
  const Tiling t = tiling(x.size(0), c, x.size(1), acc, K::gemm_dtype(x.scalar_type()),
                          x.scalar_type(), o);
  if (!grads_asked || t.class_chunks(c) == 1) {
    return forward_loop<K>(x, weight, target, scale, bias, grad_loss, o, mask, grads_asked, t);
  }
  auto [loss, lse, lse_lo, u1, u2, u3, u4] = forward_loop<K>(
      x, weight, target, scale, bias, std::nullopt, o, {false, false, false, false}, false, t);
  auto [dx, dw, ds, db] = backward_loop<K>(grad_loss, std::nullopt, x, weight, target, scale, bias,
                                           lse, lse_lo, o, mask);
  return {loss, lse, lse_lo, dx, dw, ds, db};
}

// The registered ops' signatures (see csrc/schema.cpp): the scalar
// arguments come in the schema's order.
inline Options make_options(bool normalize_input, bool normalize_weight, double additive_margin,
                            double angular_margin, bool exact_margin, int64_t ignore_index,
                            double label_smoothing, double z_loss, double eps,
                            int64_t chunk_rows, int64_t chunk_classes, int64_t chunk_bytes) {
  Options o;
  o.normalize_input = normalize_input;
  o.normalize_weight = normalize_weight;
  o.additive_margin = additive_margin;
  o.angular_margin = angular_margin;
  o.exact_margin = exact_margin;
  o.ignore_index = ignore_index;
  o.label_smoothing = label_smoothing;
  o.z_loss = z_loss;
  o.eps = eps;
  o.chunk_rows = chunk_rows;
  o.chunk_classes = chunk_classes;
  o.chunk_bytes = chunk_bytes;
  return o;
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, bool normalize_input,
    bool normalize_weight, double additive_margin, double angular_margin,
    int64_t ignore_index, double label_smoothing, double z_loss, double eps,
    int64_t chunk_rows, int64_t chunk_classes, int64_t chunk_bytes) {
  // The loss does not depend on how the margin is differentiated.
  const Options o = make_options(normalize_input, normalize_weight, additive_margin,
                                 angular_margin, true, ignore_index, label_smoothing, z_loss, eps,
                                 chunk_rows, chunk_classes, chunk_bytes);
  auto out = chunk_loop<K>("nnk::cosine_cross_entropy_fwd", x, weight, target, scale, bias,
                           std::nullopt, o, {false, false, false, false});
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& lse_lo, bool normalize_input, bool normalize_weight, double additive_margin,
    double angular_margin, bool exact_margin, int64_t ignore_index,
    double label_smoothing, double z_loss, double eps, int64_t chunk_rows,
    int64_t chunk_classes, int64_t chunk_bytes, std::array<bool, 4> output_mask) {
  const Options o = make_options(normalize_input, normalize_weight, additive_margin,
                                 angular_margin, exact_margin, ignore_index, label_smoothing,
                                 z_loss, eps, chunk_rows, chunk_classes, chunk_bytes);
  return backward<K>(grad_loss, grad_lse, x, weight, target, scale, bias, lse, lse_lo, o,
                     output_mask);
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_backward_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                    const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                    const at::Tensor& grad_loss, bool normalize_input, bool normalize_weight,
                    double additive_margin, double angular_margin, bool exact_margin,
                    int64_t ignore_index, double label_smoothing, double z_loss, double eps,
                    int64_t chunk_rows, int64_t chunk_classes, int64_t chunk_bytes,
                    std::array<bool, 4> output_mask) {
  const Options o = make_options(normalize_input, normalize_weight, additive_margin,
                                 angular_margin, exact_margin, ignore_index, label_smoothing,
                                 z_loss, eps, chunk_rows, chunk_classes, chunk_bytes);
  auto [loss, lse, lse_lo, dx, dw, ds, db] = chunk_loop<K>(
      "nnk::cosine_cross_entropy_fwd_bwd", x, weight, target, scale, bias, grad_loss, o,
      output_mask);
  return {loss, lse, dx, dw, ds, db};
}

}  // namespace cce
}  // namespace nnk
