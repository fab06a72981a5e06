// The dequantize_4bit kernel's launcher (csrc/cuda/dequantize_4bit.cu), for the other CUDA ops
// that need a weight dequantized (gemm_4bit's dequantize + cuBLAS path).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "../common.h"

namespace nf4kit {
namespace cuda {

// Writes the checked 4-bit weight w (w.n elements) into out (contiguous, float16/bfloat16/float32)
// on stream, bit for bit as the dequantize_4bit op.
void dequantize_4bit_into(const Packed4bit& w, at::Tensor& out, cudaStream_t stream);

}  // namespace cuda
}  // namespace nf4kit
