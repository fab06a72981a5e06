// CPU kernels of the blockwise 4-bit ops (NF4 / FP4): quantize_4bit and dequantize_4bit.
// Bit for bit nf4kit/reference.py (bitsandbytes 0.50.2's CPU format); see the comments there.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "cpu_common.h"

namespace nf4kit {
namespace {

using cpu::block_absmax;
using cpu::clamp_unit;
using cpu::for_each_block;

// torch.clamp(v, min=lo): NaN stays NaN.
inline float clamp_min(float v, float lo) { return v < lo ? lo : v; }

// Code index of each scaled value of one block: y = x * recip (full block) or x / divisor
// (partial last block), clamped to [-1, 1], bucketed among the sorted midpoints.
template <typename scalar_t, QuantType QT, bool kPartial>
void block_codes(const scalar_t* x, int64_t len, float scale, const Code4Tables& t, uint8_t* q) {
  float mids[15];
  std::copy(t.mids, t.mids + 15, mids);
  for (int64_t i = 0; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    const float y = clamp_unit(kPartial ? v / scale : v * scale);
    const int b = bucket15(y, mids);
    q[i] = QT == QuantType::NF4 ? static_cast<uint8_t>(b) : t.order[b];
  }
}

template <typename scalar_t, QuantType QT>
void quantize_4bit_cpu_kernel(const scalar_t* x, int64_t n, int64_t blocksize, uint8_t* packed,
                              float* absmax) {
  const Code4Tables t = make_code4_tables(QT);
  for_each_block(n, blocksize, [&](int64_t b, int64_t start, int64_t len) {
    uint8_t q[4096];
    const float am = block_absmax(x + start, len);
    if (len == blocksize) {
      absmax[b] = am;
      block_codes<scalar_t, QT, false>(x + start, len, 1.0f / clamp_min(am, kTinyAbsmax), t, q);
    } else {
      const float divisor = clamp_min(am, kTinyAbsmax);
      absmax[b] = divisor;
      block_codes<scalar_t, QT, true>(x + start, len, divisor, t, q);
    }
    // blocksize is even, so a block starts on a byte; only the very last one can be odd.
    uint8_t* out = packed + start / 2;
    const int64_t pairs = len / 2;
    for (int64_t i = 0; i < pairs; ++i) out[i] = static_cast<uint8_t>((q[2 * i] << 4) | q[2 * i + 1]);
    if (len % 2) out[pairs] = static_cast<uint8_t>((q[len - 1] << 4) | t.zero_code);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A_, int64_t blocksize,
                                                     c10::string_view quant_type) {
  check_float_input(A_, "A");
  TORCH_CHECK_VALUE(A_.numel() > 0, "A must not be empty, got shape ", A_.sizes());
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const at::Tensor A = A_.contiguous();
  const int64_t n = A.numel();
  at::Tensor packed = new_output({(n + 1) / 2}, A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  NF4KIT_DISPATCH_FLOAT(A.scalar_type(), "quantize_4bit_cpu", [&] {
    auto run = [&](auto qt_tag) {
      quantize_4bit_cpu_kernel<scalar_t, decltype(qt_tag)::value>(
          A.data_ptr<scalar_t>(), n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    };
    if (qt == QuantType::NF4) run(std::integral_constant<QuantType, QuantType::NF4>{});
    else run(std::integral_constant<QuantType, QuantType::FP4>{});
  });
  return {packed, absmax};
}

// Where the kernel reads each block's absmax: float32 values, or (nested) uint8 codes decoded as
// code8[q] * nested_absmax[j / nested_blocksize], then + offset (two float32 roundings).
struct AbsmaxSource {
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  int64_t nested_blocksize = 1;

  float operator()(int64_t j) const {
    if (absmax != nullptr) return absmax[j];
    const float scaled = nested_code[absmax_q[j]] * nested_absmax[j / nested_blocksize];
    return scaled + offset;
  }
};

template <typename out_t>
void dequantize_4bit_cpu_kernel(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                                int64_t blocksize, const Code4Tables& t, out_t* out) {
  for_each_block(n, blocksize, [&](int64_t b, int64_t start, int64_t len) {
    const float s = absmax(b);
    out_t table[16];
    for (int k = 0; k < 16; ++k) table[k] = static_cast<out_t>(t.decode[k] * s);
    const uint8_t* in = packed + start / 2;
    out_t* o = out + start;
    const int64_t pairs = len / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      o[2 * i] = table[in[i] >> 4];
      o[2 * i + 1] = table[in[i] & 0xF];
    }
    if (len % 2) o[len - 1] = table[in[pairs] >> 4];
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed_, const at::Tensor& absmax_,
                               const c10::optional<at::Tensor>& nested_absmax_,
                               const c10::optional<at::Tensor>& nested_code_,
                               const c10::optional<at::Tensor>& offset_, int64_t blocksize,
                               int64_t nested_blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                               at::ScalarType dtype) {
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t n = shape_numel(shape, "shape");
  const int64_t nblocks = ceil_div(n, blocksize);
  const at::Device dev = packed_.device();
  check_device(absmax_, dev, "absmax");
  const at::Tensor packed = packed_.contiguous();
  TORCH_CHECK_VALUE(packed.numel() * packed.element_size() >= (n + 1) / 2, "packed holds ",
                    packed.numel() * packed.element_size(), " bytes, too few for shape ", shape, " (",
                    (n + 1) / 2, " needed)");
  check_numel(absmax_, nblocks, "absmax", "one per block of blocksize in shape");
  const at::Tensor absmax = absmax_.contiguous();

  AbsmaxSource src;
  at::Tensor nested_absmax, nested_code;
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(nested_absmax_.has_value() && nested_code_.has_value() && offset_.has_value(),
                      "absmax is uint8 (nested) so nested_absmax, nested_code and offset are required");
    TORCH_CHECK_VALUE(nested_blocksize > 0, "nested_blocksize must be positive, got ", nested_blocksize);
    check_dtype(*nested_absmax_, at::kFloat, "nested_absmax");
    check_dtype(*nested_code_, at::kFloat, "nested_code");
    check_dtype(*offset_, at::kFloat, "offset");
    check_device(*nested_absmax_, dev, "nested_absmax");
    check_device(*nested_code_, dev, "nested_code");
    check_device(*offset_, dev, "offset");
    check_numel(*nested_absmax_, ceil_div(nblocks, nested_blocksize), "nested_absmax",
                "one per nested_blocksize absmax codes");
    check_numel(*nested_code_, 256, "nested_code", "the 8-bit code");
    check_numel(*offset_, 1, "offset", "a scalar");
    nested_absmax = nested_absmax_->contiguous();
    nested_code = nested_code_->contiguous();
    src.absmax_q = absmax.data_ptr<uint8_t>();
    src.nested_absmax = nested_absmax.data_ptr<float>();
    src.nested_code = nested_code.data_ptr<float>();
    src.offset = offset_->item<float>();
    src.nested_blocksize = nested_blocksize;
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat,
                     "absmax must be float32, or uint8 codes with nested_absmax, got ", absmax.scalar_type());
    TORCH_CHECK_VALUE(!nested_absmax_.has_value() && !nested_code_.has_value() && !offset_.has_value(),
                      "nested_absmax, nested_code and offset are only for uint8 (nested) absmax; absmax is "
                      "float32");
    src.absmax = absmax.data_ptr<float>();
  }

  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  const Code4Tables t = make_code4_tables(qt);
  const auto* bytes = static_cast<const uint8_t*>(packed.data_ptr());
  NF4KIT_DISPATCH_FLOAT(dtype, "dequantize_4bit_cpu", [&] {
    dequantize_4bit_cpu_kernel<scalar_t>(bytes, src, n, blocksize, t, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace nf4kit
