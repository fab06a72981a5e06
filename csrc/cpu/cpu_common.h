// Helpers shared by the CPU kernels (host-only; the CUDA side has csrc/cuda/common.cuh).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// x86 builds compile the hot loops twice: for the baseline ISA and for AVX2 + F16C (every x86 CPU
// of the last decade), picked at run time. NF4KIT_CPU_NO_AVX2=1 forces the baseline (the tests
// compare both paths). Both paths compute the same float32 operations: results are identical.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define NF4KIT_X86_AVX2 1
#define NF4KIT_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#include <immintrin.h>
#else
#define NF4KIT_X86_AVX2 0
#define NF4KIT_TARGET_AVX2
#endif
#define NF4KIT_ALWAYS_INLINE inline __attribute__((always_inline))

namespace nf4kit {
namespace cpu {

inline bool use_avx2() {
#if NF4KIT_X86_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  const char* off = std::getenv("NF4KIT_CPU_NO_AVX2");
  return supported && !(off != nullptr && off[0] == '1');
#else
  return false;
#endif
}

// Elements per parallel task, whatever the blocksize.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kGrainElements / blocksize); }

// The raw bits of a float type, as the unsigned integer of its width.
template <typename scalar_t> struct Bits;
template <> struct Bits<float> { using type = uint32_t; static constexpr uint32_t kAbsMask = 0x7FFFFFFFu; };
template <> struct Bits<c10::Half> { using type = uint16_t; static constexpr uint16_t kAbsMask = 0x7FFF; };
template <> struct Bits<c10::BFloat16> { using type = uint16_t; static constexpr uint16_t kAbsMask = 0x7FFF; };

// max |x| over x[0, len), as float32; NaN when any element is NaN (as torch.amax propagates NaN).
// Done on the bits: with the sign cleared, integer order is magnitude order and every NaN sorts
// above infinity, so an integer max (which vectorizes) finds the absmax and propagates NaN. The
// conversion to float32 is monotonic, so converting only the maximum is exact.
template <typename scalar_t>
NF4KIT_ALWAYS_INLINE float block_absmax(const scalar_t* x, int64_t len) {
  using U = typename Bits<scalar_t>::type;
  static_assert(sizeof(U) == sizeof(scalar_t), "bit type of the wrong width");
  U m = 0;
  for (int64_t i = 0; i < len; ++i) {
    U u;
    std::memcpy(&u, x + i, sizeof(U));
    u &= Bits<scalar_t>::kAbsMask;
    m = u > m ? u : m;
  }
  scalar_t v;
  std::memcpy(&v, &m, sizeof(U));
  return static_cast<float>(v);
}

// torch.clamp(v, -1, 1): NaN stays NaN.
NF4KIT_ALWAYS_INLINE float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Runs f(b) for every block b of `blocksize` elements among n, in parallel, with the block's
// start and length (only the last block can be shorter).
template <typename F>
void for_each_block(int64_t n, int64_t blocksize, const F& f) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      f(b, start, std::min(blocksize, n - start));
    }
  });
}

}  // namespace cpu
}  // namespace nf4kit
