// The Python module nnk._C. Operators are registered through TORCH_LIBRARY
// (csrc/schema.cpp) when this library is loaded; pybind11 serves what is not
// an operator: how the extension was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

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
constexpr long kOpsAbi = 3;

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
}
