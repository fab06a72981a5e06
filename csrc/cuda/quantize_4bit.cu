// CUDA kernel of quantize_4bit (NF4 / FP4), bit for bit nf4kit/reference.py.
//
// Layout: a warp takes items of 1024 elements (blocksize <= 1024) or one quant block (2048 / 4096).
// An item is read in chunks of 4 segments of 256 elements; lane i of a segment owns elements
// 8i .. 8i+7 (one 16-byte load for 16-bit inputs, two for float32) and writes their 4 packed bytes as
// one 32-bit word, so a warp's loads and stores are contiguous runs. All four loads of a chunk are
// issued before the first is used. absmax: per lane, then across the lanes (and segments) of the
// block with xor shuffles; an item of one large block reads its chunks twice (max, then quantize; the
// second read mostly hits L2).
//
// Bucketing (NF4, finite blocks): y = x * (1 / absmax) (or x / absmax in a partial last block) is
// mapped by a monotone cell function c(y) = floor(round(61 y + 64) / 4), read off the mantissa bits 2..6
// of fma(y, 61, 1.5 * 2^23 + 64) (already the byte offset 4c), in 0..31 for |y| <= 1 + 2^-23. Each
// cell holds at most one NF4 midpoint (they lie > 0.079 apart, cells are 4 / 61 wide), so
// bucket(y) = base[c] + (y > mid[c]), base[c] = the midpoints in lower cells: two
// conflict-free shared-memory reads (32-word tables) and one compare. Monotonicity makes this exact:
// a midpoint in a lower cell is below y, one in a higher cell above it. NaN / inf blocks and FP4 (whose
// midpoints near 0 are closer than a cell) take the binary search of the midpoints.
// Chunk items: a resident grid of warps strides over them, each warp loading its next item before it
// quantizes the current one. Large-block items: one per warp (full_grid). All offsets are 64-bit.
// A block whose absmax is NaN or inf sets the caller's `nonfinite` flag (functional.quantize_4bit's
// NaN check reads it from pinned host memory, so the check queues nothing on the stream).
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnit = 8;                        // elements per lane per segment
constexpr int kSeg = 32 * kUnit;                // 256 elements per segment
constexpr int kSegs = 4;                        // segments per chunk
constexpr int64_t kChunk = kSeg * kSegs;        // 1024 elements per chunk

// The NF4 cell tables (see the header comment), built on the host from the midpoints.
constexpr float kCellScale = 61.0f;
constexpr float kCellBias = 12582976.0f;  // 1.5 * 2^23 + 64: the sum's low mantissa bits are round(61 y + 64)
struct CellTables {
  float mid[32];      // the midpoint in the cell, or +inf
  uint32_t base[32];  // midpoints in lower cells
};
// The byte offset 4 * c(y) of y's cell in a 32-word table.
NF4KIT_HD uint32_t cell_offset(float y) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(__fmaf_rn(y, kCellScale, kCellBias)) & 0x7Cu;
#else
  const float t = std::fmaf(y, kCellScale, kCellBias);
  uint32_t u;
  std::memcpy(&u, &t, 4);
  return u & 0x7Cu;
#endif
}
inline uint32_t cell_of(float y) { return cell_offset(y) / 4; }
// Whether the midpoints fit the cell scheme (true for NF4): each cell holds at most one, and every
// y in [-1 - 2^-23, 1 + 2^-23] maps to cells 0..31 in order (the ends are the extremes).
inline bool make_cell_tables(const Code4Tables& t, CellTables& c) {
  for (int k = 0; k < 32; ++k) {
    c.mid[k] = INFINITY;
    c.base[k] = 0;
  }
  if (cell_of(-1.0f - 1.2e-7f) != 0u || cell_of(1.0f + 1.2e-7f) != 31u) return false;
  for (int i = 0; i < 15; ++i) {
    const uint32_t ci = cell_of(t.mids[i]);
    if (c.mid[ci] != INFINITY) return false;  // two midpoints in one cell
    c.mid[ci] = t.mids[i];
  }
  for (int k = 0; k < 32; ++k)
    for (int i = 0; i < 15; ++i) c.base[k] += cell_of(t.mids[i]) < static_cast<uint32_t>(k) ? 1u : 0u;
  return true;
}

struct Smem {
  float mids[16];
  uint32_t order[16];
  float cell_mid[32];
  uint32_t cell_base[32];
};

// Code index of a scaled value by binary search of the midpoints: the number of midpoints y is not
// <= to (= bucket15; NaN -> 15), then the code at that sorted position. The first two steps compare
// with kernel-parameter constants; the last two read shared memory (at most 16 distinct words).
template <QuantType QT>
__device__ __forceinline__ uint32_t code_search(float y, const Code4Tables& t, const Smem& sm) {
  const bool hi = !(y <= t.mids[7]);
  int i = hi ? 8 : 0;
  i += !(y <= (hi ? t.mids[11] : t.mids[3])) ? 4 : 0;
  i += !(y <= sm.mids[i + 1]) ? 2 : 0;
  i += !(y <= sm.mids[i]) ? 1 : 0;
  return QT == QuantType::NF4 ? static_cast<uint32_t>(i) : sm.order[i];
}

// Adds the NF4 code of a finite scaled value with |y| <= 1 + 2^-23 (see the header comment), shifted
// left by `shift`, to w: the base with one shift-add, the compare's 1 with one predicated add.
__device__ __forceinline__ void add_code_cell(float y, const Smem& sm, int shift, uint32_t& w) {
  const uint32_t off = cell_offset(y);
  const char* base = reinterpret_cast<const char*>(sm.cell_base);
  const char* mid = reinterpret_cast<const char*>(sm.cell_mid);
  w += *reinterpret_cast<const uint32_t*>(base + off) << shift;
  // setp + predicated add (the compiler's add-then-select takes one instruction more)
  asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\t@p add.u32 %0, %0, %3;\n\t}"
      : "+r"(w) : "f"(y), "f"(*reinterpret_cast<const float*>(mid + off)), "r"(1u << shift));
}

// A lane's unit as raw 16-byte vectors (8 elements: one vector for 16-bit types, two for float32).
template <typename scalar_t>
struct Raw {
  static constexpr int kVecs = kUnit / kPerVec<scalar_t>;
  uint4 v[kVecs];
};

// Whole unit: 16-byte loads. Tail unit (the last chunk): element loads, zeros past n (a zero changes
// no absmax; quantize_unit sets the scaled value of every element past n to 0).
template <typename scalar_t>
__device__ __forceinline__ void load_unit(const scalar_t* __restrict__ x, int64_t e0, Raw<scalar_t>& r) {
#pragma unroll
  for (int k = 0; k < Raw<scalar_t>::kVecs; ++k) r.v[k] = load16_stream(x + e0 + k * kPerVec<scalar_t>);
}
template <typename scalar_t>
__device__ __forceinline__ void load_unit_tail(const scalar_t* __restrict__ x, int64_t e0, int64_t n,
                                               Raw<scalar_t>& r) {
  if (e0 + kUnit <= n) return load_unit(x, e0, r);
  constexpr int kBytes = static_cast<int>(sizeof(scalar_t));
  uint32_t w[2 * Raw<scalar_t>::kVecs * 4 / 2] = {};  // 8 elements' bits, 32-bit words
  const auto* bytes = reinterpret_cast<const uint8_t*>(x);
#pragma unroll
  for (int k = 0; k < kUnit; ++k) {
    if (e0 + k >= n) break;
    uint32_t b = 0;
    if constexpr (kBytes == 4) b = *reinterpret_cast<const uint32_t*>(bytes + (e0 + k) * 4);
    else b = *reinterpret_cast<const uint16_t*>(bytes + (e0 + k) * 2);
    w[k * kBytes / 4] |= b << (8 * ((k * kBytes) & 3));
  }
#pragma unroll
  for (int k = 0; k < Raw<scalar_t>::kVecs; ++k) r.v[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
}

template <typename scalar_t, bool kFull>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ x, int64_t c0, int64_t n, int lane,
                                           Raw<scalar_t> (&r)[kSegs]) {
#pragma unroll
  for (int s = 0; s < kSegs; ++s) {  // every load of the chunk in flight before the first use
    if (kFull) load_unit(x, c0 + s * kSeg + lane * kUnit, r[s]);
    else load_unit_tail(x, c0 + s * kSeg + lane * kUnit, n, r[s]);
  }
}

// max |x| over a unit, NaN winning; 16-bit types in pairs (the max of 16-bit values is one of them,
// so taking it before widening is exact).
template <typename scalar_t>
__device__ __forceinline__ float unit_absmax(const Raw<scalar_t>& r) {
  if constexpr (sizeof(scalar_t) == 4) {
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < Raw<scalar_t>::kVecs; ++k) {
      const uint4 v = r.v[k];
      m = max_nan(m, max_nan(max_nan(fabsf(__uint_as_float(v.x)), fabsf(__uint_as_float(v.y))),
                             max_nan(fabsf(__uint_as_float(v.z)), fabsf(__uint_as_float(v.w)))));
    }
    return m;
  } else {
    using T2 = typename std::conditional<std::is_same<scalar_t, at::Half>::value, __half2, __nv_bfloat162>::type;
    const uint4 v = r.v[0];
    auto h2 = [](uint32_t w) {
      const uint32_t a = w & 0x7FFF7FFFu;  // |x| of both halves (NaN stays NaN)
      return *reinterpret_cast<const T2*>(&a);
    };
    const T2 m2 = __hmax2_nan(__hmax2_nan(h2(v.x), h2(v.y)), __hmax2_nan(h2(v.z), h2(v.w)));
    const uint32_t mb = *reinterpret_cast<const uint32_t*>(&m2);
    return max_nan(unpack_lo<scalar_t>(mb), unpack_hi<scalar_t>(mb));
  }
}

// Quantize one lane's unit (elements e0 .. e0+7) of a block with absmax m, and store its 4 bytes.
// A partial (last) block divides by max(m, 1e-38); a full one multiplies by float32(1 / max(m, 1e-38)).
// (No clamp to [-1, 1]: |y| exceeds 1 by at most an ulp and every midpoint lies inside (-1, 1).)
// dst: the unit's first packed byte (packed + e0 / 2).
template <typename scalar_t, QuantType QT, bool kFull>
__device__ __forceinline__ void quantize_unit(const Raw<scalar_t>& r, int64_t e0, int64_t n, float m, bool partial,
                                              const Code4Tables& t, const Smem& sm, uint8_t* __restrict__ dst) {
  float f[kUnit];
#pragma unroll
  for (int k = 0; k < Raw<scalar_t>::kVecs; ++k) unpack16<scalar_t>(r.v[k], f + k * kPerVec<scalar_t>);
  const float clamped = clamp_min_nan(m, kTinyAbsmax);
  float y[kUnit];
  if (!kFull && partial) {
#pragma unroll
    for (int k = 0; k < kUnit; ++k) y[k] = __fdiv_rn(f[k], clamped);
  } else {
    const float recip = __frcp_rn(clamped);
#pragma unroll
    for (int k = 0; k < kUnit; ++k) y[k] = __fmul_rn(f[k], recip);
  }
  if (!kFull) {  // past the end: 0.0, as the reference pads the scaled values (an odd count's low
                 // nibble), whatever the block's absmax (NaN would make 0 / absmax NaN)
#pragma unroll
    for (int k = 0; k < kUnit; ++k)
      if (e0 + k >= n) y[k] = 0.0f;
  }
  uint32_t w = 0u;
  if (QT == QuantType::NF4 && m <= 3.402823466e38f) {  // finite block: no NaN, |y| <= 1 + 2^-23
#pragma unroll
    for (int k = 0; k < kUnit; k += 2) {  // element 2b: the high nibble of byte b
      add_code_cell(y[k], sm, 4 * k + 4, w);
      add_code_cell(y[k + 1], sm, 4 * k, w);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kUnit; k += 2)
      w |= ((code_search<QT>(y[k], t, sm) << 4) | code_search<QT>(y[k + 1], t, sm)) << (4 * k);
  }
  if (kFull || e0 + kUnit <= n) {
    *reinterpret_cast<unsigned int*>(dst) = w;  // a plain store (see store16, common.cuh)
  } else {
    const int64_t bytes_left = (n + 1) / 2 - (e0 >> 1);
#pragma unroll
    for (int b = 0; b < kUnit / 2; ++b)
      if (b < bytes_left) dst[b] = static_cast<uint8_t>(w >> (8 * b));
  }
}

// A block's absmax is >= 0 or NaN, so "not <= FLT_MAX" is NaN or inf: set the caller's flag (which
// may live in pinned host memory; the store is rare, and only ever writes 1).
__device__ __forceinline__ void flag_nonfinite(float m, int32_t* nonfinite) {
  if (!(m <= 3.402823466e38f) && nonfinite != nullptr) *reinterpret_cast<volatile int32_t*>(nonfinite) = 1;
}

// A loaded chunk item (blocksize 2^kLog2Bs <= 1024, known at compile time: the lane shuffles unroll
// and block indices are constant shifts): absmax per block, quantize. c0 is a multiple of 1024, so
// the chunk's packed bytes and absmax values start at c0 / 2 and c0 / blocksize.
template <typename scalar_t, QuantType QT, bool kFull, int kLog2Bs>
__device__ __forceinline__ void quantize_chunk(const Raw<scalar_t> (&r)[kSegs], int64_t c0, int64_t n, int lane,
                                               const Code4Tables& t, const Smem& sm, uint8_t* __restrict__ packed,
                                               float* __restrict__ absmax, int32_t* nonfinite) {
  float m[kSegs];
#pragma unroll
  for (int s = 0; s < kSegs; ++s) m[s] = unit_absmax(r[s]);
  if constexpr (kLog2Bs >= 9) {  // 512: segments (0, 1) and (2, 3) share a block; 1024: all four
    m[0] = m[1] = max_nan(m[0], m[1]);
    m[2] = m[3] = max_nan(m[2], m[3]);
    if constexpr (kLog2Bs >= 10) m[0] = m[1] = m[2] = m[3] = max_nan(m[0], m[2]);
  }
  constexpr int kLanes = kLog2Bs >= 8 ? 32 : 1 << (kLog2Bs - 3);  // lanes of a block in a segment
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1)
#pragma unroll
    for (int s = 0; s < kSegs; ++s) m[s] = max_nan(m[s], __shfl_xor_sync(0xffffffffu, m[s], o));
  constexpr int kBs = 1 << kLog2Bs;
  uint8_t* pk = packed + (c0 >> 1) + lane * (kUnit / 2);
  float* am = absmax + (c0 >> kLog2Bs);
#pragma unroll
  for (int s = 0; s < kSegs; ++s) {
    const int in = s * kSeg + lane * kUnit;  // the unit's offset in the chunk
    const int64_t e0 = c0 + in;
    if (!kFull && e0 >= n) continue;
    // only the last block can be partial
    const bool partial = !kFull && ((e0 >> kLog2Bs) + 1) * int64_t{kBs} > n;
    if ((in & (kBs - 1)) == 0) {  // the block's first unit writes its absmax (and flags NaN / inf)
      am[in >> kLog2Bs] = partial ? clamp_min_nan(m[s], kTinyAbsmax) : m[s];
      flag_nonfinite(m[s], nonfinite);
    }
    quantize_unit<scalar_t, QT, kFull>(r[s], e0, n, m[s], partial, t, sm, pk + s * (kSeg / 2));
  }
}

// An item of one large block (2048 / 4096): absmax over its chunks, then quantize them (second read).
template <typename scalar_t, QuantType QT, bool kFull>
__device__ __forceinline__ void quantize_block_item(const scalar_t* __restrict__ x, int64_t block, int64_t n,
                                                    int log2_bs, int lane, const Code4Tables& t, const Smem& sm,
                                                    uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                                    int32_t* nonfinite) {
  const int64_t start = block << log2_bs;
  const int chunks = 1 << (log2_bs - 10);
  float m = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    Raw<scalar_t> r[kSegs];
    load_chunk<scalar_t, kFull>(x, start + c * kChunk, n, lane, r);
#pragma unroll
    for (int s = 0; s < kSegs; ++s) m = max_nan(m, unit_absmax(r[s]));
  }
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
  const bool partial = !kFull;  // kFull: the block lies wholly before n
  if (lane == 0) {
    absmax[block] = partial ? clamp_min_nan(m, kTinyAbsmax) : m;
    flag_nonfinite(m, nonfinite);
  }
  for (int c = 0; c < chunks; ++c) {
    Raw<scalar_t> r[kSegs];
    const int64_t c0 = start + c * kChunk;
    load_chunk<scalar_t, kFull>(x, c0, n, lane, r);
#pragma unroll
    for (int s = 0; s < kSegs; ++s) {
      const int64_t e0 = c0 + s * kSeg + lane * kUnit;
      if (!kFull && e0 >= n) continue;
      quantize_unit<scalar_t, QT, kFull>(r[s], e0, n, m, partial, t, sm, packed + (e0 >> 1));
    }
  }
}

// kLog2Bs: log2(blocksize) for blocksize <= 1024 (items of one chunk), or 0 for 2048 / 4096 (an item
// is one block; log2_bs says which).
template <typename scalar_t, QuantType QT, int kLog2Bs>
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const scalar_t* __restrict__ x, int64_t n, int log2_bs, Code4Tables tables, CellTables cells,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax, int32_t* nonfinite) {
  __shared__ Smem sm;
  if (threadIdx.x < 16) {
    sm.mids[threadIdx.x] = threadIdx.x < 15 ? tables.mids[threadIdx.x] : 0.0f;  // [15] never read
    sm.order[threadIdx.x] = tables.order[threadIdx.x];
  }
  if (threadIdx.x < 32) {
    sm.cell_mid[threadIdx.x] = cells.mid[threadIdx.x];
    sm.cell_base[threadIdx.x] = cells.base[threadIdx.x];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  constexpr bool kLargeBlocks = kLog2Bs == 0;
  const int log2_item = kLargeBlocks ? log2_bs : 10;
  const int64_t nitems = ((n - 1) >> log2_item) + 1;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  auto whole = [&](int64_t it) { return ((it + 1) << log2_item) <= n; };
  int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if constexpr (kLargeBlocks) {
    for (; it < nitems; it += nwarps) {
      if (whole(it))
        quantize_block_item<scalar_t, QT, true>(x, it, n, log2_bs, lane, tables, sm, packed, absmax, nonfinite);
      else
        quantize_block_item<scalar_t, QT, false>(x, it, n, log2_bs, lane, tables, sm, packed, absmax, nonfinite);
    }
  } else {
    // A resident grid: each warp loads its next chunk before it quantizes the current one, so its
    // loads stay in flight through its compute (one load phase per chunk would idle the memory).
    const int64_t nwhole = n >> 10;
    Raw<scalar_t> r[kSegs];
    if (it < nwhole) load_chunk<scalar_t, true>(x, it << 10, n, lane, r);
    for (; it < nwhole; it += nwarps) {
      Raw<scalar_t> next[kSegs];
      if (it + nwarps < nwhole) load_chunk<scalar_t, true>(x, (it + nwarps) << 10, n, lane, next);
      quantize_chunk<scalar_t, QT, true, kLog2Bs>(r, it << 10, n, lane, tables, sm, packed, absmax, nonfinite);
#pragma unroll
      for (int s = 0; s < kSegs; ++s) r[s] = next[s];
    }
    if (it == nwhole && nwhole < nitems) {  // the tail item falls to exactly one warp
      load_chunk<scalar_t, false>(x, it << 10, n, lane, r);
      quantize_chunk<scalar_t, QT, false, kLog2Bs>(r, it << 10, n, lane, tables, sm, packed, absmax, nonfinite);
    }
  }
}

// The kernel instance of a blocksize: one per blocksize up to 1024, one for 2048 and 4096.
template <typename scalar_t, QuantType QT>
auto kernel_for(int log2_bs) {
  switch (log2_bs) {
    case 5: return &quantize_4bit_kernel<scalar_t, QT, 5>;
    case 6: return &quantize_4bit_kernel<scalar_t, QT, 6>;
    case 7: return &quantize_4bit_kernel<scalar_t, QT, 7>;
    case 8: return &quantize_4bit_kernel<scalar_t, QT, 8>;
    case 9: return &quantize_4bit_kernel<scalar_t, QT, 9>;
    case 10: return &quantize_4bit_kernel<scalar_t, QT, 10>;
    default: return &quantize_4bit_kernel<scalar_t, QT, 0>;
  }
}

// The NaN / Inf flag as a pointer the kernel can store to: a tensor on A's device, or pinned host
// memory, which is mapped into the device's address space (the store lands in host memory, so the
// host reads it after an event on the kernel, with no copy queued on the stream).
int32_t* nonfinite_flag_ptr(const c10::optional<at::Tensor>& flag, const at::Tensor& A) {
  if (!flag) return nullptr;
  check_nonfinite_flag(*flag);
  if (flag->is_cuda()) {
    check_device(*flag, A.device(), "nonfinite");
    return flag->data_ptr<int32_t>();
  }
  TORCH_CHECK_VALUE(flag->is_cpu(), "nonfinite must be on ", A.device(), " or in pinned host memory, got ",
                    flag->device());
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, flag->data_ptr());
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky; clear it before raising
  TORCH_CHECK_VALUE(err == cudaSuccess && attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr,
                    "nonfinite is a CPU tensor that is not pinned (mapped) host memory; pass one on ", A.device(),
                    " or made with pin_memory=True");
  return static_cast<int32_t*>(attr.devicePointer);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A_, int64_t blocksize,
                                                      c10::string_view quant_type,
                                                      const c10::optional<at::Tensor>& nonfinite) {
  TORCH_CHECK_VALUE(A_.is_cuda(), "A must be a CUDA tensor, got one on ", A_.device());
  check_float_input(A_, "A");
  TORCH_CHECK_VALUE(A_.numel() > 0, "A must not be empty, got shape ", A_.sizes());
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const c10::cuda::CUDAGuard guard(A_.device());
  int32_t* flag = nonfinite_flag_ptr(nonfinite, A_);
  at::Tensor A = A_.contiguous();
  if (!aligned16(A.data_ptr())) A = A.clone();  // a view at an odd offset: 16-byte loads need alignment
  const int64_t n = A.numel();
  at::Tensor packed = new_output({(n + 1) / 2}, A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  const int log2_bs = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const Code4Tables tables = make_code4_tables(qt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The NF4 cell tables, built once (FP4 has no use for them: its midpoints are too close at 0).
  static const CellTables nf4_cells = [] {
    CellTables c;
    TORCH_INTERNAL_ASSERT(make_cell_tables(make_code4_tables(QuantType::NF4), c), "NF4 cell tables do not fit");
    return c;
  }();
  const CellTables cells = qt == QuantType::NF4 ? nf4_cells : CellTables{};
  const bool large = blocksize > kChunk;  // 2048 / 4096: a warp item is one block
  const int64_t nitems = ceil_div(n, large ? blocksize : kChunk);
  NF4KIT_CUDA_DISPATCH_FLOAT(A.scalar_type(), "quantize_4bit_cuda", [&] {
    auto* kernel = qt == QuantType::NF4 ? kernel_for<scalar_t, QuantType::NF4>(log2_bs)
                                        : kernel_for<scalar_t, QuantType::FP4>(log2_bs);
    // chunk items: a resident grid (each warp prefetches its next item); large blocks: one per warp
    const int64_t ctas = ceil_div(nitems, kWarps);
    const int64_t grid = large ? full_grid(ctas) : resident_grid(kernel, kThreads, ctas);
    kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(A.data_ptr<scalar_t>(), n, log2_bs, tables, cells,
                                                                 packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                                 flag);
    NF4KIT_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) { m.impl("quantize_4bit", &cuda::quantize_4bit_cuda); }

}  // namespace nf4kit
