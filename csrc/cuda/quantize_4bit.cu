// CUDA kernel of quantize_4bit (NF4 / FP4), bit for bit nf4kit/reference.py.
//
// One pass over the input: each thread owns 32 consecutive elements (two to four 16-byte loads,
// one 16-byte store of packed codes). The BS / 32 threads of a quant block reduce its absmax with
// warp shuffles (through shared memory when a block spans warps), then every thread scales,
// buckets and packs its own 32 elements. A persistent grid strides over tiles of 8192 elements;
// all offsets are 64-bit.
#include <torch/library.h>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 32;                                   // elements per thread per tile
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kChunk;  // 8192 >= every blocksize
constexpr int kWarps = kThreads / 32;

// The thread's 32 elements as float32: 16-byte loads for a whole chunk, element loads (zeros
// past n) for the one chunk that straddles the end.
template <typename scalar_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ x, int64_t base, int64_t n,
                                           float (&f)[kChunk]) {
  using T = typename DType<scalar_t>::cuda_t;
  constexpr int kVecs = kChunk / kPerVec<scalar_t>;
  if (base + kChunk <= n) {
    uint4 v[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) v[k] = load16_stream(x + base + k * kPerVec<scalar_t>);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) unpack16<scalar_t>(v[k], f + k * kPerVec<scalar_t>);
  } else {
    const T* xt = reinterpret_cast<const T*>(x);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) f[k] = base + k < n ? DType<scalar_t>::to_float(xt[base + k]) : 0.0f;
  }
}

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
  __shared__ float s_mids[16];
  __shared__ uint32_t s_order[16];
  __shared__ float s_red[2][kWarps];
  if (threadIdx.x < 16) {
    s_mids[threadIdx.x] = threadIdx.x < 15 ? tables.mids[threadIdx.x] : 0.0f;  // [15] never read
    s_order[threadIdx.x] = tables.order[threadIdx.x];
  }
  __syncthreads();

  const int64_t blocksize = int64_t{1} << log2_blocksize;
  const int group = static_cast<int>(blocksize / kChunk);  // threads per quant block: 1..128
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const int64_t nbytes = (n + 1) / 2;
  int parity = 0;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t base = tile * kTile + static_cast<int64_t>(threadIdx.x) * kChunk;
    float f[kChunk];
    load_chunk(x, base, n, f);

    // absmax of the quant block: this thread's part, then across the group (NaN wins).
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) m = max_nan(m, fabsf(f[k]));
    for (int o = 1; o < group && o < 32; o <<= 1) m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (group > 32) {  // 2048 / 4096: the block spans group / 32 warps
      if (lane == 0) s_red[parity][warp] = m;
      __syncthreads();
      const int wpg = group / 32, w0 = warp & ~(wpg - 1);
      m = s_red[parity][w0];
      for (int j = 1; j < wpg; ++j) m = max_nan(m, s_red[parity][w0 + j]);
      parity ^= 1;  // the next tile writes the other half: one barrier per tile suffices
    }
    if (base >= n) continue;  // wholly past the end (no barrier follows in this tile)

    const int64_t block = base >> log2_blocksize;
    const bool partial = (block + 1) * blocksize > n;  // only the last block can be partial
    // Full block: multiply by float32(1 / max(absmax, 1e-38)), keep absmax. Partial block:
    // divide by max(absmax, 1e-38) and store that. (No clamp to [-1, 1]: |y| exceeds 1 by at
    // most an ulp, and every midpoint lies strictly inside (-1, 1), so the bucket is the same.)
    const float clamped = clamp_min_nan(m, kTinyAbsmax);
    if ((threadIdx.x & (group - 1)) == 0) absmax[block] = partial ? clamped : m;

    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (!partial) {
      const float recip = __frcp_rn(clamped);
#pragma unroll
      for (int k = 0; k < kChunk; k += 2) {
        const uint32_t byte = (code_of<QT>(__fmul_rn(f[k], recip), tables, s_mids, s_order) << 4) |
                              code_of<QT>(__fmul_rn(f[k + 1], recip), tables, s_mids, s_order);
        w[k / 8] |= byte << (8 * ((k / 2) & 3));
      }
    } else {
#pragma unroll
      for (int k = 0; k < kChunk; k += 2) {
        // Past the end the value is 0.0 (an odd count's trailing low nibble holds 0's code).
        const float y0 = base + k < n ? __fdiv_rn(f[k], clamped) : 0.0f;
        const float y1 = base + k + 1 < n ? __fdiv_rn(f[k + 1], clamped) : 0.0f;
        const uint32_t byte = (code_of<QT>(y0, tables, s_mids, s_order) << 4) | code_of<QT>(y1, tables, s_mids, s_order);
        w[k / 8] |= byte << (8 * ((k / 2) & 3));
      }
    }
    const int64_t out = base / 2;
    if (out + kChunk / 2 <= nbytes) {
      store16_stream(packed + out, make_uint4(w[0], w[1], w[2], w[3]));
    } else {
#pragma unroll
      for (int b = 0; b < kChunk / 2; ++b)
        if (out + b < nbytes) packed[out + b] = static_cast<uint8_t>(w[b / 4] >> (8 * (b & 3)));
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
