// CUDA kernel of dequantize_4bit (NF4 / FP4), bit for bit nf4kit/reference.py, with a nested
// (8-bit) absmax decoded in the same kernel.
//
// Each thread owns chunks of 32 elements: one 16-byte load of packed codes, one absmax (every
// blocksize is a multiple of 32, so a chunk never straddles blocks), 64 or 128 bytes written as
// 16-byte stores. Two chunks per thread per step keep more loads in flight; a persistent grid
// strides over the rest. All offsets are 64-bit.
#include <torch/library.h>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 32;   // elements per chunk (16 packed bytes)
constexpr int kUnroll = 2;   // chunks per thread per step

// The thread's 16 packed bytes as four little-endian words; past the end of the stream, 0.
__device__ __forceinline__ uint4 load_codes(const uint8_t* __restrict__ packed, int64_t base, int64_t nbytes) {
  const int64_t b0 = base / 2;
  if (b0 + kChunk / 2 <= nbytes) return load16_stream(packed + b0);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < kChunk / 2; ++b)
    if (b0 + b < nbytes) w[b / 4] |= uint32_t{packed[b0 + b]} << (8 * (b & 3));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Element e (0..31) of the chunk: byte e/2, high nibble for even e.
__device__ __forceinline__ uint32_t nibble(const uint32_t (&w)[4], int e) {
  return (w[e / 8] >> (8 * ((e / 2) & 3) + ((e & 1) ? 0 : 4))) & 15u;
}

template <typename scalar_t>
__device__ __forceinline__ void write_chunk(scalar_t* __restrict__ out, int64_t base, int64_t n, uint4 codes,
                                            float scale, const float* s_decode) {
  constexpr int kPer = kPerVec<scalar_t>;
  const uint32_t w[4] = {codes.x, codes.y, codes.z, codes.w};
  if (base + kChunk <= n) {
#pragma unroll
    for (int v = 0; v < kChunk / kPer; ++v) {
      float f[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) f[j] = __fmul_rn(s_decode[nibble(w, v * kPer + j)], scale);
      store16_stream(out + base + v * kPer, pack16<scalar_t>(f));
    }
  } else {
    using T = typename DType<scalar_t>::cuda_t;
    T* o = reinterpret_cast<T*>(out);
#pragma unroll
    for (int e = 0; e < kChunk; ++e)
      if (base + e < n) o[base + e] = DType<scalar_t>::from_float(__fmul_rn(s_decode[nibble(w, e)], scale));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, AbsmaxSource src, int64_t n, int log2_blocksize,
                           Code4Tables tables, scalar_t* __restrict__ out) {
  __shared__ float s_decode[16];
  __shared__ float s_code8[256];
  const bool nested = src.absmax_f32 == nullptr;
  if (threadIdx.x < 16) s_decode[threadIdx.x] = tables.decode[threadIdx.x];
  if (nested)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_code8[i] = __ldg(src.nested_code + i);
  const float offset = nested ? __ldg(src.offset) : 0.0f;
  __syncthreads();

  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int64_t nbytes = (n + 1) / 2;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; c0 < nchunks;
       c0 += step) {
    uint4 codes[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the step first
      const int64_t c = c0 + u * kThreads;
      if (c < nchunks) {
        codes[u] = load_codes(packed, c * kChunk, nbytes);
        scale[u] = src.get((c * kChunk) >> log2_blocksize, s_code8, offset);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kThreads;
      if (c < nchunks) write_chunk(out, c * kChunk, n, codes[u], scale[u], s_decode);
    }
  }
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                                int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(packed.is_cuda(), "packed must be a CUDA tensor, got one on ", packed.device());
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t n = shape_numel(shape, "shape");
  const c10::cuda::CUDAGuard guard(packed.device());
  Packed4bit w = check_packed_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                   quant_type, n, shape_string(shape));
  if (!aligned16(w.packed.data_ptr())) w.packed = w.packed.clone();  // 16-byte loads need alignment

  AbsmaxSource src{};
  if (w.nested) {
    src.absmax_u8 = w.absmax.data_ptr<uint8_t>();
    src.nested_absmax = w.nested_absmax.data_ptr<float>();
    src.nested_code = w.nested_code.data_ptr<float>();
    src.offset = w.offset.data_ptr<float>();
    src.set_nested_blocksize(nested_blocksize);
  } else {
    src.absmax_f32 = w.absmax.data_ptr<float>();
  }

  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  const Code4Tables tables = make_code4_tables(w.qt);
  const int log2_bs = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const uint8_t* bytes = w.packed.data_ptr<uint8_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NF4KIT_CUDA_DISPATCH_FLOAT(dtype, "dequantize_4bit_cuda", [&] {
    auto* kernel = &dequantize_4bit_kernel<scalar_t>;
    const int64_t grid = resident_grid(kernel, kThreads, ceil_div(ceil_div(n, kChunk), kThreads * kUnroll));
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(bytes, src, n, log2_bs, tables,
                                                                 out.data_ptr<scalar_t>());
    NF4KIT_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) { m.impl("dequantize_4bit", &cuda::dequantize_4bit_cuda); }

}  // namespace nf4kit
