// Per-element math of the cosine cross-entropy, shared by the CPU and CUDA
// implementations (and mirrored line for line by nnk/reference.py and the
// Triton kernels), so that the CPU build that CI runs exercises exactly the
// formulas the GPU runs.
//
// Everything here is templated on the accumulation type T (float, or double
// for float64 inputs, which the CPU and CUDA ops both take); callers never
// instantiate it with half types.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define NNK_HD __host__ __device__ __forceinline__
#else
#define NNK_HD inline
#endif

namespace nnk {
namespace math {

#if !defined(__CUDA_ARCH__)
// Host pass: take the float overloads from <cmath>. The device pass resolves
// the same unqualified calls to CUDA's float/double math functions.
using std::frexp;
using std::ldexp;
using std::sqrt;
#if !defined(NNK_EMULATED_DEVICE_MATH)
// (The CPU emulation of the CUDA sources supplies these three as models of
// CUDA's, which err by more than glibc's: tests/cuda_emulation.)
using std::exp;
using std::expm1;
using std::log1p;
#endif
#endif

// <x, w> / (dx dw) without forming dx dw, which overflows for norms above
// ~1.8e19 on both sides and underflows to 0 for zero rows under a tiny eps
// (0 / 0). Each divisor is split into a mantissa and a power of two (exact);
// the powers scale the dot, the product of the mantissas (in [0.25, 1))
// divides it: one rounding of that product and one of the quotient, as a
// single division by dx dw, so a dot equal to dx dw gives exactly +-1, as
// parallel rows at D = 1 do (ArcFace's sqrt(1 - c^2) needs it; for D > 1 the
// dot and the norms round apart, and the cosine of parallel rows may lie an
// ulp beyond 1, as the float32 reference's). The Triton kernels do the same
// (tile.py).
template <typename T>
NNK_HD T cosine_of(T dot, T dx, T dw) {
  int ex = 0, ew = 0;
  const T mx = frexp(dx, &ex), mw = frexp(dw, &ew);
  return ldexp(dot, -(ex + ew)) / (mx * mw);
}

// Lower bound on sin(theta) in the exact ArcFace derivative
// d cos(theta + m) / d cos(theta) = cos m + sin m * cos(theta) / sin(theta).
// Below 1e-3 (1 - cos(theta) < 5e-7, i.e. a few float32 ulps of 1) theta is
// not resolved by a float32 cosine anyway; clamping keeps the gradient finite
// (at most cos m + 1000 sin m) where the true derivative diverges.
constexpr double kArcSinMin = 1e-3;

template <typename T>
NNK_HD T clamp_unit(T c) {
  return c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
}

// Constants of an angular margin m, computed once per launch.
template <typename T>
struct ArcMargin {
  T m;          // the margin in radians (0 disables the angular margin)
  T cos_m;
  T sin_m;
  T threshold;  // cos(pi - m) = -cos m: below it theta + m > pi
  T fallback;   // m * sin m, the ArcFace fallback shift
};

template <typename T>
inline ArcMargin<T> make_arc_margin(double m) {
  ArcMargin<T> a;
  a.m = T(m);
  a.cos_m = T(std::cos(m));
  a.sin_m = T(std::sin(m));
  a.threshold = T(-std::cos(m));
  a.fallback = T(m * std::sin(m));
  return a;
}

// ArcFace's per-row term from a cosine c: sin(theta) = sqrt(1 - c^2) of the
// clamped c on ArcFace's branch (c >= -cos m: theta + m <= pi), -1 on the
// fallback branch, which uses no sine. Only float64 inputs take it (their
// cosine is float64 already); the others take target_sine's.
template <typename T>
NNK_HD T sine_of(T c, const ArcMargin<T>& a) {
  const T cc = clamp_unit(c);
  if (cc < a.threshold) return T(-1);
  const T s2 = T(1) - cc * cc;
  return sqrt(s2 < T(0) ? T(0) : s2);
}

// The same from the float64 sums xx = ||x||^2, ww = ||w_t||^2, xw = <x, w_t>
// of a row and its target class (exact products of float32 values), with
// the norms clamped at eps as F.normalize (a NaN norm stays NaN:
// norm_divisor) and the branch threshold -cos m in float64: sqrt((1 - c)
// (1 + c)), whose factors are exact near |c| = 1, or -1. sqrt(1 - c^2) of a
// float32 cosine turns the cosine's rounding (~6e-8) into a relative error
// of ~6e-8 / theta^2 in sin(theta), which ArcFace's psi and d psi / d c carry
// into the loss and gradients of rows close to their class (1e-4 at theta =
// 0.03); and a float32 cosine within its rounding of the threshold may take
// the other branch, where psi jumps. nnk.reference.target_sine_ref.
NNK_HD double target_sine(double xx, double ww, double xw, double eps, double threshold) {
  const double nx = sqrt(xx), nw = sqrt(ww);
  const double c = clamp_unit(xw / ((nx <= eps ? eps : nx) * (nw <= eps ? eps : nw)));
  if (c < threshold) return -1.0;
  const double s2 = (1.0 - c) * (1.0 + c);
  return sqrt(s2 < 0.0 ? 0.0 : s2);  // NaN stays NaN
}

// psi(c): the target-column cosine after the angular and additive margins.
// cos(theta + m) = c cos m - sin(theta) sin m on ArcFace's branch, which
// sin_t >= 0 marks (sin_t: target_sine, or sine_of(c)), avoiding acos/cos.
// Where theta + m > pi (sin_t = -1) the ArcFace fallback c - m sin m keeps
// psi monotone in theta. sin_t is unused without an angular margin.
template <typename T>
NNK_HD T margin_value(T c, T sin_t, const ArcMargin<T>& a, T additive) {
  T psi = c;
  if (a.m != T(0)) {
    const T cc = clamp_unit(c);
    psi = sin_t >= T(0) ? cc * a.cos_m - sin_t * a.sin_m : cc - a.fallback;
  }
  return psi - additive;
}

// d psi / d c. `exact` differentiates the margin; otherwise psi - c is treated
// as a constant (the straight-through "detached" mode of insightface).
template <typename T>
NNK_HD T margin_grad(T c, T sin_t, const ArcMargin<T>& a, bool exact) {
  if (!exact || a.m == T(0)) return T(1);
  if (!(sin_t >= T(0))) return T(1);
  if (sin_t < T(kArcSinMin)) sin_t = T(kArcSinMin);
  return a.cos_m + a.sin_m * clamp_unit(c) / sin_t;
}

// Online log-sum-exp: merge the partial (max, rest) of a block into the
// running one, where rest = sum of exp(z - max) over the entries but the one
// that is the max: its exp(0) = 1 stays out of the sum. A confident row's
// rest (1e-4, say) then keeps its own precision; added to a running 1, each
// small exp was rounded to an ulp of 1, and C of those roundings made the
// loss log(1 + rest) of such a row err by 1.3% (C = 200, measured).
// A single entry z is the partial (z, 0). -inf maxima (nothing seen yet)
// merge to the other side without producing exp(-inf - -inf) = NaN; equal
// maxima add their 1 exactly, without exp(inf - inf) = NaN for two +inf
// entries (such a row's lse is +inf, as torch.logsumexp's; lse_finish).
template <typename T>
NNK_HD void lse_merge(T& run_max, T& run_rest, T blk_max, T blk_rest) {
  if (blk_max == -INFINITY) return;
  if (run_max == -INFINITY) {
    run_max = blk_max;
    run_rest = blk_rest;
    return;
  }
  if (blk_max == run_max) {
    run_rest = run_rest + (blk_rest + T(1));
  } else if (blk_max > run_max) {
    run_rest = (run_rest + T(1)) * exp(run_max - blk_max) + blk_rest;
    run_max = blk_max;
  } else {
    run_rest = run_rest + (blk_rest + T(1)) * exp(blk_max - run_max);
  }
}

// lse = m + log1p(rest) rounded (lse_merge's partial), and *lo = (m +
// log1p(rest)) - lse, what that rounding dropped (Knuth's TwoSum, exact). The
// backward's probabilities are then p = exp((z - lse) - lo): z - lse is exact
// near the top of the row (Sterbenz), so p errs as log_softmax's (z - m) -
// log(sum) does, not by half
// an ulp of |lse| in every entry (a bias shift of 2000 made d x 3.4x the
// reference's error). A row without a finite logit gives lse = -inf and
// lo = 0; a row holding +inf lse = +inf (as torch.logsumexp) and lo = NaN,
// which makes its loss (row_loss) and every p (dlogit) NaN, as
// F.cross_entropy's; a NaN lse gives lo = 0.
template <typename T>
NNK_HD T lse_finish(T run_max, T run_rest, T* lo) {
  const T log_sum = log1p(run_rest);
  const T lse = run_max + log_sum;
  if (!(lse - lse == T(0))) {
    *lo = lse == T(INFINITY) ? T(NAN) : T(0);
    return lse;
  }
  const T part = lse - run_max;
  *lo = (run_max - (lse - part)) + (log_sum - part);
  return lse;
}

// d loss_i / d z_ic for
//   loss_i = lse_i - (1 - ls) z_iy - (ls / C) sum_c z_ic + zl * lse_i^2
// (cross-entropy with label smoothing ls, plus the z-loss), times the upstream
// gradient g_i of the row loss:
//   g_i * (p_ic (1 + 2 zl lse_i) - (1 - ls) [c == y_i] - ls / C).
//
// With g_lse, the upstream gradient of the row's log-sum-exp (when the lse is
// an output of its own), d lse_i / d z_ic = p_ic adds g_lse_i * p_ic.
//
// lse_lo is what rounding the row's lse dropped (lse_finish); p = exp(z - lse)
// with it taken back. A row without a finite logit (lse = -inf: a -inf bias
// on every class of a class-parallel shard) that gets no upstream gradient
// (the combined loss gives such a shard's terms zero weight) has zero
// gradients, not g * NaN from exp(-inf + inf); with an upstream gradient its
// NaN propagates, as F.cross_entropy's does.
template <typename T>
NNK_HD T dlogit(T z, T lse, T lse_lo, bool is_target, T smoothing, T inv_c, T z_loss,
                T g, T g_lse) {
  if (lse == -INFINITY && g == T(0) && g_lse == T(0)) return T(0);
  const T u = (z - lse) - lse_lo;
  const T p = exp(u);
  // The target's p - 1 from expm1, not rounded against 1: on a confident row
  // (p - 1 ~ -1e-6) an ulp of p is 10% of it, and expf may err by 2 ulp on a
  // GPU (Triton's d x, in a model of its exp: 7-60x the float32 reference's
  // error at s = 64).
  // With C = 1 (u = 0, inv_c = 1) d is exactly 0.
  const T d = is_target ? expm1(u) + (smoothing - smoothing * inv_c) : p - smoothing * inv_c;
  // The z-loss term apart: on a confident row's target p - 1 ~ -1e-6, and a
  // z-loss term folded into p (1 + 2 zl lse) was rounded against 1 (d x
  // 30-60x the reference's error at zl = 1e-5, s = 64). zl g first, as
  // autograd orders it: a row without upstream gradient gets 0, not
  // 2 zl lse = inf (zl > ~1.7e38) times 0.
  return g * d + (T(2) * (z_loss * g) * lse + g_lse) * p;
}

// The logit of one (row, class) entry from its cosine c: s_c * c + b_c, with
// psi(c) (sin_t: the row's sin(theta), or -1) in place of c on the row's
// target column. *cos_prime receives what the scale multiplies (c, or psi on
// the target): d z / d s_c.
template <typename T>
NNK_HD T cosine_logit(T c, bool is_target, T sin_t, const ArcMargin<T>& a, T additive,
                      T s, T b, T* cos_prime) {
  const T cp = is_target ? margin_value(c, sin_t, a, additive) : c;
  *cos_prime = cp;
  return s * cp + b;
}

// The row loss from its reductions (0 for ignored rows is the caller's):
//   lse - (1 - ls) z_t - (ls / C) sum_c z_c + zl * lse^2,
// with lse + lse_lo the row's unrounded log-sum-exp (lse_finish).
template <typename T>
NNK_HD T row_loss(T lse, T lse_lo, T z_target, T sum_z, T smoothing, T inv_c, T z_loss) {
  // Grouped as (1 - ls)(lse - z_t) + ls (lse - mean z): each difference is
  // small where the loss is (a confident row; C = 1, where it is exactly 0),
  // instead of leaving an ulp of |z| behind (3e-5 at C = 1, |z| ~ 1000).
  // lse - z_t is exact there (Sterbenz) and lse_lo then adds what rounding
  // lse dropped: a confident row's loss errs as log_softmax's
  // (m - z_t) + log(sum), not by half an ulp of |lse| (1.8e-6 at s = 64,
  // 35x the reference's error on losses of 1e-5).
  T loss = (T(1) - smoothing) * ((lse - z_target) + lse_lo);
  if (smoothing != T(0)) loss += smoothing * ((lse - inv_c * sum_z) + lse_lo);
  return loss + z_loss * lse * lse;
}

// The divisor of y = x / max(||x||, eps), as F.normalize's clamp_min: a NaN
// norm (a row holding a NaN) stays NaN, so the whole row is NaN as in
// PyTorch, not x / eps.
template <typename T>
NNK_HD T norm_divisor(T norm, T eps) {
  return norm <= eps ? eps : norm;
}

// Backward of y = x / max(||x||, eps) for one element, given dot = <y, g> and
// the row norm: (g - y <y, g>) / ||x|| when ||x|| > eps, else g / eps (the
// map is linear there, as in F.normalize); NaN for a NaN norm.
template <typename T>
NNK_HD T normalize_grad(T g, T y, T dot, T norm, T eps) {
  return norm <= eps ? g / eps : (g - y * dot) / norm;
}

}  // namespace math
}  // namespace nnk
