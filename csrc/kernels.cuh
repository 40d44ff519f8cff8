// Device code of longseq's fused kernels, free of torch headers (tests compile it alone with nvcc).
//
// copy_pieces_kernel: the DSP switch's pack (strided tensor -> flat send buffer) and unpack (flat
//   received buffer -> output), all tensor_split pieces in one launch. The tensor is a 5-D view in
//   "units" (elements reinterpreted as 1/2/4/8-byte integers; see longseq/kernels/layout.py); piece
//   j = blockIdx.y has q + (j < rem) entries along `dim`, starting at j*q + min(j, rem), and sits at
//   offset off_j * other in the flat buffer, in C order. blockDim = (cols threads, rows per block).
// scan_update_kernel: All-Scan's block update out = decay[r] * inp + local, the product rounded and
//   then the sum (no FMA: __fmul_rn / __fadd_rn), local cast to out's type.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace longseq {

struct Strided5 {
  int64_t n[5];  // sizes, n[dim] being the whole size of the split dim
  int64_t s[5];  // strides, in units
};

template <typename U, bool PACK>
__global__ void copy_pieces_kernel(U* __restrict__ strided, U* __restrict__ flat, Strided5 t, int dim,
                                   int64_t q, int64_t rem, int64_t other) {
  const int64_t j = blockIdx.y;
  const int64_t off = j * q + (j < rem ? j : rem);
  int64_t n[5];
#pragma unroll
  for (int k = 0; k < 5; ++k) n[k] = (k == dim) ? q + (j < rem ? 1 : 0) : t.n[k];
  const int64_t rows = n[0] * n[1] * n[2] * n[3];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  int64_t i[4];
  int64_t r = row;
#pragma unroll
  for (int k = 3; k > 0; --k) {
    i[k] = r % n[k];
    r /= n[k];
  }
  i[0] = r;
  int64_t base = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) base += (i[k] + (k == dim ? off : 0)) * t.s[k];
  const int64_t c0 = (dim == 4) ? off : 0;
  U* f = flat + off * other + row * n[4];
  for (int64_t c = threadIdx.x; c < n[4]; c += blockDim.x) {
    U* p = strided + base + (c + c0) * t.s[4];
    if (PACK) {
      f[c] = *p;
    } else {
      *p = f[c];
    }
  }
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename T, typename L>
__global__ void scan_update_kernel(T* __restrict__ out, const T* __restrict__ inp, const L* __restrict__ local,
                                   const T* __restrict__ decay, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T x = inp[e];
    if (decay != nullptr) x = mul_rn(decay[e / cols], x);
    out[e] = add_rn(x, static_cast<T>(local[e]));
  }
}

// Launch geometry shared by the torch glue and the header-only compile check.
inline dim3 copy_block(int64_t cols) {
  int x = 32;
  while (x < 256 && x < cols) x *= 2;
  return dim3(x, 256 / x);
}

}  // namespace longseq
