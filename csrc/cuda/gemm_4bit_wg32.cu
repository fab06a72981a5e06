// The warpgroup kernel at batch tile 32, both activation dtypes (see gemm_4bit_wg.cuh).
#include "gemm_4bit_wg.cuh"

namespace nf4kit {
namespace cuda {
namespace gemm4 {
NF4KIT_WG_INSTANTIATE(32)
}  // namespace gemm4
}  // namespace cuda
}  // namespace nf4kit
