// The host side shared by the two CUDA launchers (segment_gram.cu and
// segment_combine.cu): the dtype switch, raw pointers, the grid size and the
// device check.
//
// The launchers' C++ signatures match the CPU kernels' (all `const at::Tensor&`),
// as the dispatcher requires of every kernel of one op; the schemas are defined
// in Python (mdgd_kernels/_ops.py).
//
// Headers: c10/cuda only (CUDAGuard, CUDAStream, CUDAException).
// c10::cuda::getCurrentCUDAStream is the function that at::cuda exposes under
// that name; ATen/cuda/CUDAContext.h would also pull cuBLAS/cuSPARSE headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace mdgd {
namespace cuda {

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

inline unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::min(blocks, kMaxBlocks));
}

inline void check_cuda(const char* op, const at::Tensor& g_theta) {
  TORCH_CHECK(
      g_theta.is_cuda(), op, ": the CUDA kernel got buffers on ", g_theta.device(),
      "; move them to a CUDA device");
}

} // namespace cuda
} // namespace mdgd
