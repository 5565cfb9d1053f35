// The Python module nnk._C. Operators are registered through TORCH_LIBRARY
// (csrc/schema.cpp) when this library is loaded; pybind11 serves what is not
// an operator: how the extension was built, and the block shape its fused
// cross-entropy would use.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>

#include "nnk/cce_driver.h"

#ifndef NNK_VERSION
#define NNK_VERSION "unknown"
#endif
#ifndef NNK_CUDA_ARCHS
#define NNK_CUDA_ARCHS ""
#endif
#ifndef NNK_TORCH_VERSION
#define NNK_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

// The version of the operator schemas (csrc/schema.cpp): bump it with every
// schema change. nnk/ops/_extension.py refuses a library of another version
// (an editable install whose Python sources moved on without a rebuild would
// otherwise call ops with other arguments and outputs).
constexpr long kOpsAbi = 4;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nnk compiled extension: operators live in torch.ops.nnk";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = NNK_VERSION;
        info["torch_version"] = NNK_TORCH_VERSION;
#ifdef NNK_WITH_CUDA
        info["cuda"] = true;
        info["cuda_archs"] = std::string(NNK_CUDA_ARCHS);
#else
        info["cuda"] = false;
        info["cuda_archs"] = std::string();
#endif
#if defined(__clang__)
        info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
        info["compiler"] = std::string("gcc ") + __VERSION__;
#else
        info["compiler"] = std::string("unknown");
#endif
        info["cplusplus"] = static_cast<long>(__cplusplus);
        info["ops_abi"] = kOpsAbi;
        return info;
      },
      "How nnk._C was built: version, torch version, CUDA and its arch list, compiler.");
  m.def(
      "cce_block_shape",
      [](int64_t n, int64_t c, int64_t d, const std::string& dtype, bool cuda, int64_t chunk_bytes) {
        at::ScalarType x;
        if (dtype == "float32") {
          x = at::kFloat;
        } else if (dtype == "float16") {
          x = at::kHalf;
        } else if (dtype == "bfloat16") {
          x = at::kBFloat16;
        } else if (dtype == "float64") {
          x = at::kDouble;
        } else {
          throw py::value_error("cce_block_shape: dtype must be float32, float16, bfloat16 or "
                                "float64, got " + dtype);
        }
        if (n < 0 || c < 1 || d < 1 || chunk_bytes < 0) {
          throw py::value_error("cce_block_shape: need n >= 0, c >= 1, d >= 1, chunk_bytes >= 0");
        }
        const at::ScalarType acc = nnk::cce::acc_dtype(x);
        // The GEMM dtype of the backends: the CUDA GEMMs take the inputs'
        // dtype, the CPU converts them to the accumulation dtype.
        nnk::cce::Options o;
        o.chunk_bytes = chunk_bytes;
        const nnk::cce::Tiling t = nnk::cce::tiling(n, c, d, acc, cuda ? x : acc, x, o);
        return std::make_pair(t.rows, t.classes);
      },
      py::arg("n"), py::arg("c"), py::arg("d"), py::arg("dtype"), py::arg("cuda"),
      py::arg("chunk_bytes") = 0,
      "(rows, classes) of the blocks nnk::cosine_cross_entropy_* use for N rows, C classes of "
      "dimension D in dtype on a CUDA (or CPU) device with a budget of chunk_bytes (0: the "
      "default); classes < C: class chunks.");
}
