// CUDA kernels of the blockwise 8-bit ops, bit for bit nf4kit/reference.py: quantize_blockwise,
// dequantize_blockwise, and quantize_nested_absmax (= quantize_blockwise(absmax - offset), the
// second level of a nested 4-bit quantization, fused so absmax - offset never goes to memory).
//
// Quantizing snaps each scaled value to a 65536-point grid and looks the grid point up in a
// nearest-code table; the table (64 KB) is built on the device per call by a small kernel
// (65536 threads, one binary search each), so no host copy of the code and no cache to go stale.
// One warp quantizes one block: float32 input with blocksize 64..1024 (the nested absmax) in one
// pass from registers, anything else in two passes (the second from L1/L2).
#include <torch/library.h>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGridPoints = 65536;
constexpr int kDeqChunk = 16;  // dequantize: elements (bytes) per thread per step, one 16-byte load

// lut[i]: index of the code value nearest to grid point i (nearest_code_index, common.h).
__global__ void __launch_bounds__(kThreads) build_lut_kernel(const float* __restrict__ code, uint8_t* __restrict__ lut) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = __ldg(code + threadIdx.x);  // kThreads == 256
  __syncthreads();
  const int i = blockIdx.x * kThreads + threadIdx.x;
  lut[i] = nearest_code_index(i, s_code);
}

// The code of one value of a block: (x - offset) scaled by float32(1 / absmax) (inf for an
// all-zero block, so 0 * inf = NaN -> grid point 0), clamped, snapped to the grid, looked up.
__device__ __forceinline__ int grid_point(float x, float offset, float recip) {
  const float v = clamp_nan(__fmul_rn(__fsub_rn(x, offset), recip), -1.0f, 1.0f);
  const float t = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f);
  return t != t ? 0 : __float2int_rz(t);
}

// Any dtype and blocksize: one warp per block, absmax of (x - offset) (NaN wins), then the codes
// (two passes, the second from L1/L2). offset is null for plain quantize_blockwise.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    quantize_blockwise_kernel(const scalar_t* __restrict__ x_, int64_t n, int64_t blocksize,
                              const float* __restrict__ offset_ptr, const uint8_t* __restrict__ lut,
                              uint8_t* __restrict__ q, float* __restrict__ absmax) {
  using T = typename DType<scalar_t>::cuda_t;
  const T* x = reinterpret_cast<const T*>(x_);
  // x - 0.0f is x for every float (-0.0 included), so plain quantization subtracts 0.
  const float offset = offset_ptr != nullptr ? __ldg(offset_ptr) : 0.0f;
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; b < nblocks; b += nwarps) {
    const int64_t start = b * blocksize;
    const int64_t len = n - start < blocksize ? n - start : blocksize;
    float m = 0.0f;
#pragma unroll 4
    for (int64_t i = lane; i < len; i += 32)
      m = max_nan(m, fabsf(__fsub_rn(DType<scalar_t>::to_float(x[start + i]), offset)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) absmax[b] = m;
    const float recip = __frcp_rn(m);
#pragma unroll 4
    for (int64_t i = lane; i < len; i += 32)
      q[start + i] = __ldg(lut + grid_point(DType<scalar_t>::to_float(x[start + i]), offset, recip));
  }
}

// float32 input, blocksize 32 * kPer (64 .. 1024; the nested absmax uses 256): one warp per block,
// one pass, lane i holding elements kPer * i .. kPer * i + kPer - 1 in registers (vector loads,
// one kPer-byte store). The same arithmetic as quantize_blockwise_kernel, but the nearest-code
// table is copied into shared memory first: its lookups are gathers over 64 KB, which L1 serves at
// about a lane per cycle (the nested absmax of an 8192 x 28672 weight on the H200: 9.8 us with the
// table in L1, 8.0 us in shared memory).
constexpr int kF32Threads = 512;
template <int kPer>
__global__ void __launch_bounds__(kF32Threads)
    quantize_blockwise_f32_kernel(const float* __restrict__ x, int64_t n, const float* __restrict__ offset_ptr,
                                  const uint8_t* __restrict__ lut_, uint8_t* __restrict__ q, float* __restrict__ absmax) {
  extern __shared__ uint4 lut_smem[];  // kGridPoints bytes
  for (int i = threadIdx.x; i < kGridPoints / 16; i += kF32Threads) lut_smem[i] = __ldg(reinterpret_cast<const uint4*>(lut_) + i);
  __syncthreads();
  const uint8_t* lut = reinterpret_cast<const uint8_t*>(lut_smem);
  constexpr int64_t kBlock = 32 * kPer;
  constexpr int kWords = kPer / 4 > 0 ? kPer / 4 : 1;
  const float offset = offset_ptr != nullptr ? __ldg(offset_ptr) : 0.0f;
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (kF32Threads / 32);
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * kF32Threads + threadIdx.x) / 32; b < nblocks; b += nwarps) {
    const int64_t e0 = b * kBlock + lane * kPer;
    const bool whole = e0 + kPer <= n;
    float v[kPer];
    if (whole) {
      if constexpr (kPer == 2) {
        const float2 t = __ldg(reinterpret_cast<const float2*>(x + e0));
        v[0] = t.x, v[1] = t.y;
      } else {
#pragma unroll
        for (int k = 0; k < kPer; k += 4) {
          const float4 t = __ldg(reinterpret_cast<const float4*>(x + e0 + k));
          v[k] = t.x, v[k + 1] = t.y, v[k + 2] = t.z, v[k + 3] = t.w;
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[k] = e0 + k < n ? __ldg(x + e0 + k) : 0.0f;
    }
    float m = 0.0f;  // over the block's elements only (past n nothing counts, whatever the offset)
#pragma unroll
    for (int k = 0; k < kPer; ++k)
      if (whole || e0 + k < n) m = max_nan(m, fabsf(__fsub_rn(v[k], offset)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) absmax[b] = m;
    const float recip = __frcp_rn(m);
    uint32_t w[kWords] = {};
#pragma unroll
    for (int k = 0; k < kPer; ++k) w[k / 4] |= uint32_t{lut[grid_point(v[k], offset, recip)]} << (8 * (k & 3));
    if (whole) {
      if constexpr (kPer == 2) *reinterpret_cast<uint16_t*>(q + e0) = static_cast<uint16_t>(w[0]);
      else if constexpr (kPer == 4) *reinterpret_cast<uint32_t*>(q + e0) = w[0];
      else if constexpr (kPer == 8) *reinterpret_cast<uint2*>(q + e0) = make_uint2(w[0], w[1]);
      else {
#pragma unroll
        for (int k = 0; k < kWords; k += 4) *reinterpret_cast<uint4*>(q + e0 + 4 * k) = make_uint4(w[k], w[k + 1], w[k + 2], w[k + 3]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        if (e0 + k < n) q[e0 + k] = static_cast<uint8_t>(w[k / 4] >> (8 * (k & 3)));
    }
  }
}

// out = dtype(code[q] * absmax[i / blocksize]); 16 codes per thread per step (any blocksize:
// the block index advances as the element index crosses a block boundary).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_blockwise_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                const float* __restrict__ code, int64_t n, int64_t blocksize, int log2_blocksize,
                                scalar_t* __restrict__ out) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = __ldg(code + threadIdx.x);  // kThreads == 256
  __syncthreads();
  constexpr int kPer = kPerVec<scalar_t>;
  const int64_t nchunks = (n + kDeqChunk - 1) / kDeqChunk;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < nchunks;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t base = c * kDeqChunk;
    const bool whole = base + kDeqChunk <= n;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (whole) {
      const uint4 v = load16_stream(q + base);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else {
#pragma unroll
      for (int e = 0; e < kDeqChunk; ++e)
        if (base + e < n) w[e / 4] |= uint32_t{q[base + e]} << (8 * (e & 3));
    }
    int64_t blk = log2_blocksize >= 0 ? base >> log2_blocksize : base / blocksize;
    int64_t next = (blk + 1) * blocksize;
    float scale = __ldg(absmax + blk);
    float f[kDeqChunk];
#pragma unroll
    for (int e = 0; e < kDeqChunk; ++e) {
      if (base + e == next && base + e < n) {  // crossed into the next block
        ++blk;
        next += blocksize;
        scale = __ldg(absmax + blk);
      }
      f[e] = __fmul_rn(s_code[(w[e / 4] >> (8 * (e & 3))) & 0xFFu], scale);
    }
    if (whole) {
#pragma unroll
      for (int k = 0; k < kDeqChunk / kPer; ++k) store16(out + base + k * kPer, pack16<scalar_t>(f + k * kPer));
    } else {
      using T = typename DType<scalar_t>::cuda_t;
      T* o = reinterpret_cast<T*>(out);
#pragma unroll
      for (int e = 0; e < kDeqChunk; ++e)
        if (base + e < n) o[base + e] = DType<scalar_t>::from_float(f[e]);
    }
  }
}

void check_code(const at::Tensor& code, const at::Device& dev) {
  check_device(code, dev, "code");
  check_dtype(code, at::kFloat, "code");
  check_numel(code, 256, "code", "the 8-bit code has 256 values");
}

// Shared by quantize_blockwise and quantize_nested_absmax (offset: null or a float32 scalar).
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_impl(const at::Tensor& A_, const float* offset,
                                                           const at::Tensor& code_, int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(A_.device());
  const at::Tensor A = A_.contiguous();
  const at::Tensor code = code_.contiguous();
  const int64_t n = A.numel();
  at::Tensor q = new_output(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  at::Tensor lut = at::empty({kGridPoints}, A.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  build_lut_kernel<<<kGridPoints / kThreads, kThreads, 0, stream>>>(code.data_ptr<float>(), lut.data_ptr<uint8_t>());
  NF4KIT_LAUNCH_CHECK();
  const int64_t nwarps = ceil_div(ceil_div(n, blocksize), kWarps);
  if (A.scalar_type() == at::kFloat && aligned16(A.data_ptr()) && blocksize >= 64 && blocksize <= 1024 &&
      (blocksize & (blocksize - 1)) == 0) {
    auto* kernel = blocksize == 64    ? &quantize_blockwise_f32_kernel<2>
                   : blocksize == 128 ? &quantize_blockwise_f32_kernel<4>
                   : blocksize == 256 ? &quantize_blockwise_f32_kernel<8>
                   : blocksize == 512 ? &quantize_blockwise_f32_kernel<16>
                                      : &quantize_blockwise_f32_kernel<32>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kGridPoints));
    int per_sm = 0;  // resident CTAs only: each pays a 64 KB table copy
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kF32Threads, kGridPoints));
    const int64_t grid = persistent_grid(ceil_div(ceil_div(n, blocksize), kF32Threads / 32), std::max(per_sm, 1));
    kernel<<<static_cast<unsigned>(grid), kF32Threads, kGridPoints, stream>>>(
        A.data_ptr<float>(), n, offset, lut.data_ptr<uint8_t>(), q.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    NF4KIT_LAUNCH_CHECK();
    return {q, absmax};
  }
  NF4KIT_CUDA_DISPATCH_FLOAT(A.scalar_type(), "quantize_blockwise_cuda", [&] {
    auto* kernel = &quantize_blockwise_kernel<scalar_t>;
    const int64_t grid = resident_grid(kernel, kThreads, nwarps);
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(A.data_ptr<scalar_t>(), n, blocksize, offset,
                                                                 lut.data_ptr<uint8_t>(), q.data_ptr<uint8_t>(),
                                                                 absmax.data_ptr<float>());
    NF4KIT_LAUNCH_CHECK();
  });
  return {q, absmax};
}

void check_quantize_args(const at::Tensor& A, const at::Tensor& code, int64_t blocksize, const char* name) {
  TORCH_CHECK_VALUE(A.is_cuda(), name, " must be a CUDA tensor, got one on ", A.device());
  check_float_input(A, name);
  TORCH_CHECK_VALUE(A.numel() > 0, name, " must not be empty, got shape ", A.sizes());
  TORCH_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  check_code(code, A.device());
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                           int64_t blocksize) {
  check_quantize_args(A, code, blocksize, "A");
  return quantize_blockwise_impl(A, nullptr, code, blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_nested_absmax_cuda(const at::Tensor& absmax, const at::Tensor& offset,
                                                               const at::Tensor& code, int64_t blocksize) {
  check_quantize_args(absmax, code, blocksize, "absmax");
  check_dtype(absmax, at::kFloat, "absmax");
  check_device(offset, absmax.device(), "offset");
  check_dtype(offset, at::kFloat, "offset");
  check_numel(offset, 1, "offset", "a scalar: the mean of absmax");
  const at::Tensor off = offset.contiguous();
  return quantize_blockwise_impl(absmax, off.data_ptr<float>(), code, blocksize);
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A_, const at::Tensor& absmax_, const at::Tensor& code_,
                                     int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(A_.is_cuda(), "A must be a CUDA tensor, got one on ", A_.device());
  check_dtype(A_, at::kByte, "A");
  TORCH_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  check_device(absmax_, A_.device(), "absmax");
  check_dtype(absmax_, at::kFloat, "absmax");
  const int64_t n = A_.numel();
  check_numel(absmax_, ceil_div(n, blocksize), "absmax", "one per block of blocksize in A");
  check_code(code_, A_.device());
  const c10::cuda::CUDAGuard guard(A_.device());
  at::Tensor A = A_.contiguous();
  if (!aligned16(A.data_ptr())) A = A.clone();  // 16-byte loads need alignment
  const at::Tensor absmax = absmax_.contiguous();
  const at::Tensor code = code_.contiguous();
  at::Tensor out = new_output(A.sizes(), A.options().dtype(dtype));
  if (n == 0) return out;
  const int log2_bs = (blocksize & (blocksize - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(blocksize)) : -1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NF4KIT_CUDA_DISPATCH_FLOAT(dtype, "dequantize_blockwise_cuda", [&] {
    auto* kernel = &dequantize_blockwise_kernel<scalar_t>;
    const int64_t grid = full_grid(ceil_div(ceil_div(n, kDeqChunk), kThreads));
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(A.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                                 code.data_ptr<float>(), n, blocksize, log2_bs,
                                                                 out.data_ptr<scalar_t>());
    NF4KIT_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) {
  m.impl("quantize_blockwise", &cuda::quantize_blockwise_cuda);
  m.impl("quantize_nested_absmax", &cuda::quantize_nested_absmax_cuda);
  m.impl("dequantize_blockwise", &cuda::dequantize_blockwise_cuda);
}

}  // namespace nf4kit
