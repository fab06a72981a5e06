// Helpers shared by the CPU kernels (host-only; the CUDA side has csrc/cuda/common.cuh).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace nf4kit {
namespace cpu {

// Elements per parallel task, whatever the blocksize.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kGrainElements / blocksize); }

// max |x| over x[0, len) in float32, NaN when any element is NaN (as torch.amax propagates NaN).
template <typename scalar_t>
float block_absmax(const scalar_t* x, int64_t len) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(static_cast<float>(x[i]));
    m = a > m ? a : m;
    nan |= a != a;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// torch.clamp(v, -1, 1): NaN stays NaN.
inline float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

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
