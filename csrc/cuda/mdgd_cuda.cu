// The CUDA kernels of the two mdgd:: ops, registered for the CUDA dispatch key.
//
//   segment_gram:     stats[s] = the 10 Gram entries of (gt, ht, gp, hp) over
//                     segment s (docs/math.md section 3), float32 [S, 10];
//   segment_combine_: g_theta <- c1*gt + c2*ht + c3*gp + c4*hp per segment, in
//                     float32, rounded once to the buffers' dtype (docs/math.md section 5).
//
// This file is the torch glue only: argument checks, the dtype switch, scratch
// allocation and the launches on the current stream. The kernels, the equations
// and the bytes they move are documented in kernels.cuh. The schemas are
// defined in Python (mdgd_kernels/_ops.py); the C++ signatures match the CPU
// kernels' (all `const at::Tensor&`), as the dispatcher requires of every kernel
// of one op.
//
// Headers: c10/cuda only (CUDAGuard, CUDAStream, CUDAException).
// c10::cuda::getCurrentCUDAStream is the function that at::cuda exposes under
// that name; ATen/cuda/CUDAContext.h would also pull cuBLAS/cuSPARSE headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "mdgd_common.h"
#include "kernels.cuh"

namespace mdgd {
namespace cuda {
namespace {

// Grid-stride loops cover any chunk count; this only bounds gridDim.x.
constexpr int64_t kMaxBlocks = int64_t{1} << 24;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the CUDA element type of `t` (checked by check_buffers).
template <typename F>
void dispatch_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<__half>{});
      break;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, "; supported: BFloat16, Half, Float");
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::min(blocks, kMaxBlocks));
}

void check_cuda(const char* op, const at::Tensor& g_theta) {
  TORCH_CHECK(
      g_theta.is_cuda(), op, ": the CUDA kernel got buffers on ", g_theta.device(),
      "; move them to a CUDA device");
}

} // namespace

at::Tensor segment_gram(
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const at::Tensor& chunks,
    const at::Tensor& chunk_ptr) {
  constexpr const char* op = "mdgd::segment_gram (CUDA)";
  check_cuda(op, g_theta);
  check_gram_args(op, g_theta, h_theta, g_phi, h_phi, chunks, chunk_ptr);

  const c10::cuda::CUDAGuard guard(g_theta.device());
  const int64_t num_segments = chunk_ptr.numel() - 1;
  const int64_t num_chunks = chunks.size(0);
  const auto f32 = g_theta.options().dtype(at::kFloat);
  if (num_segments == 0 || num_chunks == 0) {
    return at::zeros({num_segments, kGramCols}, f32); // every segment is empty
  }
  at::Tensor partials = at::empty({num_chunks, kGramCols}, f32);
  at::Tensor out = at::empty({num_segments, kGramCols}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_dtype(g_theta.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_gram_chunks_kernel<T, kGramThreads><<<grid_for(num_chunks), kGramThreads, 0, stream>>>(
        cptr<T>(g_theta), cptr<T>(h_theta), cptr<T>(g_phi), cptr<T>(h_phi),
        chunks.const_data_ptr<int64_t>(), num_chunks, partials.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t finalize_blocks = (num_segments + kFinalizeWarps - 1) / kFinalizeWarps;
  segment_gram_finalize_kernel<kFinalizeWarps>
      <<<grid_for(finalize_blocks), kFinalizeWarps * kWarp, 0, stream>>>(
          partials.const_data_ptr<float>(), chunk_ptr.const_data_ptr<int64_t>(), num_segments,
          out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void segment_combine_(
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const at::Tensor& chunks,
    const at::Tensor& coeffs) {
  constexpr const char* op = "mdgd::segment_combine_ (CUDA)";
  check_cuda(op, g_theta);
  check_combine_args(op, g_theta, h_theta, g_phi, h_phi, chunks, coeffs);

  const int64_t num_chunks = chunks.size(0);
  if (num_chunks == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(g_theta.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_dtype(g_theta.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_combine_chunks_kernel<T, kCombineThreads>
        <<<grid_for(num_chunks), kCombineThreads, 0, stream>>>(
            mptr<T>(g_theta), cptr<T>(h_theta), cptr<T>(g_phi), cptr<T>(h_phi),
            chunks.const_data_ptr<int64_t>(), num_chunks, coeffs.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

} // namespace cuda
} // namespace mdgd

TORCH_LIBRARY_IMPL(mdgd, CUDA, m) {
  m.impl("segment_gram", &mdgd::cuda::segment_gram);
  m.impl("segment_combine_", &mdgd::cuda::segment_combine_);
}
