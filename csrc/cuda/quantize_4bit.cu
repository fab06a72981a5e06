// CUDA kernel of quantize_4bit (NF4 / FP4), bit for bit nf4kit/reference.py.
//
// One pass over the input. A warp owns 1024 consecutive elements per step, as rows of 16-byte
// vectors: row r, lane i holds vector r * 32 + i, so every load (16 B per lane) and every store
// (4 or 2 B of codes per lane) of the warp is one contiguous, fully used span. The absmax of a
// quant block is reduced across the lanes (and rows, and warps through shared memory) that hold
// it; then every lane scales, buckets and packs its own vectors. A persistent grid strides over
// tiles of 8192 elements; all offsets are 64-bit.
#include <torch/library.h>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 32;                                              // elements per thread per tile
constexpr int64_t kWarpSpan = 32 * kPerThread;                              // 1024
constexpr int64_t kTile = kWarps * kWarpSpan;                               // 8192 >= every blocksize

// Code index of a scaled value: binary search for the number of midpoints y is not <= to
// (= bucket15 for sorted midpoints; NaN -> 15), then the code at that sorted position. The first
// two steps compare with kernel-parameter constants (constant bank, no memory traffic); the
// last two read shared memory (conflict-free: at most 16 distinct words). NF4's order is the
// identity; FP4 reads its order table.
template <QuantType QT>
__device__ __forceinline__ uint32_t code_of(float y, const Code4Tables& t, const float* s_mids,
                                            const uint32_t* s_order) {
  const bool hi = !(y <= t.mids[7]);
  int i = hi ? 8 : 0;
  i += !(y <= (hi ? t.mids[11] : t.mids[3])) ? 4 : 0;
  i += !(y <= s_mids[i + 1]) ? 2 : 0;
  i += !(y <= s_mids[i]) ? 1 : 0;
  return QT == QuantType::NF4 ? static_cast<uint32_t>(i) : s_order[i];
}

template <typename scalar_t, QuantType QT>
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const scalar_t* __restrict__ x, int64_t n, int log2_blocksize, Code4Tables tables,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  using T = typename DType<scalar_t>::cuda_t;
  constexpr int E = kPerVec<scalar_t>;  // elements per 16-byte vector: 8, or 4 for float32
  constexpr int R = kPerThread / E;     // rows per warp step: 4, or 8 for float32
  __shared__ float s_mids[16];
  __shared__ uint32_t s_order[16];
  __shared__ float s_red[2][kWarps];
  if (threadIdx.x < 16) {
    s_mids[threadIdx.x] = threadIdx.x < 15 ? tables.mids[threadIdx.x] : 0.0f;  // [15] never read
    s_order[threadIdx.x] = tables.order[threadIdx.x];
  }
  __syncthreads();

  const int64_t blocksize = int64_t{1} << log2_blocksize;
  const int lanes = static_cast<int>(blocksize / E);  // lanes of one row per block (may exceed 32)
  const int rows = lanes / 32;                         // rows per block when a block spans rows
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const int64_t nbytes = (n + 1) / 2;
  int parity = 0;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t wbase = tile * kTile + warp * kWarpSpan;
    float f[R][E];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // every load of the step first
      const int64_t e0 = wbase + static_cast<int64_t>(r * 32 + lane) * E;
      if (e0 + E <= n) {
        unpack16<scalar_t>(load16_stream(x + e0), f[r]);
      } else {
        const T* xt = reinterpret_cast<const T*>(x);
#pragma unroll
        for (int j = 0; j < E; ++j) f[r][j] = e0 + j < n ? DType<scalar_t>::to_float(xt[e0 + j]) : 0.0f;
      }
    }

    // absmax of each quant block (NaN wins): per vector, across the lanes of a row, across rows,
    // across warps.
    float m[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r] = 0.0f;
#pragma unroll
      for (int j = 0; j < E; ++j) m[r] = max_nan(m[r], fabsf(f[r][j]));
    }
    for (int o = 1; o < lanes && o < 32; o <<= 1) {
#pragma unroll
      for (int r = 0; r < R; ++r) m[r] = max_nan(m[r], __shfl_xor_sync(0xffffffffu, m[r], o));
    }
#pragma unroll
    for (int s = 1; s < R; s <<= 1) {  // a block spanning `rows` rows of this warp
      if (s < rows) {
        float t[R];
#pragma unroll
        for (int r = 0; r < R; ++r) t[r] = max_nan(m[r], m[r ^ s]);
#pragma unroll
        for (int r = 0; r < R; ++r) m[r] = t[r];
      }
    }
    if (rows > R) {  // a block spanning rows / R warps (blocksize 2048 / 4096)
      if (lane == 0) s_red[parity][warp] = m[0];  // all rows hold the warp's max now
      __syncthreads();
      const int wpb = rows / R, w0 = warp & ~(wpb - 1);
      float mw = s_red[parity][w0];
      for (int j = 1; j < wpb; ++j) mw = max_nan(mw, s_red[parity][w0 + j]);
#pragma unroll
      for (int r = 0; r < R; ++r) m[r] = mw;
      parity ^= 1;  // the next tile writes the other half: one barrier per tile suffices
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t e0 = wbase + static_cast<int64_t>(r * 32 + lane) * E;
      if (e0 >= n) continue;
      const int64_t block = e0 >> log2_blocksize;
      const bool partial = (block + 1) * blocksize > n;  // only the last block can be partial
      // Full block: multiply by float32(1 / max(absmax, 1e-38)), keep absmax. Partial block:
      // divide by max(absmax, 1e-38) and store that. (No clamp to [-1, 1]: |y| exceeds 1 by at
      // most an ulp, and every midpoint lies strictly inside (-1, 1), so the bucket is the same.)
      const float clamped = clamp_min_nan(m[r], kTinyAbsmax);
      if ((e0 & (blocksize - 1)) == 0) absmax[block] = partial ? clamped : m[r];
      uint32_t w = 0;
      if (!partial) {
        const float recip = __frcp_rn(clamped);
#pragma unroll
        for (int j = 0; j < E; j += 2)
          w |= ((code_of<QT>(__fmul_rn(f[r][j], recip), tables, s_mids, s_order) << 4) |
                code_of<QT>(__fmul_rn(f[r][j + 1], recip), tables, s_mids, s_order))
               << (4 * j);
      } else {
#pragma unroll
        for (int j = 0; j < E; j += 2) {
          // Past the end the value is 0.0 (an odd count's trailing low nibble holds 0's code).
          const float y0 = e0 + j < n ? __fdiv_rn(f[r][j], clamped) : 0.0f;
          const float y1 = e0 + j + 1 < n ? __fdiv_rn(f[r][j + 1], clamped) : 0.0f;
          w |= ((code_of<QT>(y0, tables, s_mids, s_order) << 4) | code_of<QT>(y1, tables, s_mids, s_order))
               << (4 * j);
        }
      }
      const int64_t b0 = e0 / 2;
      if (b0 + E / 2 <= nbytes) {
        if constexpr (E == 8) {
          __stcs(reinterpret_cast<unsigned int*>(packed + b0), w);
        } else {
          __stcs(reinterpret_cast<unsigned short*>(packed + b0), static_cast<unsigned short>(w));
        }
      } else {
#pragma unroll
        for (int b = 0; b < E / 2; ++b)
          if (b0 + b < nbytes) packed[b0 + b] = static_cast<uint8_t>(w >> (8 * b));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A_, int64_t blocksize,
                                                      c10::string_view quant_type) {
  TORCH_CHECK_VALUE(A_.is_cuda(), "A must be a CUDA tensor, got one on ", A_.device());
  check_float_input(A_, "A");
  TORCH_CHECK_VALUE(A_.numel() > 0, "A must not be empty, got shape ", A_.sizes());
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const c10::cuda::CUDAGuard guard(A_.device());
  at::Tensor A = A_.contiguous();
  if (!aligned16(A.data_ptr())) A = A.clone();  // a view at an odd offset: 16-byte loads need alignment
  const int64_t n = A.numel();
  at::Tensor packed = new_output({(n + 1) / 2}, A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  const int log2_bs = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const Code4Tables tables = make_code4_tables(qt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NF4KIT_CUDA_DISPATCH_FLOAT(A.scalar_type(), "quantize_4bit_cuda", [&] {
    auto* kernel = qt == QuantType::NF4 ? &quantize_4bit_kernel<scalar_t, QuantType::NF4>
                                        : &quantize_4bit_kernel<scalar_t, QuantType::FP4>;
    const int64_t grid = resident_grid(kernel, kThreads, ceil_div(n, kTile));
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        A.data_ptr<scalar_t>(), n, log2_bs, tables, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    NF4KIT_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) { m.impl("quantize_4bit", &cuda::quantize_4bit_cuda); }

}  // namespace nf4kit
