// CPU kernel of gemm_4bit: out[M, N] = A[M, K] @ W[N, K]^T (+ bias), W in bitsandbytes' packed
// 4-bit format (any K: rows may start in the middle of a byte or of an absmax block).
//
// W is never materialised whole: slabs of its rows are dequantized exactly (code * absmax in
// float32, as reference.dequantize_4bit) into a float buffer and multiplied with float32 at::mm:
// for few rows of A, small cache-resident tiles per thread; for many rows, large slabs and one
// multithreaded BLAS call each. Accumulation is float32, the output rounded once to A's dtype, so
// the error is never larger than that of A's-dtype matmul on the dequantized weight.
// (bitsandbytes 0.50.2's CPU gemv_4bit returns wrong values and aborts on a bf16 weight with one
// output row; nothing here depends on N, K or the dtype.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../gemm_4bit.h"

namespace nf4kit {
namespace {

// From this many rows of A on, W is dequantized in large slabs for one multithreaded BLAS call.
constexpr int64_t kManyRows = 32;

struct WeightView {
  const uint8_t* packed;
  const float* absmax_f32;  // plain absmax, or null
  const uint8_t* absmax_u8; // nested codes, or null
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t blocksize, nested_blocksize;
  const float* decode;      // 16 values (FP4's -0.0 read as +0.0)

  float absmax(int64_t b) const {
    if (absmax_f32 != nullptr) return absmax_f32[b];
    const float scaled = nested_code[absmax_u8[b]] * nested_absmax[b / nested_blocksize];
    return scaled + offset;
  }

  // Flat elements [e0, e0 + len) of W, dequantized to float32, into out.
  void dequantize(int64_t e0, int64_t len, float* out) const {
    const int64_t e1 = e0 + len;
    for (int64_t b = e0 / blocksize; b * blocksize < e1; ++b) {
      const int64_t s = std::max(e0, b * blocksize), t = std::min(e1, (b + 1) * blocksize);
      const float scale = absmax(b);
      float table[16];
      for (int k = 0; k < 16; ++k) table[k] = decode[k] * scale;
      int64_t e = s;
      if (e < t && (e & 1)) {  // a row or block starting on a low nibble
        out[e - e0] = table[packed[e >> 1] & 15];
        ++e;
      }
      for (; e + 1 < t; e += 2) {
        const uint8_t byte = packed[e >> 1];
        out[e - e0] = table[byte >> 4];
        out[e + 1 - e0] = table[byte & 15];
      }
      if (e < t) out[e - e0] = table[packed[e >> 1] >> 4];
    }
  }
};

at::Tensor gemm_4bit_cpu(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                         c10::string_view quant_type, int64_t out_features, const std::optional<at::Tensor>& bias) {
  const Gemm4bitArgs a = check_gemm_4bit_args(A, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                              nested_blocksize, quant_type, out_features, bias);
  if (a.K == 0) return gemm_4bit_empty_k(a, A.options());
  at::Tensor out = new_output(a.out_shape, A.options());
  if (a.M == 0) return out;

  const Code4Tables tables = make_code4_tables(a.qt);
  WeightView w{};
  w.packed = a.packed.data_ptr<uint8_t>();
  w.blocksize = a.blocksize;
  w.decode = tables.decode;
  if (a.nested) {
    w.absmax_u8 = a.absmax.data_ptr<uint8_t>();
    w.nested_absmax = a.nested_absmax.data_ptr<float>();
    w.nested_code = a.nested_code.data_ptr<float>();
    w.offset = a.offset.item<float>();
    w.nested_blocksize = a.nested_blocksize;
  } else {
    w.absmax_f32 = a.absmax.data_ptr<float>();
  }

  const int64_t M = a.M, N = a.N, K = a.K;
  const at::Tensor Af = a.A2.to(at::kFloat).contiguous();
  at::Tensor outf;
  if (M >= kManyRows) {
    // Many rows: the product dominates. Dequantize slabs of W (up to 16M weights, 64 MB) with
    // every thread, then one multithreaded BLAS call per slab.
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{1} << 24) / K));
    at::Tensor slab = at::empty({rows, K}, A.options().dtype(at::kFloat));
    float* buf = slab.data_ptr<float>();
    outf = rows == N ? at::Tensor() : at::empty({M, N}, A.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nr = std::min(rows, N - n0);
      at::parallel_for(0, nr, std::max<int64_t>(1, 4096 / K), [&](int64_t r0, int64_t r1) {
        w.dequantize((n0 + r0) * K, (r1 - r0) * K, buf + r0 * K);
      });
      at::Tensor part = at::mm(Af, slab.narrow(0, 0, nr).t());
      if (rows == N) outf = part; else outf.narrow(1, n0, nr).copy_(part);
    }
  } else {
    // Few rows: reading W dominates. Each task dequantizes tiles of about 64K weights (256 KB,
    // cache-resident) and multiplies them with a single-threaded BLAS call.
    outf = at::empty({M, N}, A.options().dtype(at::kFloat));
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{1} << 16) / K));
    const int64_t ntiles = ceil_div(N, rows);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(static_cast<size_t>(rows * K));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * rows, nr = std::min(rows, N - n0);
        w.dequantize(n0 * K, nr * K, buf.data());
        const at::Tensor Wt = at::from_blob(buf.data(), {nr, K}, at::TensorOptions().dtype(at::kFloat));
        outf.narrow(1, n0, nr).copy_(at::mm(Af, Wt.t()));
      }
    });
  }
  if (a.bias.defined()) outf.add_(a.bias);
  out.copy_(outf.reshape(a.out_shape));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) { m.impl("gemm_4bit", &gemm_4bit_cpu); }

}  // namespace nf4kit
