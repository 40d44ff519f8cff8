// Instantiates every kernel of kernels.cuh without torch headers: `nvcc -c csrc/compile_check.cu`
// checks the device code on a machine whose torch has no CUDA (tests/test_kernels_cuda_build.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.cuh"

template __global__ void longseq::copy_pieces_kernel<uint8_t, true>(uint8_t*, uint8_t*, longseq::Strided5, int, int64_t, int64_t, int64_t);
template __global__ void longseq::copy_pieces_kernel<uint16_t, true>(uint16_t*, uint16_t*, longseq::Strided5, int, int64_t, int64_t, int64_t);
template __global__ void longseq::copy_pieces_kernel<uint32_t, true>(uint32_t*, uint32_t*, longseq::Strided5, int, int64_t, int64_t, int64_t);
template __global__ void longseq::copy_pieces_kernel<uint64_t, false>(uint64_t*, uint64_t*, longseq::Strided5, int, int64_t, int64_t, int64_t);
template __global__ void longseq::scan_update_kernel<float, float>(float*, const float*, const float*, const float*, int64_t, int64_t);
template __global__ void longseq::scan_update_kernel<float, __nv_bfloat16>(float*, const float*, const __nv_bfloat16*, const float*, int64_t, int64_t);
template __global__ void longseq::scan_update_kernel<double, __half>(double*, const double*, const __half*, const double*, int64_t, int64_t);
