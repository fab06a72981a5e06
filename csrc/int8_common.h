// Host-side rules of the LLM.int8 ops, shared by csrc/cpu/int8.cpp and csrc/cuda/int8.cu: argument
// checks, output shapes, the threshold rounding, the dequantization constant and the outlier-column
// finish. The numbers are those of nf4kit/reference.py (bitsandbytes 0.50.2 on the CPU).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace nf4kit {
namespace int8 {

// bitsandbytes' CPU int8_mm_dequant multiplies by this float32 constant (not 1/127^2 = 6.2000124e-05).
constexpr float kMMDequantConst = 6.200124e-05f;

// The threshold as bitsandbytes compares it with |A|: the Python float rounded to float32, then to
// A's dtype (torch casts the scalar of `A.abs() >= threshold` to A's dtype).
inline float rounded_threshold(double threshold, at::ScalarType dtype) {
  const float t = static_cast<float>(threshold);
  switch (dtype) {
    case at::kHalf: return static_cast<float>(at::Half(t));
    case at::kBFloat16: return static_cast<float>(at::BFloat16(t));
    default: return t;
  }
}

// Rows of a [..., K] tensor: the product of its leading dimensions.
inline int64_t rows_of(const at::Tensor& A) {
  int64_t r = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) r *= A.size(d);
  return r;
}

// [..., N]: A's leading dimensions and N.
inline std::vector<int64_t> out_shape(const at::Tensor& A, int64_t N) {
  std::vector<int64_t> s(A.sizes().begin(), A.sizes().end());
  s.back() = N;
  return s;
}

inline void check_quant_args(const at::Tensor& A) {
  check_float_input(A, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "A must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(A.size(-1) > 0, "A's last dimension must not be 0, got shape ", dims_string(A.sizes()));
}

// int8 A [..., K] and int8 B [N, K] on one device.
inline void check_matmul_args(const at::Tensor& A, const at::Tensor& B) {
  check_dtype(A, at::kChar, "A");
  check_dtype(B, at::kChar, "B");
  TORCH_CHECK_VALUE(A.dim() >= 1, "A must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(B.dim() == 2, "B must be 2-D [N, K], got shape ", dims_string(B.sizes()));
  TORCH_CHECK_VALUE(A.size(-1) == B.size(1), "A's last dimension (", A.size(-1), ") must equal B's K (",
                    B.size(1), "): A ", dims_string(A.sizes()), ", B ", dims_string(B.sizes()));
  check_device(B, A.device(), "B");
}

// The dequantizing epilogue's arguments for a product with `rows` rows and N columns.
inline void check_dequant_args(const at::Tensor& row_stats, const at::Tensor& col_stats,
                               const c10::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t rows,
                               int64_t N, const at::Device& device) {
  check_dtype(row_stats, at::kFloat, "row_stats");
  check_dtype(col_stats, at::kFloat, "col_stats");
  check_numel(row_stats, rows, "row_stats", "one per row of A");
  check_numel(col_stats, N, "col_stats", "one per output column");
  check_device(row_stats, device, "row_stats");
  check_device(col_stats, device, "col_stats");
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  if (bias.has_value()) {
    check_float_input(*bias, "bias");
    check_numel(*bias, N, "bias", "one per output column");
    check_device(*bias, device, "bias");
  }
}

// Bias as contiguous float32 (exact for every float dtype), or an undefined tensor.
inline at::Tensor bias_f32(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->reshape(-1).to(at::kFloat).contiguous() : at::Tensor();
}

// The checked operands of the dequantizing epilogue of an M x N product: float32 statistics and
// bias (undefined when absent), contiguous.
struct Epilogue {
  at::Tensor row_stats, col_stats, bias;
  int64_t M, N;
};

inline Epilogue epilogue(int64_t M, int64_t N, const at::Tensor& row_stats, const at::Tensor& col_stats,
                         const c10::optional<at::Tensor>& bias, at::ScalarType dtype, const at::Device& device) {
  check_dequant_args(row_stats, col_stats, bias, dtype, M, N, device);
  return {row_stats.contiguous(), col_stats.contiguous(), bias_f32(bias), M, N};
}

// int8_mm_dequant: int32 A [..., N].
inline Epilogue check_mm_dequant(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                                 at::ScalarType dtype, const c10::optional<at::Tensor>& bias) {
  check_dtype(A, at::kInt, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "A must have at least one dimension, got a scalar");
  return epilogue(rows_of(A), A.size(-1), row_stats, col_stats, bias, dtype, A.device());
}

// int8_scaled_mm: int8 A [..., K], int8 B [N, K].
inline Epilogue check_scaled_mm(const at::Tensor& A, const at::Tensor& B, const at::Tensor& row_stats,
                                const at::Tensor& col_stats, at::ScalarType dtype,
                                const c10::optional<at::Tensor>& bias) {
  check_matmul_args(A, B);
  return epilogue(rows_of(A), B.size(0), row_stats, col_stats, bias, dtype, A.device());
}

// After the row kernel: the columns whose flag is set (int64, ascending), zeroed in every row of q
// (bitsandbytes: `out_row[:, outlier_cols] = 0`; the kernel already zeroed the outliers themselves).
// Without a threshold (no flags) nothing is looked at, so the CUDA path stays free of host syncs.
inline at::Tensor finish_outlier_columns(at::Tensor& q2d, const at::Tensor& flags) {
  if (flags.numel() == 0) return at::empty({0}, flags.options().dtype(at::kLong));
  at::Tensor cols = at::nonzero(flags).reshape(-1);
  if (cols.numel() > 0 && q2d.size(0) > 1) q2d.index_fill_(1, cols, 0);
  return cols;
}

// int8_vectorwise_quant's input (contiguous), its rows and threshold, and its outputs (allocated with
// new_output; flags: uint8 [K] zeroed when there is a threshold, else empty). The backends run their
// row kernel in between setup and finish.
struct RowQuant {
  at::Tensor A;
  int64_t K, rows;
  bool use_thr;
  float thr;  // the threshold rounded to A's dtype
  at::Tensor q, row_stats, flags;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish() {
    at::Tensor q2d = q.view({rows, K});
    at::Tensor cols = finish_outlier_columns(q2d, flags);
    return {q, row_stats, cols};
  }
};

inline RowQuant row_quant_setup(const at::Tensor& A_, double threshold) {
  check_quant_args(A_);
  RowQuant r;
  r.A = A_.contiguous();
  r.K = r.A.size(-1);
  r.rows = rows_of(r.A);
  r.use_thr = threshold > 0.0;
  r.thr = rounded_threshold(threshold, r.A.scalar_type());
  r.q = new_output(r.A.sizes(), r.A.options().dtype(at::kChar));
  r.row_stats = new_output({r.rows}, r.A.options().dtype(at::kFloat));
  r.flags = at::zeros({r.use_thr ? r.K : 0}, r.A.options().dtype(at::kByte));
  return r;
}

}  // namespace int8
}  // namespace nf4kit
