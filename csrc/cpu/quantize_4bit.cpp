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

// Sorted-code position (bucket) of each value of one block: y = x * recip (full block) or
// x / divisor (partial last block), clamped to [-1, 1], among the 15 sorted midpoints. The block
// is first widened to float32 in its own loop so that both loops vectorize.
template <typename scalar_t, bool kPartial>
void block_buckets(const scalar_t* x, int64_t len, float scale, const float* mids_, uint8_t* q) {
  float v[4096];
  for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(x[i]);
  float mids[15];
  std::copy(mids_, mids_ + 15, mids);
  for (int64_t i = 0; i < len; ++i) {
    const float y = clamp_unit(kPartial ? v[i] / scale : v[i] * scale);
    q[i] = static_cast<uint8_t>(bucket15(y, mids));
  }
}

// The packed byte of each pair of buckets: code index order[hi] << 4 | order[lo] (identity for
// NF4, whose code is sorted).
struct PairTable {
  uint8_t byte[256];
  explicit PairTable(const Code4Tables& t) {
    for (int k = 0; k < 256; ++k) byte[k] = static_cast<uint8_t>((t.order[k >> 4] << 4) | t.order[k & 15]);
  }
};

template <typename scalar_t, QuantType QT>
void quantize_4bit_cpu_kernel(const scalar_t* x, int64_t n, int64_t blocksize, uint8_t* packed,
                              float* absmax) {
  const Code4Tables t = make_code4_tables(QT);
  const PairTable pairs_of(t);
  // A trailing odd element pairs with 0.0, whose bucket is the position of zero_code.
  const uint8_t zero_bucket = static_cast<uint8_t>(bucket15(0.0f, t.mids));
  for_each_block(n, blocksize, [&](int64_t b, int64_t start, int64_t len) {
    uint8_t q[4096];
    const float am = block_absmax(x + start, len);
    if (len == blocksize) {
      absmax[b] = am;
      block_buckets<scalar_t, false>(x + start, len, 1.0f / clamp_min(am, kTinyAbsmax), t.mids, q);
    } else {
      const float divisor = clamp_min(am, kTinyAbsmax);
      absmax[b] = divisor;
      block_buckets<scalar_t, true>(x + start, len, divisor, t.mids, q);
    }
    // blocksize is even, so a block starts on a byte; only the very last one can be odd.
    uint8_t* out = packed + start / 2;
    const int64_t pairs = len / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      const uint8_t bb = static_cast<uint8_t>((q[2 * i] << 4) | q[2 * i + 1]);
      out[i] = QT == QuantType::NF4 ? bb : pairs_of.byte[bb];
    }
    if (len % 2) out[pairs] = pairs_of.byte[(q[len - 1] << 4) | zero_bucket];
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

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t n = shape_numel(shape, "shape");
  const Packed4bit w = check_packed_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                         nested_blocksize, quant_type, n, c10::str("shape ", shape));
  AbsmaxSource src;
  if (w.nested) {
    src.absmax_q = w.absmax.data_ptr<uint8_t>();
    src.nested_absmax = w.nested_absmax.data_ptr<float>();
    src.nested_code = w.nested_code.data_ptr<float>();
    src.offset = w.offset.item<float>();
    src.nested_blocksize = nested_blocksize;
  } else {
    src.absmax = w.absmax.data_ptr<float>();
  }
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  const Code4Tables t = make_code4_tables(w.qt);
  NF4KIT_DISPATCH_FLOAT(dtype, "dequantize_4bit_cpu", [&] {
    dequantize_4bit_cpu_kernel<scalar_t>(w.packed.data_ptr<uint8_t>(), src, n, blocksize, t, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace nf4kit
