// CPU kernels of the LLM.int8 ops: row-wise int8 quantization with outlier columns, the
// int8 x int8^T -> int32 product, the dequantizing epilogue and both fused. Bit for bit
// nf4kit/reference.py (built with -ffp-contract=off: every float step rounds on its own).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common.h"
#include "../int8_common.h"

namespace nf4kit {
namespace {

// ---------------------------------------------------------------------------------------------
// Row-wise quantization
// ---------------------------------------------------------------------------------------------

// One row: absmax over the non-outliers (NaN propagates), then q = rint(x * ((1 / absmax) * 127)),
// 0 for outliers and for non-finite products.
template <typename T>
void quantize_row(const T* x, int64_t K, bool use_thr, float thr, int8_t* q, float* row_stat) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(static_cast<float>(x[k]));
    if (use_thr && a >= thr) continue;
    m = a > m ? a : m;
    nan |= a != a;
  }
  const float absmax = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  *row_stat = absmax;
  const float scale = (1.0f / absmax) * 127.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = static_cast<float>(x[k]);
    const float p = v * scale;
    const bool outlier = use_thr && std::fabs(v) >= thr;
    q[k] = (outlier || !std::isfinite(p)) ? int8_t(0) : static_cast<int8_t>(std::nearbyint(p));
  }
}

template <typename T>
void quantize_rows(const T* A, int64_t rows, int64_t K, bool use_thr, float thr, int8_t* q, float* row_stats,
                   uint8_t* flags) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / K);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(A + r * K, K, use_thr, thr, q + r * K, row_stats + r);
  });
  if (!use_thr) return;
  // Outlier columns: each task owns a range of columns, so no two tasks write one flag.
  constexpr int64_t kCols = 64;
  at::parallel_for(0, ceil_div(K, kCols), std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(rows * kCols, 1)),
                   [&](int64_t c0, int64_t c1) {
                     const int64_t lo = c0 * kCols, hi = std::min(K, c1 * kCols);
                     for (int64_t r = 0; r < rows; ++r) {
                       const T* x = A + r * K;
                       for (int64_t k = lo; k < hi; ++k) flags[k] |= std::fabs(static_cast<float>(x[k])) >= thr;
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cpu(const at::Tensor& A_, double threshold) {
  int8::RowQuant r = int8::row_quant_setup(A_, threshold);
  NF4KIT_DISPATCH_FLOAT(r.A.scalar_type(), "int8_vectorwise_quant_cpu", [&] {
    quantize_rows(r.A.data_ptr<scalar_t>(), r.rows, r.K, r.use_thr, r.thr, r.q.data_ptr<int8_t>(),
                  r.row_stats.data_ptr<float>(), r.flags.data_ptr<uint8_t>());
  });
  return r.finish();
}

// ---------------------------------------------------------------------------------------------
// int8 x int8^T with an epilogue
// ---------------------------------------------------------------------------------------------

// sum_k a[k] * b[k], wrapping modulo 2^32 like the int32 accumulators of the GPU kernel.
inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t K) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < K; ++k) acc += static_cast<uint32_t>(int32_t(a[k]) * int32_t(b[k]));
  return static_cast<int32_t>(acc);
}

// The dequantizing epilogue of one element: ((float(v) * (r * c)) * C) (+ bias), each step rounded.
struct Dequant {
  const float* row_stats;
  const float* col_stats;
  const float* bias;  // float32 [N] or null
  float operator()(int32_t v, int64_t m, int64_t n) const {
    float out = static_cast<float>(v) * (row_stats[m] * col_stats[n]);
    out = out * int8::kMMDequantConst;
    if (bias != nullptr) out = out + bias[n];
    return out;
  }
};

// out[m, n] = store(m, n, dot(A[m], B[n])). B is walked in blocks of rows that stay in cache
// while every row of A passes over them.
template <typename Store>
void int8_gemm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const Store& store) {
  constexpr int64_t kNB = 32;
  const int64_t nblocks = ceil_div(N, kNB);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(kNB * K, 1));
  at::parallel_for(0, nblocks * M, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t nb = i / M, m = i % M;
      const int8_t* a = A + m * K;
      for (int64_t n = nb * kNB; n < std::min(N, (nb + 1) * kNB); ++n) store(m, n, dot_i8(a, B + n * K, K));
    }
  });
}

at::Tensor int8_linear_matmul_cpu(const at::Tensor& A_, const at::Tensor& B_) {
  int8::check_matmul_args(A_, B_);
  const at::Tensor A = A_.contiguous(), B = B_.contiguous();
  const int64_t K = A.size(-1), M = int8::rows_of(A), N = B.size(0);
  at::Tensor out = new_output(int8::out_shape(A, N), A.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  int8_gemm(A.data_ptr<int8_t>(), B.data_ptr<int8_t>(), M, N, K,
            [&](int64_t m, int64_t n, int32_t v) { o[m * N + n] = v; });
  return out;
}

Dequant make_dequant(const int8::Epilogue& e) {
  return Dequant{e.row_stats.data_ptr<float>(), e.col_stats.data_ptr<float>(),
                 e.bias.defined() ? e.bias.data_ptr<float>() : nullptr};
}

at::Tensor int8_mm_dequant_cpu(const at::Tensor& A_, const at::Tensor& row_stats, const at::Tensor& col_stats,
                               at::ScalarType dtype, const c10::optional<at::Tensor>& bias) {
  const int8::Epilogue e = int8::check_mm_dequant(A_, row_stats, col_stats, dtype, bias);
  const int64_t M = e.M, N = e.N;
  const at::Tensor A = A_.contiguous();
  at::Tensor out = new_output(A.sizes(), A.options().dtype(dtype));
  const Dequant epi = make_dequant(e);
  const int32_t* a = A.data_ptr<int32_t>();
  NF4KIT_DISPATCH_FLOAT(dtype, "int8_mm_dequant_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) o[m * N + n] = static_cast<scalar_t>(epi(a[m * N + n], m, n));
    });
  });
  return out;
}

at::Tensor int8_scaled_mm_cpu(const at::Tensor& A_, const at::Tensor& B_, const at::Tensor& row_stats,
                              const at::Tensor& col_stats, at::ScalarType dtype,
                              const c10::optional<at::Tensor>& bias) {
  const int8::Epilogue e = int8::check_scaled_mm(A_, B_, row_stats, col_stats, dtype, bias);
  const int64_t M = e.M, N = e.N;
  const at::Tensor A = A_.contiguous(), B = B_.contiguous();
  at::Tensor out = new_output(int8::out_shape(A, N), A.options().dtype(dtype));
  const Dequant epi = make_dequant(e);
  NF4KIT_DISPATCH_FLOAT(dtype, "int8_scaled_mm_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    int8_gemm(A.data_ptr<int8_t>(), B.data_ptr<int8_t>(), M, N, A.size(-1),
              [&](int64_t m, int64_t n, int32_t v) { o[m * N + n] = static_cast<scalar_t>(epi(v, m, n)); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) {
  m.impl("int8_vectorwise_quant", &int8_vectorwise_quant_cpu);
  m.impl("int8_linear_matmul", &int8_linear_matmul_cpu);
  m.impl("int8_mm_dequant", &int8_mm_dequant_cpu);
  m.impl("int8_scaled_mm", &int8_scaled_mm_cpu);
}

}  // namespace nf4kit
