// CUDA kernel of dequantize_4bit (NF4 / FP4), bit for bit nf4kit/reference.py, with a nested
// (8-bit) absmax decoded in the same kernel.
//
// Layout: a warp takes tiles of 2048 elements. Inside a tile, lane i of segment s owns the 16 output
// bytes at s * 512 + 16 * i (8 halves or 4 floats): its packed codes are one 4- (2-) byte load and
// its output one 16-byte store, so consecutive lanes read and write consecutive memory and every
// warp store is one whole 512-byte run. All of a tile's code loads are issued before the first is
// used. The tile's absmax values (at most 64: blocksize >= 32) are decoded once, lane j holding block
// first + j (+ 32), and handed to the owning lanes with shuffles; nested absmax is decoded there
// (code8 from shared memory). Products are float32 code * absmax rounded once to the output dtype.
// One tile per warp (full_grid); the warps stride over the tiles only past the grid limit. All
// offsets are 64-bit.
#include <torch/library.h>

#include "common.cuh"
#include "dequantize_4bit.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = 2048;  // elements per warp per step (a multiple of every blocksize <= 2048)

// Per output dtype: the elements behind one 16-byte store, the packed bytes they come from, and the
// lane-units of a tile.
template <typename scalar_t>
struct Unit {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(scalar_t));  // 8 (16-bit) or 4 (float)
  static constexpr int kBytes = kElems / 2;                                // 4 or 2
  static constexpr int kSeg = 32 * kElems;                                 // elements per warp segment
  static constexpr int kUnits = static_cast<int>(kTile) / kSeg;            // 8 or 16 per lane
};

// A unit's packed bytes as a little-endian word: whole, or (the last tile) 0 past the stream's end.
template <int kBytes>
__device__ __forceinline__ uint32_t load_unit_codes(const uint8_t* __restrict__ packed, int64_t e0) {
  if constexpr (kBytes == 4) return __ldcs(reinterpret_cast<const unsigned int*>(packed + (e0 >> 1)));
  else return __ldcs(reinterpret_cast<const unsigned short*>(packed + (e0 >> 1)));
}
template <int kBytes>
__device__ __forceinline__ uint32_t load_unit_codes_tail(const uint8_t* __restrict__ packed, int64_t e0,
                                                         int64_t nbytes) {
  const int64_t b0 = e0 >> 1;
  if (b0 + kBytes <= nbytes) return load_unit_codes<kBytes>(packed, e0);
  uint32_t w = 0u;
#pragma unroll
  for (int b = 0; b < kBytes; ++b)
    if (b0 + b < nbytes) w |= uint32_t{packed[b0 + b]} << (8 * b);
  return w;
}

// The unit's values as float32 products code * scale (byte b: element 2b high nibble, 2b+1 low).
// The nibbles are pre-shifted to byte offsets (code * 4), so each table read is one LDS [R + base].
template <int kElems>
__device__ __forceinline__ void decode_unit(uint32_t w, float scale, const float* s_decode, float (&f)[kElems]) {
  const char* table = reinterpret_cast<const char*>(s_decode);
  const uint32_t hi4 = (w >> 2) & 0x3C3C3C3Cu, lo4 = (w << 2) & 0x3C3C3C3Cu;
#pragma unroll
  for (int b = 0; b < kElems / 2; ++b) {
    f[2 * b] = __fmul_rn(*reinterpret_cast<const float*>(table + __byte_perm(hi4, 0u, 0x4440u | b)), scale);
    f[2 * b + 1] = __fmul_rn(*reinterpret_cast<const float*>(table + __byte_perm(lo4, 0u, 0x4440u | b)), scale);
  }
}

// One warp's tile. kFull: every unit lies wholly before n (all tiles but the last), no bounds checks.
// kScales: absmax values per lane, 2 only for blocksize 32 (64 blocks per tile).
template <typename scalar_t, int kScales, bool kFull>
__device__ __forceinline__ void dequantize_tile(const uint8_t* __restrict__ packed, const AbsmaxSource& src,
                                                int64_t n, int log2_blocksize, const float* s_decode,
                                                const float* s_code8, float offset, int64_t t, int lane,
                                                scalar_t* __restrict__ out) {
  using U = Unit<scalar_t>;
  const int64_t tile0 = t * kTile + lane * U::kElems;  // this lane's first element
  const int64_t nbytes = (n + 1) / 2;
  uint32_t w[U::kUnits];
#pragma unroll
  for (int u = 0; u < U::kUnits; ++u)  // every code load of the tile before the first use
    w[u] = kFull ? load_unit_codes<U::kBytes>(packed, tile0 + u * U::kSeg)
                 : load_unit_codes_tail<U::kBytes>(packed, tile0 + u * U::kSeg, nbytes);

  const int64_t first = (t * kTile) >> log2_blocksize;
  const int64_t nblocks = ((n - 1) >> log2_blocksize) + 1;
  float s[kScales];
#pragma unroll
  for (int r = 0; r < kScales; ++r) {
    const int64_t j = first + lane + 32 * r;
    s[r] = j < nblocks ? src.get(j, s_code8, offset) : 0.0f;
  }

#pragma unroll
  for (int u = 0; u < U::kUnits; ++u) {
    const int64_t e0 = tile0 + u * U::kSeg;
    // The unit's block relative to the tile's first: a tile starts on a block boundary or (4096)
    // inside one block, so this is the block of the in-tile offset (< 64).
    const int idx = (u * U::kSeg + lane * U::kElems) >> log2_blocksize;
    float scale = __shfl_sync(0xffffffffu, s[0], idx & 31);
    if constexpr (kScales == 2) {
      const float s1 = __shfl_sync(0xffffffffu, s[1], idx & 31);
      scale = idx >= 32 ? s1 : scale;
    }
    float f[U::kElems];
    decode_unit<U::kElems>(w[u], scale, s_decode, f);
    if (kFull || e0 + U::kElems <= n) {
      store16(out + e0, pack16<scalar_t>(f));
    } else if (e0 < n) {
      using T = typename DType<scalar_t>::cuda_t;
      T* o = reinterpret_cast<T*>(out);
#pragma unroll
      for (int e = 0; e < U::kElems; ++e)
        if (e0 + e < n) o[e0 + e] = DType<scalar_t>::from_float(f[e]);
    }
  }
}

template <typename scalar_t, int kScales>
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

  const int lane = threadIdx.x & 31;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < ntiles; t += nwarps) {
    if ((t + 1) * kTile <= n)
      dequantize_tile<scalar_t, kScales, true>(packed, src, n, log2_blocksize, s_decode, s_code8, offset, t, lane, out);
    else
      dequantize_tile<scalar_t, kScales, false>(packed, src, n, log2_blocksize, s_decode, s_code8, offset, t, lane, out);
  }
}

}  // namespace

void dequantize_4bit_into(const Packed4bit& w, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = w.n;
  if (n == 0) return;
  TORCH_CHECK(out.is_contiguous() && out.numel() == n, "dequantize_4bit_into: out must be contiguous with ", n,
              " elements");
  at::Tensor packed = w.packed;
  if (!aligned16(packed.data_ptr())) packed = packed.clone();  // 16-byte loads need alignment
  AbsmaxSource src{};
  if (w.nested) {
    src.absmax_u8 = w.absmax.data_ptr<uint8_t>();
    src.nested_absmax = w.nested_absmax.data_ptr<float>();
    src.nested_code = w.nested_code.data_ptr<float>();
    src.offset = w.offset.data_ptr<float>();
    src.set_nested_blocksize(w.nested_blocksize);
  } else {
    src.absmax_f32 = w.absmax.data_ptr<float>();
  }
  const Code4Tables tables = make_code4_tables(w.qt);
  const int log2_bs = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  NF4KIT_CUDA_DISPATCH_FLOAT(out.scalar_type(), "dequantize_4bit_cuda", [&] {
    auto* kernel = w.blocksize == 32 ? &dequantize_4bit_kernel<scalar_t, 2> : &dequantize_4bit_kernel<scalar_t, 1>;
    const int64_t grid = full_grid(ceil_div(ceil_div(n, kTile), kWarps));
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(bytes, src, n, log2_bs, tables,
                                                                 out.data_ptr<scalar_t>());
    NF4KIT_LAUNCH_CHECK();
  });
}

namespace {

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& nested_absmax,
                                const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                                int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(packed.is_cuda(), "packed must be a CUDA tensor, got one on ", packed.device());
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t n = shape_numel(shape, "shape");
  const c10::cuda::CUDAGuard guard(packed.device());
  const Packed4bit w = check_packed_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                         nested_blocksize, quant_type, n, "shape " + dims_string(shape));
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  dequantize_4bit_into(w, out, c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) { m.impl("dequantize_4bit", &cuda::dequantize_4bit_cuda); }

}  // namespace nf4kit
