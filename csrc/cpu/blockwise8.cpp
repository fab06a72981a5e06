// CPU kernels of the blockwise 8-bit ops: quantize_blockwise and dequantize_blockwise against a
// sorted 256-value code. Bit for bit nf4kit/reference.py (bitsandbytes 0.50.2's CPU quantizer:
// scale to [-1, 1], snap to a 65536-point grid, look the grid point up in a nearest-code table).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "cpu_common.h"

namespace nf4kit {
namespace {

constexpr int kGridPoints = 65536;

using Code8 = std::array<float, 256>;
using Lut8 = std::array<uint8_t, kGridPoints>;

std::unique_ptr<Lut8> build_lut(const Code8& code) {
  auto lut = std::make_unique<Lut8>();
  for (int i = 0; i < kGridPoints; ++i) (*lut)[i] = nearest_code_index(i, code.data());
  return lut;
}

// The table of a code, cached by the code's contents (few codes are in use at once: the dynamic
// map, perhaps a custom one). The caller holds a shared_ptr, so evicting an entry is safe.
std::shared_ptr<const Lut8> lut_for(const Code8& code) {
  static std::mutex mu;
  static std::vector<std::pair<Code8, std::shared_ptr<const Lut8>>> cache;
  constexpr size_t kMaxCached = 8;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& e : cache)
      if (std::memcmp(e.first.data(), code.data(), sizeof(Code8)) == 0) return e.second;
  }
  std::shared_ptr<const Lut8> lut = build_lut(code);  // outside the lock; a racing twin is harmless
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() == kMaxCached) cache.erase(cache.begin());
  cache.emplace_back(code, lut);
  return lut;
}

template <typename scalar_t>
void quantize_blockwise_cpu_kernel(const scalar_t* x, int64_t n, int64_t blocksize, const Lut8& lut,
                                   uint8_t* q, float* absmax) {
  cpu::for_each_block(n, blocksize, [&](int64_t b, int64_t start, int64_t len) {
    const float am = cpu::block_absmax(x + start, len);
    absmax[b] = am;
    const float recip = 1.0f / am;  // inf for an all-zero block: 0 * inf = NaN -> grid point 0
    for (int64_t i = start; i < start + len; ++i) {
      const float v = cpu::clamp_unit(static_cast<float>(x[i]) * recip);
      const float t = ((v + 1.0f) * 0.5f) * 65535.0f + 0.5f;
      const int64_t g = t != t ? 0 : static_cast<int64_t>(t);
      q[i] = lut[g];
    }
  });
}

Code8 read_code(const at::Tensor& code) {
  check_dtype(code, at::kFloat, "code");
  check_numel(code, 256, "code", "the 8-bit code has 256 values");
  Code8 c;
  const at::Tensor cc = code.contiguous();
  std::memcpy(c.data(), cc.data_ptr<float>(), sizeof(Code8));
  return c;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A_, const at::Tensor& code,
                                                          int64_t blocksize) {
  check_float_input(A_, "A");
  TORCH_CHECK_VALUE(A_.numel() > 0, "A must not be empty, got shape ", A_.sizes());
  TORCH_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  check_device(code, A_.device(), "code");
  const Code8 c = read_code(code);
  const std::shared_ptr<const Lut8> lut = lut_for(c);
  const at::Tensor A = A_.contiguous();
  const int64_t n = A.numel();
  at::Tensor q = new_output(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  NF4KIT_DISPATCH_FLOAT(A.scalar_type(), "quantize_blockwise_cpu", [&] {
    quantize_blockwise_cpu_kernel<scalar_t>(A.data_ptr<scalar_t>(), n, blocksize, *lut, q.data_ptr<uint8_t>(),
                                            absmax.data_ptr<float>());
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A_, const at::Tensor& absmax_, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype) {
  check_dtype(A_, at::kByte, "A");
  TORCH_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  check_device(absmax_, A_.device(), "absmax");
  check_device(code, A_.device(), "code");
  check_dtype(absmax_, at::kFloat, "absmax");
  const int64_t n = A_.numel();
  check_numel(absmax_, ceil_div(n, blocksize), "absmax", "one per block of blocksize in A");
  const Code8 c = read_code(code);
  const at::Tensor A = A_.contiguous();
  const at::Tensor absmax = absmax_.contiguous();
  at::Tensor out = new_output(A.sizes(), A.options().dtype(dtype));
  if (n == 0) return out;
  const uint8_t* q = A.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  NF4KIT_DISPATCH_FLOAT(dtype, "dequantize_blockwise_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    cpu::for_each_block(n, blocksize, [&](int64_t b, int64_t start, int64_t len) {
      const float s = am[b];
      // Long blocks convert the 256 possible values once (the same float32 products).
      if (len >= 1024 && !std::is_same_v<scalar_t, float>) {
        scalar_t table[256];
        for (int k = 0; k < 256; ++k) table[k] = static_cast<scalar_t>(c[k] * s);
        for (int64_t i = start; i < start + len; ++i) o[i] = table[q[i]];
      } else {
        for (int64_t i = start; i < start + len; ++i) o[i] = static_cast<scalar_t>(c[q[i]] * s);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace nf4kit
