// CPU kernel of quantize_nested_absmax: quantize_blockwise(absmax - offset, code, blocksize).
// The subtraction is one float32 rounding per element (at::sub), then the CPU quantize_blockwise
// kernel (csrc/cpu/blockwise8.cpp) runs on the result, so the bytes are those of the reference.
// (The CUDA kernel fuses the subtraction into its load; here the extra pass is cheap.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common.h"

namespace nf4kit {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_nested_absmax_cpu(const at::Tensor& absmax, const at::Tensor& offset,
                                                              const at::Tensor& code, int64_t blocksize) {
  check_dtype(absmax, at::kFloat, "absmax");
  TORCH_CHECK_VALUE(absmax.numel() > 0, "absmax must not be empty");
  check_device(offset, absmax.device(), "offset");
  check_dtype(offset, at::kFloat, "offset");
  check_numel(offset, 1, "offset", "a scalar: the mean of absmax");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nf4kit::quantize_blockwise", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(at::sub(absmax, offset.reshape({})), code, blocksize);
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) { m.impl("quantize_nested_absmax", &quantize_nested_absmax_cpu); }

}  // namespace nf4kit
