// Torch extension of longseq's fused kernels (longseq/kernels/cuda_ext.py loads it): the switch's
// pack / unpack and All-Scan's block update, launched on the current CUDA stream, registered as the
// operators torch.ops.longseq_kernels.* (TORCH_LIBRARY, no pybind: light headers, quick to build).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels.cuh"

namespace {

template <typename U>
void launch_copy(at::Tensor& strided, at::Tensor& flat, int dim, int64_t q, int64_t rem, int64_t parts, bool pack) {
  longseq::Strided5 t;
  for (int k = 0; k < 5; ++k) {
    t.n[k] = strided.size(k);
    t.s[k] = strided.stride(k);
  }
  const int64_t big = q + (rem > 0 ? 1 : 0);
  int64_t rows = 1;
  for (int k = 0; k < 4; ++k) rows *= (k == dim) ? big : t.n[k];
  const int64_t cols = (dim == 4) ? big : t.n[4];
  const dim3 block = longseq::copy_block(cols);
  const dim3 grid(static_cast<unsigned>((rows + block.y - 1) / block.y), static_cast<unsigned>(parts));
  const int64_t other = strided.numel() / t.n[dim];
  auto stream = c10::cuda::getCurrentCUDAStream();
  U* s = reinterpret_cast<U*>(strided.data_ptr());
  U* f = reinterpret_cast<U*>(flat.data_ptr());
  if (pack) {
    longseq::copy_pieces_kernel<U, true><<<grid, block, 0, stream>>>(s, f, t, dim, q, rem, other);
  } else {
    longseq::copy_pieces_kernel<U, false><<<grid, block, 0, stream>>>(s, f, t, dim, q, rem, other);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_pieces(at::Tensor strided, at::Tensor flat, int64_t dim, int64_t q, int64_t rem, int64_t parts, bool pack) {
  TORCH_CHECK(strided.is_cuda() && flat.is_cuda(), "copy_pieces: CUDA tensors only");
  TORCH_CHECK(strided.dim() == 5 && flat.dim() == 1 && flat.is_contiguous(), "copy_pieces: a 5-D view and a flat buffer");
  TORCH_CHECK(strided.element_size() == flat.element_size() && flat.numel() == strided.numel(),
              "copy_pieces: the buffer must hold the tensor's units");
  TORCH_CHECK(parts >= 1 && parts <= 65535 && dim >= 0 && dim < 5, "copy_pieces: 1..65535 pieces along dims 0..4");
  if (strided.numel() == 0) return;
  c10::cuda::CUDAGuard guard(strided.device());
  switch (strided.element_size()) {
    case 1: launch_copy<uint8_t>(strided, flat, static_cast<int>(dim), q, rem, parts, pack); break;
    case 2: launch_copy<uint16_t>(strided, flat, static_cast<int>(dim), q, rem, parts, pack); break;
    case 4: launch_copy<uint32_t>(strided, flat, static_cast<int>(dim), q, rem, parts, pack); break;
    case 8: launch_copy<uint64_t>(strided, flat, static_cast<int>(dim), q, rem, parts, pack); break;
    default: TORCH_CHECK(false, "copy_pieces: units of 1, 2, 4 or 8 bytes");
  }
}

template <typename T>
void launch_scan(at::Tensor& out, const at::Tensor& inp, const at::Tensor& local, const std::optional<at::Tensor>& decay) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((rows * cols + threads - 1) / threads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* d = decay.has_value() ? decay->data_ptr<T>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "scan_update", [&] {
    longseq::scan_update_kernel<T, scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        out.data_ptr<T>(), inp.data_ptr<T>(), local.data_ptr<scalar_t>(), d, rows, cols);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scan_update(at::Tensor out, at::Tensor inp, at::Tensor local, std::optional<at::Tensor> decay) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.is_contiguous(), "scan_update: out is a contiguous [rows, C] CUDA tensor");
  TORCH_CHECK(inp.sizes() == out.sizes() && local.sizes() == out.sizes(), "scan_update: inp and local have out's shape");
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  // the received block and the decay in the scan's dtype (a no-op in All-Scan, which scans in one dtype)
  inp = inp.to(out.scalar_type()).contiguous();
  local = local.contiguous();
  if (decay.has_value()) {
    TORCH_CHECK(decay->numel() == out.size(0), "scan_update: decay is a [rows, 1] column");
    decay = decay->to(out.scalar_type()).contiguous();
  }
  if (out.scalar_type() == at::kFloat) {
    launch_scan<float>(out, inp, local, decay);
  } else {
    TORCH_CHECK(out.scalar_type() == at::kDouble, "scan_update: out is float32 or float64");
    launch_scan<double>(out, inp, local, decay);
  }
}

void pack_pieces(const at::Tensor& src, const at::Tensor& flat, int64_t dim, int64_t q, int64_t rem, int64_t parts) {
  copy_pieces(src, flat, dim, q, rem, parts, true);
}

void unpack_pieces(const at::Tensor& dst, const at::Tensor& flat, int64_t dim, int64_t q, int64_t rem, int64_t parts) {
  copy_pieces(dst, flat, dim, q, rem, parts, false);
}

}  // namespace

TORCH_LIBRARY(longseq_kernels, m) {
  m.def("pack_pieces(Tensor src, Tensor(a!) flat, int dim, int q, int rem, int parts) -> ()");
  m.def("unpack_pieces(Tensor(a!) dst, Tensor flat, int dim, int q, int rem, int parts) -> ()");
  m.def("scan_update(Tensor(a!) out, Tensor inp, Tensor local, Tensor? decay) -> ()");
}

TORCH_LIBRARY_IMPL(longseq_kernels, CUDA, m) {
  m.impl("pack_pieces", &pack_pieces);
  m.impl("unpack_pieces", &unpack_pieces);
  m.impl("scan_update", &scan_update);
}
