// CUDA kernel of dequantize_4bit (NF4 / FP4), bit for bit nf4kit/reference.py, with a nested
// (8-bit) absmax decoded in the same kernel.
//
// A warp owns 1024 consecutive elements per step, as rows of 16-byte output vectors: row r,
// lane i writes vector r * 32 + i (8 elements, or 4 for float32) and reads its 4 (or 2) packed
// bytes, so every load and store of the warp is one contiguous, fully used span. A vector never
// straddles a quant block (every blocksize is a multiple of 32), so it takes one absmax. All
// loads of a step are issued before the first store; a persistent grid strides over the rest.
// All offsets are 64-bit.
#include <torch/library.h>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 32;                         // elements per thread per step
constexpr int64_t kWarpSpan = 32 * kPerThread;         // 1024
constexpr int64_t kTile = kWarps * kWarpSpan;          // 8192

// E / 2 packed bytes of the vector starting at element e0 (E = 8 or 4), little-endian; bytes
// past the end read as 0.
template <int E>
__device__ __forceinline__ uint32_t load_codes(const uint8_t* __restrict__ packed, int64_t e0, int64_t nbytes) {
  const int64_t b0 = e0 / 2;
  if (b0 + E / 2 <= nbytes) {
    if constexpr (E == 8) {
      return __ldcs(reinterpret_cast<const unsigned int*>(packed + b0));
    } else {
      return __ldcs(reinterpret_cast<const unsigned short*>(packed + b0));
    }
  }
  uint32_t w = 0;
#pragma unroll
  for (int b = 0; b < E / 2; ++b)
    if (b0 + b < nbytes) w |= uint32_t{packed[b0 + b]} << (8 * b);
  return w;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, AbsmaxSource src, int64_t n, int log2_blocksize,
                           Code4Tables tables, scalar_t* __restrict__ out) {
  constexpr int E = kPerVec<scalar_t>;  // elements per 16-byte output vector
  constexpr int R = kPerThread / E;     // rows per warp step
  __shared__ float s_decode[16];
  __shared__ float s_code8[256];
  const bool nested = src.absmax_f32 == nullptr;
  if (threadIdx.x < 16) s_decode[threadIdx.x] = tables.decode[threadIdx.x];
  if (nested)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_code8[i] = __ldg(src.nested_code + i);
  const float offset = nested ? __ldg(src.offset) : 0.0f;
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const int64_t nbytes = (n + 1) / 2;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t wbase = tile * kTile + warp * kWarpSpan;
    uint32_t codes[R];
    float scale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // every load of the step first
      const int64_t e0 = wbase + static_cast<int64_t>(r * 32 + lane) * E;
      if (e0 < n) {
        codes[r] = load_codes<E>(packed, e0, nbytes);
        scale[r] = src.get(e0 >> log2_blocksize, s_code8, offset);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t e0 = wbase + static_cast<int64_t>(r * 32 + lane) * E;
      if (e0 >= n) continue;
      float v[E];
#pragma unroll
      for (int j = 0; j < E; ++j)  // element j: byte j / 2, high nibble for even j
        v[j] = __fmul_rn(s_decode[(codes[r] >> (8 * (j / 2) + ((j & 1) ? 0 : 4))) & 15u], scale[r]);
      if (e0 + E <= n) {
        store16_stream(out + e0, pack16<scalar_t>(v));
      } else {
        using T = typename DType<scalar_t>::cuda_t;
        T* o = reinterpret_cast<T*>(out);
#pragma unroll
        for (int j = 0; j < E; ++j)
          if (e0 + j < n) o[e0 + j] = DType<scalar_t>::from_float(v[j]);
      }
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
    const int64_t grid = resident_grid(kernel, kThreads, ceil_div(n, kTile));
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
