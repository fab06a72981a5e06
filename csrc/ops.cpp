// The nf4kit operator library: every op's schema, and the Python module nf4kit._C.
// Kernels register themselves per backend (csrc/cpu/*.cpp, csrc/cuda/*.cu) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(nf4kit, m) {
  // Blockwise 4-bit. A: fp16/bf16/fp32, contiguous, numel >= 1.
  // Returns packed uint8 [(numel + 1) // 2] (element 2i in the high nibble) and float32 absmax
  // [ceil(numel / blocksize)]. nonfinite, when given: int32, >= 1 element, set to 1 when some block's
  // absmax is NaN or Inf (never cleared: the caller zeroes it). On A's device, or for a CUDA A also
  // pinned host memory, which the kernel writes directly: the host reads the flag after an event on
  // the kernel, with no copy queued behind it.
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type, Tensor(a!)? nonfinite=None) -> (Tensor, Tensor)");
  // absmax is float32 [nblocks], or uint8 codes [nblocks] when nested_absmax (float32
  // [ceil(nblocks / nested_blocksize)]), nested_code (float32 [256]) and offset (float32, 1 element)
  // are given; the nested absmax is decoded inside the kernel.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  // Blockwise 8-bit against a sorted 256-value code (the signed dynamic map for nested absmax).
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) "
      "-> Tensor");
  // The second level of a nested 4-bit quantization in one pass: quantize_blockwise(absmax - offset,
  // code, blocksize), absmax float32 [nblocks], offset float32 [1] (torch's mean of absmax).
  m.def("quantize_nested_absmax(Tensor absmax, Tensor offset, Tensor code, int blocksize) -> (Tensor, Tensor)");
  // Fused 4-bit matmul: out[..., N] = A[..., K] @ W[N, K]^T (+ bias), W given as its packed
  // 4-bit form (same arguments as dequantize_4bit, shape [N, K]).
  m.def(
      "gemm_4bit(Tensor A, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, int out_features, "
      "Tensor? bias) -> Tensor");
  // LLM.int8: row-wise absmax int8 quantization (outlier columns zeroed above threshold),
  // int8 x int8^T -> int32, and the dequantizing epilogue.
  // int8_vectorwise_quant: A float [..., K] -> (int8 q [..., K], float32 row_stats [rows],
  // int64 outlier columns [n], ascending; empty when threshold <= 0).
  m.def("int8_vectorwise_quant(Tensor A, float threshold) -> (Tensor, Tensor, Tensor)");
  // int32 [..., N] = int8 A [..., K] @ int8 B [N, K]^T.
  m.def("int8_linear_matmul(Tensor A, Tensor B) -> Tensor");
  // dtype [..., N] from the int32 product, row_stats [rows], col_stats [N] and bias [N] (any float).
  m.def(
      "int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType dtype, Tensor? bias) "
      "-> Tensor");
  // int8_mm_dequant(int8_linear_matmul(A, B), ...) in one pass (the epilogue fused into the matmul).
  m.def(
      "int8_scaled_mm(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, ScalarType dtype, "
      "Tensor? bias) -> Tensor");
}

// An importable Python module: importing nf4kit._C loads the library and runs the registrations
// above. Its attribute `backends` says which kernels were compiled.
static PyModuleDef nf4kit_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&nf4kit_module);
  if (mod == nullptr) return nullptr;
#ifdef NF4KIT_WITH_CUDA
  PyModule_AddStringConstant(mod, "backends", "cpu,cuda");
#else
  PyModule_AddStringConstant(mod, "backends", "cpu");
#endif
  return mod;
}
