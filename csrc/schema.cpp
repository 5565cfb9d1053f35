// The one schema file of the nnk operator library. Implementations register
// per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cpp; fake (meta) kernels
// and autograd formulas are registered from Python in nnk/ops/.
#include <torch/library.h>

TORCH_LIBRARY(nnk, m) {
  // y = x / max(||x||_2, eps) row-wise, and the row norms ||x||_2 in the
  // accumulation dtype (float32, float64 for float64 input).
  m.def("row_normalize(Tensor x, float eps) -> (Tensor y, Tensor norm)");
  // dx = (g - y <y, g>) / ||x|| for rows with ||x|| > eps, else g / eps.
  m.def(
      "row_normalize_backward(Tensor grad_y, Tensor y, Tensor norm, float eps)"
      " -> Tensor");
}
