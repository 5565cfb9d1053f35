// The one schema file of the nnk operator library. Implementations register
// per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cpp; fake (meta) kernels
// and the autograd formulas of the differentiable ops (row_normalize,
// cosine_cross_entropy_fwd) are registered from Python in nnk/ops/; the
// others are declared non-differentiable at the end of this file.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

TORCH_LIBRARY(nnk, m) {
  // y = x / max(||x||_2, eps) row-wise, and the row norms ||x||_2 in the
  // accumulation dtype (float32, float64 for float64 input).
  m.def("row_normalize(Tensor x, float eps) -> (Tensor y, Tensor norm)");
  // dx = (g - y <y, g>) / ||x|| for rows with ||x|| > eps, else g / eps.
  m.def(
      "row_normalize_backward(Tensor grad_y, Tensor y, Tensor norm, float eps)"
      " -> Tensor");

  // Fused cosine cross-entropy (the math: nnk.reference.cosine_cross_entropy_ref)
  // without the N x C logits: blocks of chunk_rows rows x chunk_classes
  // classes (0: sized to chunk_bytes of buffers, 0: the default budget;
  // nnk/cce_driver.h tiling). scale: () or (C,); bias: (C,) or None; target: int64,
  // ignore_index rows get loss 0. Returns the (N,) row losses, the (N,)
  // log-sum-exp and lse_lo, what rounding the lse dropped (exactly: the true
  // m + log1p(rest) is lse + lse_lo, math.h lse_finish), in the accumulation dtype (float32;
  // float64 for float64). The backward takes lse_lo back so that its
  // probabilities do not inherit the rounding of lse.
  m.def(
      "cosine_cross_entropy_fwd(Tensor x, Tensor weight, Tensor target, Tensor scale,"
      " Tensor? bias, bool normalize_input, bool normalize_weight, float additive_margin,"
      " float angular_margin, int ignore_index, float label_smoothing, float z_loss,"
      " float eps, int chunk_rows, int chunk_classes, int chunk_bytes)"
      " -> (Tensor loss, Tensor lse, Tensor lse_lo)");
  // Its backward, recomputing the logits chunk by chunk: d loss_i enters with
  // grad_loss_i (zero on ignored rows), d lse_i with grad_lse_i (None: zero).
  // output_mask selects (grad_x, grad_weight, grad_scale, grad_bias); the
  // others come back as empty (0,) tensors. Gradients are in each input's dtype.
  m.def(
      "cosine_cross_entropy_bwd(Tensor? grad_loss, Tensor? grad_lse, Tensor x,"
      " Tensor weight, Tensor target, Tensor scale, Tensor? bias, Tensor lse,"
      " Tensor lse_lo, bool normalize_input, bool normalize_weight, float additive_margin,"
      " float angular_margin, bool exact_margin, int ignore_index,"
      " float label_smoothing, float z_loss, float eps, int chunk_rows, int chunk_classes,"
      " int chunk_bytes, bool[4] output_mask)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_scale, Tensor grad_bias)");
  // Both in one loop, for training with an upstream gradient known before
  // the forward (grad_loss: (N,), e.g. 1 per row for a sum, 1 / #valid for a
  // mean): with one class chunk each block's logits serve the loss and then
  // its gradients, so they are computed once instead of twice; with class
  // chunks (the gradients need every chunk's lse first) it is the forward
  // and then the backward. Returns the forward's (loss,
  // lse) and the backward's gradients for grad_lse = None. float16 inputs on
  // CUDA may not ask for gradients: only the backward op scales the upstream
  // gradients against fp16 underflow (cce_driver.h grad_scale).
  m.def(
      "cosine_cross_entropy_fwd_bwd(Tensor x, Tensor weight, Tensor target, Tensor scale,"
      " Tensor? bias, Tensor grad_loss, bool normalize_input, bool normalize_weight,"
      " float additive_margin, float angular_margin, bool exact_margin, int ignore_index,"
      " float label_smoothing, float z_loss, float eps, int chunk_rows, int chunk_classes,"
      " int chunk_bytes, bool[4] output_mask)"
      " -> (Tensor loss, Tensor lse, Tensor grad_x, Tensor grad_weight, Tensor grad_scale,"
      " Tensor grad_bias)");

  // Neural-collapse statistics (the contracts of nnk.reference.nc_class_sums_ref
  // and nc_centered_gram_ref). features: (N, D) or (B, N, D); labels: (N,)
  // int32/int64 in [0, K). counts (K,) int64; sums (K, D) / (B, K, D) float64
  // for every input dtype.
  m.def("nc_class_sums(Tensor features, Tensor labels, int num_classes)"
        " -> (Tensor counts, Tensor sums)");
  // sum_i (h_i - shifts[y_i]) (h_i - shifts[y_i])^T per batch, the centering
  // fused into the load. shifts: (K, D) or (B, K, D). (D, D) or (B, D, D),
  // float32 (float64 when features or shifts are float64).
  m.def("nc_centered_gram(Tensor features, Tensor labels, Tensor shifts) -> Tensor");
}

namespace {

// The Autograd kernel of an op without a derivative (gradients, statistics):
// it runs the op below autograd, so that inputs requiring grad neither reach
// the kernels' own ATen calls with autograd on (out= variants refuse them)
// nor give outputs that require grad with no formula behind them. This is
// the registration torch.library.opcheck asks of a non-differentiable op.
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(nnk, Autograd, m) {
  for (const char* name : {"row_normalize_backward", "cosine_cross_entropy_bwd",
                           "cosine_cross_entropy_fwd_bwd", "nc_class_sums", "nc_centered_gram"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  }
}

