// gemm_4bit's argument checks, shared by the CPU (csrc/cpu/gemm_4bit.cpp) and CUDA
// (csrc/cuda/gemm_4bit.cu) host functions: out[..., N] = A[..., K] @ W[N, K]^T (+ bias), W given
// as its packed 4-bit form (bitsandbytes' format, see nf4kit/reference.py).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "common.h"

namespace nf4kit {

// The checked, contiguous arguments of one gemm_4bit call: the weight (check_packed_4bit, shared
// with dequantize_4bit) plus the activations and bias.
struct Gemm4bitArgs : Packed4bit {
  at::Tensor A2;                   // A as [M, K], contiguous, A's dtype
  at::Tensor bias;                 // [N] in any float dtype, contiguous, or undefined
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> out_shape;  // A's leading dimensions + [N]
};

inline Gemm4bitArgs check_gemm_4bit_args(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& offset, int64_t blocksize,
                                         int64_t nested_blocksize, c10::string_view quant_type,
                                         int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_float_input(A, "A");
  TORCH_CHECK_VALUE(A.dim() >= 1, "A must have at least one dimension (in_features last), got a scalar");
  TORCH_CHECK_VALUE(out_features >= 1, "out_features must be positive, got ", out_features);
  const int64_t N = out_features, K = A.size(-1);
  check_device(packed, A.device(), "packed");
  Gemm4bitArgs a;
  static_cast<Packed4bit&>(a) =
      check_packed_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                        N * K, "a weight of shape [out_features=" + std::to_string(N) + ", in_features=" +
                                   std::to_string(K) + "] (A's last dimension)");
  a.N = N;
  a.K = K;
  a.M = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) a.M *= A.size(d);
  if (bias.has_value()) {
    check_float_input(*bias, "bias");
    check_device(*bias, A.device(), "bias");
    check_numel(*bias, N, "bias", "one per output feature");
    a.bias = bias->reshape({-1}).contiguous();  // (the CUDA kernels read T or float32: no cast kernel a call)
  }
  a.A2 = A.reshape({a.M, K}).contiguous();
  a.out_shape = std::vector<int64_t>(A.sizes().begin(), A.sizes().end());
  a.out_shape.back() = N;
  return a;
}

// The result when there is nothing to multiply (K == 0): bias, or zeros, in A's dtype.
inline at::Tensor gemm_4bit_empty_k(const Gemm4bitArgs& a, const at::TensorOptions& opts) {
  at::Tensor out = new_output(a.out_shape, opts);
  if (out.numel() == 0) return out;
  if (a.bias.defined()) out.copy_(a.bias.expand(a.out_shape));
  else out.zero_();
  return out;
}

}  // namespace nf4kit
