// CPU implementation of the neural-collapse statistics ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "nnk/nc_checks.h"

namespace nnk {
namespace {

// Rows centered per GEMM in the Gram: the scratch (rows x D, and the D x D
// product), so no centered copy of the N x D features is ever made. The
// products are summed in float64 and rounded once: a float32 sum of them had
// an error growing with N (6e-5 relative at N = 200k, D = 8; 2e-8 this way),
// as the reference's (nnk.reference.GRAM_CHUNK_ROWS).
constexpr int64_t kGramChunkRows = 256;
// Columns per task of the class sums.
constexpr int64_t kSumColumns = 64;

void check_labels(const char* op, const at::Tensor& labels, int64_t classes) {
  const int64_t* p = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < classes, op, ": labels must be in [0, ", classes, "), got ",
                p[i], " at row ", i);
  }
}

std::tuple<at::Tensor, at::Tensor> nc_class_sums_cpu(const at::Tensor& features,
                                                     const at::Tensor& labels,
                                                     int64_t num_classes) {
  constexpr const char* op = "nnk::nc_class_sums";
  const nc::Batched f = nc::check_features(op, features, labels);
  TORCH_CHECK(num_classes >= 0, op, ": num_classes must be >= 0, got ", num_classes);
  check_labels(op, f.labels, num_classes);
  const int64_t* lab = f.labels.const_data_ptr<int64_t>();
  at::Tensor counts = at::zeros({num_classes}, f.labels.options());
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < f.n; ++i) ++cp[lab[i]];

  at::Tensor sums = at::zeros({f.b, num_classes, f.d}, f.features.options().dtype(nc::sums_dtype(features)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.features.scalar_type(),
                                  "nnk_nc_class_sums_cpu", [&] {
    using acc_t = double;  // nc::sums_dtype
    const scalar_t* hp = f.features.const_data_ptr<scalar_t>();
    acc_t* sp = sums.mutable_data_ptr<acc_t>();
    const int64_t col_tasks = (f.d + kSumColumns - 1) / kSumColumns;
    // One task per (batch, column range): rows are added in their order.
    at::parallel_for(0, f.b * col_tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / col_tasks;
        const int64_t c0 = (task % col_tasks) * kSumColumns;
        const int64_t c1 = std::min(f.d, c0 + kSumColumns);
        for (int64_t i = 0; i < f.n; ++i) {
          const scalar_t* hr = hp + (b * f.n + i) * f.d;
          acc_t* sr = sp + (b * num_classes + lab[i]) * f.d;
          for (int64_t c = c0; c < c1; ++c) sr[c] += static_cast<acc_t>(hr[c]);
        }
      }
    });
  });
  return {counts, f.batched ? sums : sums[0]};
}

at::Tensor nc_centered_gram_cpu(const at::Tensor& features, const at::Tensor& labels,
                                const at::Tensor& shifts) {
  constexpr const char* op = "nnk::nc_centered_gram";
  const nc::Batched f = nc::check_features(op, features, labels);
  const at::ScalarType acc = nc::gram_dtype(features, shifts);
  const at::Tensor c = nc::check_shifts(op, shifts, f, acc);
  check_labels(op, f.labels, c.size(1));
  at::Tensor gram = at::zeros({f.b, f.d, f.d}, f.features.options().dtype(at::kDouble));
  for (int64_t b = 0; b < f.b; ++b) {
    const at::Tensor cb = c[c.size(0) == 1 ? 0 : b];
    at::Tensor gb = gram[b];
    for (int64_t r0 = 0; r0 < f.n; r0 += kGramChunkRows) {
      const int64_t m = std::min(kGramChunkRows, f.n - r0);
      const at::Tensor centered = f.features[b].narrow(0, r0, m).to(acc) -
                                  cb.index_select(0, f.labels.narrow(0, r0, m));
      gb.add_(at::mm(centered.t(), centered));
    }
  }
  gram = gram.to(acc);
  return f.batched ? gram : gram[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(nnk, CPU, m) {
  m.impl("nc_class_sums", &nc_class_sums_cpu);
  m.impl("nc_centered_gram", &nc_centered_gram_cpu);
}

}  // namespace nnk
