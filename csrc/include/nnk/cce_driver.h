// The chunk loop of nnk::cosine_cross_entropy_fwd / _bwd / _fwd_bwd, shared by the CPU
// and CUDA implementations. A backend K supplies the device-specific pieces:
//
//   K::Guard                         device guard constructed from a Device
//   K::gemm_dtype(t)                 dtype of the GEMM operands for inputs of t
//   K::row_norms(x, eps)             (n,) norms in the accumulation dtype
//   K::row_normalize(x, eps)         (x / max(||x||, eps), ||x||)
//   K::row_normalize_backward(g, y, norm, eps)   g in the accumulation dtype,
//                                    result in y's dtype
//   K::gemm(out, a, b, accumulate)   out (accumulation dtype) (+)= a @ b
//   K::check_values(op, t, C, ignore, scale, acc)   target range and scale > 0,
//                                    finite (eagerly or asynchronously: the backends)
//   K::forward_epilogue<A>(chunk, loss, lse, lse_lo)
//   K::backward_epilogue<A>(chunk, grad, dcos)
//
// Design (cosine_cross_entropy_fwd computes no gradients; _fwd_bwd runs both
// halves on each chunk; both are chunk_loop, below):
//   forward   per chunk of rows: block = x_c @ W^T (raw operands, fp32 out),
//             then one fused epilogue applies the norms, scale, margins and
//             bias and reduces each row to its lse and loss. Nothing of the
//             block is kept: saved for backward are only the inputs, lse and
//             lse_lo (what rounding lse dropped: math::lse_finish).
//   backward  per chunk: the same GEMM recomputes the block; one fused
//             epilogue turns it into d cos (in place for fp32, or into a
//             GEMM-dtype buffer for fp16/bf16) and the partial column sums of
//             d bias / d scale; then d xn_c = dcos @ Wn and dWn += dcos^T @ xn_c
//             (fp32 accumulator), and the fused normalization backward.
// Extra memory: one (rows x C) block (+ its GEMM-dtype copy for half inputs)
// and the chunk's (rows x D) row buffers, O((N + C) D) for normalized
// operands and the fp32 d W accumulator; the chunk height is the largest that
// keeps the chunk's buffers (row_bytes) within kChunkBytes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "nnk/cce_chunk.h"
#include "nnk/dtypes.h"

namespace nnk {
namespace cce {

// Budget of the per-chunk (rows x C) buffers. Larger chunks read W fewer
// times (each chunk's GEMMs stream all of W); 1 GiB keeps >= 512-row chunks up
// to C = 256k classes with half inputs.
constexpr int64_t kChunkBytes = int64_t(1) << 30;

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
  int64_t chunk_rows = 0;  // 0: from kChunkBytes
};

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Bytes a chunk holds per row: its (rows x C) block in the accumulation
// dtype and, for 16-bit GEMMs, d cos's copy in x's dtype; in the backward its
// (rows x D) d xn in the accumulation dtype and the normalized rows and their
// gradient in x's dtype. Without the D terms a small C let the chunk grow to
// all N rows (C = 1000, D = 8192, bf16: 179k rows, 8 GiB of row buffers).
inline int64_t row_bytes(int64_t c, int64_t d, at::ScalarType acc, at::ScalarType x) {
  const int64_t a = at::elementSize(acc), h = at::elementSize(x);
  return c * (a + (x == acc ? 0 : h)) + d * (a + 2 * h);
}

// Rows per chunk: `requested` when > 0, else the most whose buffers fit the
// budget, rounded down to a multiple of 128 (GEMM tile height) when possible.
// The forward and backward use the same value, so the recomputed logits come
// from GEMMs of identical shapes and match the forward's bit for bit.
// At most 2^31 - 1 rows: the CUDA forward epilogue launches one block per
// row, and a grid's x dimension holds no more.
inline int64_t chunk_rows(int64_t n, int64_t bytes_per_row, int64_t requested) {
  const int64_t cap = std::min<int64_t>(std::max<int64_t>(n, 1), kMaxGridX);
  if (requested > 0) return std::min(requested, cap);
  int64_t r = kChunkBytes / std::max<int64_t>(bytes_per_row, 1);
  if (r >= 128) r -= r % 128;
  return std::max<int64_t>(1, std::min(r, cap));
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

// The chunk of rows [r0, r0 + m) over the (m, C) raw-product block.
template <typename A>
Chunk<A> make_chunk(const at::Tensor& block, const at::Tensor& x_norm,
                    const at::Tensor& w_norm, const at::Tensor& target, int64_t r0,
                    const at::Tensor& scale, const at::Tensor& bias, const Options& o) {
  Chunk<A> ch;
  ch.block = block.const_data_ptr<A>();
  ch.rows = block.size(0);
  ch.classes = block.size(1);
  ch.inv_classes = A(1) / A(ch.classes);
  ch.x_norm = ptr_or_null<A>(x_norm);
  ch.w_norm = ptr_or_null<A>(w_norm);
  ch.eps = A(o.eps);
  ch.target = target.const_data_ptr<int64_t>() + r0;
  ch.ignore_index = o.ignore_index;
  ch.scale = scale.const_data_ptr<A>();
  ch.per_class_scale = scale.numel() == ch.classes;  // scale is flattened: (1,) or (C,)
  ch.bias = ptr_or_null<A>(bias);
  ch.arc = math::make_arc_margin<A>(o.angular_margin);
  ch.additive_margin = A(o.additive_margin);
  ch.exact_margin = o.exact_margin;
  ch.label_smoothing = A(o.label_smoothing);
  ch.z_loss = A(o.z_loss);
  return ch;
}

// Operands shared by both passes: GEMM-dtype contiguous x and W, and the
// scale (flattened: (1,) or (C,)) and bias in the accumulation dtype.
struct Operands {
  at::Tensor x, w, target, scale, bias;
  at::ScalarType acc;
};

template <class K>
Operands prepare(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                 const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  Operands p;
  p.acc = acc_dtype(x.scalar_type());
  const auto g = K::gemm_dtype(x.scalar_type());
  p.x = x.to(g).contiguous();
  p.w = w.to(g).contiguous();
  p.target = target.contiguous();
  p.scale = scale.to(p.acc).contiguous().reshape({-1});
  if (bias.has_value()) p.bias = bias->to(p.acc).contiguous();
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

// The gradient half of the chunk loop, shared by the backward op and the
// forward op that also computes gradients (chunk_loop): the buffers of
// one chunk, the accumulators, and the final normalization backward of W.
// output_mask selects (d x, d W, d scale, d bias); `work` false (no rows or
// no upstream gradient) leaves every asked-for gradient zero.
template <class K>
class GradPass {
 public:
  GradPass(const at::Tensor& x, const at::Tensor& scale, const Operands& p, const Options& o,
           std::array<bool, 4> mask, int64_t rows, bool work)
      : o_(o), mask_(mask), per_class_(scale.dim() == 1), wn_(p.w) {
    const auto acc_opts = x.options().dtype(p.acc);
    const int64_t c = p.w.size(0), d = p.w.size(1);
    // Outputs not asked for are empty (0,) tensors.
    dx_ = !mask[0] ? at::empty({0}, x.options())
          : work   ? at::empty_like(x, at::MemoryFormat::Contiguous)
                   : at::zeros_like(x, at::MemoryFormat::Contiguous);
    if (mask[1]) dw_acc_ = at::zeros({c, d}, acc_opts);
    ds_ = at::zeros({per_class_ ? c : 1}, acc_opts);
    db_ = at::zeros({c}, acc_opts);
    if (!work) return;
    if (o.normalize_weight) std::tie(wn_, w_norm_) = K::row_normalize(p.w, o.eps);
    // fp32 GEMMs take d cos in place of the block; fp16/bf16 GEMMs a copy.
    if (p.x.scalar_type() != p.acc) dcos_buf_ = at::empty({rows, c}, p.x.options());
    const int64_t parts = num_parts(rows);
    if (mask[3]) db_part_ = at::empty({parts, c}, acc_opts);
    if (mask[2]) ds_part_ = at::empty({parts, c}, acc_opts);
    if (mask[0]) dxn_buf_ = at::empty({rows, d}, acc_opts);
  }

  // ||w_c|| from the normalization the d W GEMM uses (undefined: not normalized).
  const at::Tensor& w_norm() const { return w_norm_; }

  // The upstream gradients of the chunks were multiplied by 1 / inv (0-d,
  // a power of two: grad_scale): every gradient is multiplied by inv.
  void unscale_by(const at::Tensor& inv) { unscale_ = inv; }

  // Rows [r0, r0 + blk.size(0)): blk holds their raw products and ch sees
  // them; xn, x_norm are the chunk's normalized rows and norms (xn = the raw
  // rows when x is not normalized); lse, lse_lo, grad_loss, grad_lse point at
  // row r0 (grad pointers may be null: zero).
  template <typename A>
  void add_chunk(const Chunk<A>& ch, at::Tensor& blk, const at::Tensor& xn,
                 const at::Tensor& x_norm, int64_t r0, const A* lse, const A* lse_lo,
                 const A* grad_loss, const A* grad_lse) {
    const int64_t m = blk.size(0);
    // 1. One fused epilogue: d cos (in place or into the GEMM-dtype copy)
    //    and the per-band column sums of d z and d z * cos'.
    ChunkGrad<A> gr;
    gr.lse = lse;
    gr.lse_lo = lse_lo;
    gr.grad_loss = grad_loss;
    gr.grad_lse = grad_lse;
    gr.dbias_part = db_part_.defined() ? db_part_.mutable_data_ptr<A>() : nullptr;
    gr.dscale_part = ds_part_.defined() ? ds_part_.mutable_data_ptr<A>() : nullptr;
    at::Tensor dcos = dcos_buf_.defined() ? dcos_buf_.narrow(0, 0, m) : blk;
    K::template backward_epilogue<A>(ch, gr, dcos);
    const int64_t used = num_parts(m);
    if (mask_[3]) db_.add_(db_part_.narrow(0, 0, used).sum(0));
    if (mask_[2]) {
      const at::Tensor s_sum = ds_part_.narrow(0, 0, used).sum(0);
      ds_.add_(per_class_ ? s_sum : s_sum.sum().reshape({1}));
    }
    // 2. d xn = d cos @ Wn, then through the normalization of x.
    if (mask_[0]) {
      at::Tensor dxn = dxn_buf_.narrow(0, 0, m);
      K::gemm(dxn, dcos, wn_, false);
      if (unscale_.defined()) dxn.mul_(unscale_);
      dx_.narrow(0, r0, m).copy_(o_.normalize_input
                                     ? K::row_normalize_backward(dxn, xn, x_norm, o_.eps)
                                     : dxn);
    }
    // 3. d Wn += d cos^T @ xn, accumulated in fp32 across chunks.
    if (mask_[1]) K::gemm(dw_acc_, dcos.t(), xn, true);
  }

  // (d x, d W, d scale, d bias) in the dtypes of x, weight, scale and bias.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish(
      const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
      const std::optional<at::Tensor>& bias) {
    if (unscale_.defined()) {
      for (at::Tensor* t : {&dw_acc_, &ds_, &db_}) {
        if (t->defined()) t->mul_(unscale_);
      }
    }
    at::Tensor dw = at::empty({0}, weight.options());
    if (mask_[1]) {
      dw = (o_.normalize_weight && w_norm_.defined())
               ? K::row_normalize_backward(dw_acc_, wn_, w_norm_, o_.eps).to(weight.scalar_type())
               : dw_acc_.to(weight.scalar_type());
    }
    at::Tensor d_scale = mask_[2] ? ds_.reshape(scale.sizes()).to(scale.scalar_type())
                                  : at::empty({0}, scale.options());
    at::Tensor d_bias = mask_[3]            ? db_.to(bias->scalar_type())
                       : bias.has_value() ? at::empty({0}, bias->options())
                                          : at::empty({0}, x.options());
    return {dx_, dw, d_scale, d_bias};
  }

 private:
  Options o_;
  std::array<bool, 4> mask_;
  bool per_class_;
  at::Tensor wn_, w_norm_;
  at::Tensor dx_, dw_acc_, ds_, db_;
  at::Tensor dcos_buf_, db_part_, ds_part_, dxn_buf_;
  at::Tensor unscale_;
};

// Step 1 of every chunk, shared by both loops: the raw products of rows
// [r0, r0 + m) into the head of `block`, and the rows' norms; the normalized
// rows too when `rows_too` (only the gradient GEMMs use them). xn is the raw
// rows when x is not normalized (x_norm then undefined). The backward
// recomputes the forward's GEMM on the same shapes, so its logits match the
// forward's bit for bit.
struct ChunkProducts {
  at::Tensor blk, xn, x_norm;
};

template <class K>
ChunkProducts chunk_products(const Operands& p, const Options& o, at::Tensor& block, int64_t r0,
                             int64_t m, bool rows_too) {
  ChunkProducts cp;
  const at::Tensor xc = p.x.narrow(0, r0, m);
  cp.blk = block.narrow(0, 0, m);
  K::gemm(cp.blk, xc, p.w.t(), false);
  cp.xn = xc;
  if (o.normalize_input) {
    if (rows_too) {
      std::tie(cp.xn, cp.x_norm) = K::row_normalize(xc, o.eps);
    } else {
      cp.x_norm = K::row_norms(xc, o.eps);
    }
  }
  return cp;
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
  const int64_t n = x.size(0), c = weight.size(0);
  // A target >= C would otherwise be read as an ignored row: zero gradients.
  K::check_values(op, target, c, o.ignore_index, scale, acc_dtype(x.scalar_type()));
  const Operands p = prepare<K>(x, weight, target, scale, bias);

  const at::Tensor lse_a = lse.to(p.acc).contiguous();
  const at::Tensor lse_lo_a = lse_lo.to(p.acc).contiguous();
  at::Tensor g_loss = grad_loss.has_value() ? grad_loss->to(p.acc).contiguous() : at::Tensor();
  at::Tensor g_lse = grad_lse.has_value() ? grad_lse->to(p.acc).contiguous() : at::Tensor();
  const bool any_grad = mask[0] || mask[1] || mask[2] || mask[3];
  // Without rows or upstream gradients every gradient is zero.
  const bool work = n > 0 && any_grad && (g_loss.defined() || g_lse.defined());
  const int64_t rows = chunk_rows(n, row_bytes(c, x.size(1), p.acc, p.x.scalar_type()), o.chunk_rows);
  GradPass<K> grads(x, scale, p, o, mask, rows, work);
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
    at::Tensor block = at::empty({rows, c}, x.options().dtype(p.acc));
    AT_DISPATCH_FLOATING_TYPES(p.acc, "nnk_cce_backward", [&] {
      using A = scalar_t;
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        // 1. Recompute the chunk's raw products exactly as the forward did.
        ChunkProducts cp = chunk_products<K>(p, o, block, r0, std::min(rows, n - r0), true);
        // 2. Its gradients.
        const Chunk<A> ch = make_chunk<A>(cp.blk, cp.x_norm, grads.w_norm(), p.target, r0,
                                          p.scale, p.bias, o);
        grads.template add_chunk<A>(ch, cp.blk, cp.xn, cp.x_norm, r0,
                                    lse_a.const_data_ptr<A>() + r0,
                                    lse_lo_a.const_data_ptr<A>() + r0,
                                    g_loss.defined() ? g_loss.const_data_ptr<A>() + r0 : nullptr,
                                    g_lse.defined() ? g_lse.const_data_ptr<A>() + r0 : nullptr);
      }
    });
  }
  return grads.finish(x, weight, scale, bias);
}

// Forward and backward in one chunk loop (as Liger's fused linear
// cross-entropy): each chunk's block serves the loss epilogue and then, while
// it is still in memory, the gradient epilogue and GEMMs, with the upstream
// gradient grad_loss known in advance (the caller's reduction: 1 per row for
// "sum", 1 / #valid for "mean"). Training then costs 3 GEMM passes (6 N C D
// flops) instead of 4 (the backward's recomputation of the logits); the price
// is paid when no backward follows (3 passes instead of 1, and the gradients
// held in memory).
//
// The forward op is this loop with no gradient asked for (grad_loss absent,
// mask all false): one GEMM and the loss epilogue per chunk.
// Returns (loss, lse, lse_lo, d x, d W, d scale, d bias).
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
  const int64_t n = x.size(0), c = weight.size(0);
  K::check_values(op, target, c, o.ignore_index, scale, acc_dtype(x.scalar_type()));
  const Operands p = prepare<K>(x, weight, target, scale, bias);
  at::Tensor loss = at::empty({n}, x.options().dtype(p.acc));
  at::Tensor lse = at::empty({n}, x.options().dtype(p.acc));
  at::Tensor lse_lo = at::empty({n}, x.options().dtype(p.acc));
  const bool work = n > 0 && grads_asked;
  const at::Tensor g_loss = work ? grad_loss->to(p.acc).contiguous() : at::Tensor();
  const int64_t rows = chunk_rows(n, row_bytes(c, x.size(1), p.acc, p.x.scalar_type()), o.chunk_rows);
  GradPass<K> grads(x, scale, p, o, mask, rows, work);
  // Without gradients to compute W's norms are not otherwise at hand.
  const at::Tensor w_norm = work || !o.normalize_weight ? grads.w_norm() : K::row_norms(p.w, o.eps);
  if (n > 0) {
    at::Tensor block = at::empty({rows, c}, x.options().dtype(p.acc));
    AT_DISPATCH_FLOATING_TYPES(p.acc, "nnk_cce_forward_backward", [&] {
      using A = scalar_t;
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        // 1. The chunk's raw products and norms.
        ChunkProducts cp = chunk_products<K>(p, o, block, r0, std::min(rows, n - r0), work);
        // 2. Loss and lse of the rows (reads the block, keeps it).
        const Chunk<A> ch = make_chunk<A>(cp.blk, cp.x_norm, w_norm, p.target, r0, p.scale,
                                          p.bias, o);
        A* lse_c = lse.mutable_data_ptr<A>() + r0;
        A* lse_lo_c = lse_lo.mutable_data_ptr<A>() + r0;
        K::template forward_epilogue<A>(ch, loss.mutable_data_ptr<A>() + r0, lse_c, lse_lo_c);
        // 3. Their gradients from the same block.
        if (work) {
          grads.template add_chunk<A>(ch, cp.blk, cp.xn, cp.x_norm, r0, lse_c, lse_lo_c,
                                      g_loss.const_data_ptr<A>() + r0, nullptr);
        }
      }
    });
  }
  auto [dx, dw, ds, db] = grads.finish(x, weight, scale, bias);
  return {loss, lse, lse_lo, dx, dw, ds, db};
}

// The registered ops' signatures (see csrc/schema.cpp): the scalar
// arguments come in the schema's order.
inline Options make_options(bool normalize_input, bool normalize_weight, double additive_margin,
                            double angular_margin, bool exact_margin, int64_t ignore_index,
                            double label_smoothing, double z_loss, double eps,
                            int64_t chunk_rows) {
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
  return o;
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, bool normalize_input,
    bool normalize_weight, double additive_margin, double angular_margin,
    int64_t ignore_index, double label_smoothing, double z_loss, double eps,
    int64_t chunk_rows) {
  // The loss does not depend on how the margin is differentiated.
  const Options o = make_options(normalize_input, normalize_weight, additive_margin,
                                 angular_margin, true, ignore_index, label_smoothing, z_loss, eps,
                                 chunk_rows);
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
    std::array<bool, 4> output_mask) {
  const Options o = make_options(normalize_input, normalize_weight, additive_margin,
                                 angular_margin, exact_margin, ignore_index, label_smoothing,
                                 z_loss, eps, chunk_rows);
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
                    int64_t chunk_rows, std::array<bool, 4> output_mask) {
  const Options o = make_options(normalize_input, normalize_weight, additive_margin,
                                 angular_margin, exact_margin, ignore_index, label_smoothing,
                                 z_loss, eps, chunk_rows);
  auto [loss, lse, lse_lo, dx, dw, ds, db] = chunk_loop<K>(
      "nnk::cosine_cross_entropy_fwd_bwd", x, weight, target, scale, bias, grad_loss, o,
      output_mask);
  return {loss, lse, dx, dw, ds, db};
}

}  // namespace cce
}  // namespace nnk
