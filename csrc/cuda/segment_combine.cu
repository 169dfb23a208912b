// Pass 2 on CUDA, segment_combine_ (docs/math.md section 5): for i in segment s,
//
//   g_theta[i] <- c1*gt[i] + c2*ht[i] + c3*gp[i] + c4*hp[i],   (c1..c4) = coeffs[s]
//
// computed in float32 exactly as the torch backend does (d = +0, then
// d += c_j * x_j in j order, every multiply and add rounded on its own: no FMA
// contraction, so the CUDA result is bit-identical to the composed-torch one),
// then rounded once (round-to-nearest-even) to the buffers' dtype. A coefficient
// that is exactly 0 (or -0) means its buffer is not read, so NaN/Inf there does
// not leak in; a row exactly (1, 0, 0, 0) leaves the chunk untouched (no read,
// no write); (0, 0, 0, 0) writes +0 without reading anything.
// Bytes moved: sizeof(T) per element for each non-zero coefficient read, and
// sizeof(T) written (at most 10 B in bf16); nothing for an identity row.
//
// The kernel, then the torch glue (argument checks, the launch on the current
// stream) and the registration for the CUDA key.
#include <torch/library.h>

#include <cstdint>

#include "cuda/chunk_io.cuh"
#include "cuda/launch.h"
#include "mdgd_common.h"

namespace mdgd {
namespace cuda {

constexpr int kNumCoeffs = 4; // coefficient row: c1..c4 of gt, ht, gp, hp
constexpr int kCombineThreads = 256;

struct CombineRow {
  float c[kNumCoeffs];
  bool use[kNumCoeffs]; // use[j]: coefficient j is non-zero, buffer j is read
};

// d = ((((+0 + c1*x1) + c2*x2) + c3*x3) + c4*x4) with the zero terms skipped;
// __fmul_rn / __fadd_rn are never contracted into an FMA, so this is the torch
// backend's float32 arithmetic bit for bit (adding a skipped +0 never changes d,
// which cannot be -0 since it starts at +0).
__device__ __forceinline__ float combine_one(
    const CombineRow& r, float gt, float ht, float gp, float hp) {
  float d = 0.f;
  if (r.use[0]) d = __fadd_rn(d, __fmul_rn(r.c[0], gt));
  if (r.use[1]) d = __fadd_rn(d, __fmul_rn(r.c[1], ht));
  if (r.use[2]) d = __fadd_rn(d, __fmul_rn(r.c[2], gp));
  if (r.use[3]) d = __fadd_rn(d, __fmul_rn(r.c[3], hp));
  return d;
}

template <typename T>
__device__ __forceinline__ void combine_scalar(
    const CombineRow& r, T* gt, const T* ht, const T* gp, const T* hp, int64_t i) {
  const float x0 = r.use[0] ? Elem<T>::to_float(gt[i]) : 0.f;
  const float x1 = r.use[1] ? Elem<T>::to_float(ht[i]) : 0.f;
  const float x2 = r.use[2] ? Elem<T>::to_float(gp[i]) : 0.f;
  const float x3 = r.use[3] ? Elem<T>::to_float(hp[i]) : 0.f;
  gt[i] = Elem<T>::from_float(combine_one(r, x0, x1, x2, x3));
}

template <typename T>
__device__ __forceinline__ uint4 combine_vec(
    const CombineRow& r, const uint4& rgt, const uint4& rht, const uint4& rgp,
    const uint4& rhp) {
  float o[Elem<T>::kVec];
  for_each_element<T>(rgt, rht, rgp, rhp, [&](int e, float gt, float ht, float gp, float hp) {
    o[e] = combine_one(r, gt, ht, gp, hp);
  });
  return Elem<T>::pack(o);
}

// The loads of one vector slot: only the buffers with a non-zero coefficient
// (the branches are uniform across the block, so they cost no divergence).
template <typename T>
__device__ __forceinline__ void combine_load(
    const CombineRow& r, const T* gt, const T* ht, const T* gp, const T* hp, int64_t off,
    uint4 (&x)[4]) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  x[0] = r.use[0] ? load16(gt + off) : zero;
  x[1] = r.use[1] ? load16(ht + off) : zero;
  x[2] = r.use[2] ? load16(gp + off) : zero;
  x[3] = r.use[3] ? load16(hp + off) : zero;
}

// This thread's share of one chunk (the buffers already offset to its start).
// g_theta is read and written, so no pointer here is __restrict__: the op must
// stay correct even if a caller passes the same tensor twice.
template <typename T, int kThreads>
__device__ __forceinline__ void combine_chunk(
    const CombineRow& r, T* gt, const T* ht, const T* gp, const T* hp, int64_t len) {
  constexpr int V = Elem<T>::kVec;
  const int64_t tid = threadIdx.x;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(gt);
  uintptr_t diff = 0;
  if (r.use[1]) diff |= a0 ^ reinterpret_cast<uintptr_t>(ht);
  if (r.use[2]) diff |= a0 ^ reinterpret_cast<uintptr_t>(gp);
  if (r.use[3]) diff |= a0 ^ reinterpret_cast<uintptr_t>(hp);
  if ((diff & 15u) != 0) {
    for (int64_t i = tid; i < len; i += kThreads) {
      combine_scalar<T>(r, gt, ht, gp, hp, i);
    }
    return;
  }
  const ChunkSplit s = split_chunk<T>(a0, len);
  for (int64_t k = tid; k < s.n_scalar; k += kThreads) {
    combine_scalar<T>(r, gt, ht, gp, hp, scalar_index(s, k));
  }
  T* vgt = gt + s.head;
  const T* vht = ht + s.head;
  const T* vgp = gp + s.head;
  const T* vhp = hp + s.head;
  int64_t v = tid;
  for (; v + (kUnroll - 1) * kThreads < s.nvec; v += kUnroll * kThreads) {
    uint4 x[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      combine_load<T>(r, vgt, vht, vgp, vhp, (v + u * kThreads) * V, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      store16(vgt + (v + u * kThreads) * V, combine_vec<T>(r, x[u][0], x[u][1], x[u][2], x[u][3]));
    }
  }
  for (; v < s.nvec; v += kThreads) {
    uint4 x[4];
    combine_load<T>(r, vgt, vht, vgp, vhp, v * V, x);
    store16(vgt + v * V, combine_vec<T>(r, x[0], x[1], x[2], x[3]));
  }
}

// Pass 2: g_theta <- c1*gt + c2*ht + c3*gp + c4*hp on every chunk whose
// segment's row is not the identity. Grid-stride over chunks.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) segment_combine_chunks_kernel(
    T* g_theta,
    const T* h_theta,
    const T* g_phi,
    const T* h_phi,
    const int64_t* __restrict__ chunks, // [C, 3]: segment, start, length
    int64_t num_chunks,
    const float* __restrict__ coeffs) { // [S, 4]
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int64_t seg = chunks[c * kTableCols + 0];
    const int64_t start = chunks[c * kTableCols + 1];
    const int64_t len = chunks[c * kTableCols + 2];
    CombineRow r;
#pragma unroll
    for (int j = 0; j < kNumCoeffs; ++j) {
      r.c[j] = coeffs[seg * kNumCoeffs + j];
      r.use[j] = r.c[j] != 0.f; // false for +0 and -0, true for NaN
    }
    if (r.c[0] == 1.f && !r.use[1] && !r.use[2] && !r.use[3]) {
      continue; // identity row: the chunk keeps every bit, nothing is moved
    }
    combine_chunk<T, kThreads>(
        r, g_theta + start, h_theta + start, g_phi + start, h_phi + start, len);
  }
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

// The CUDA kernel of mdgd::segment_combine_ (the schema is defined in mdgd_kernels/_ops.py).
TORCH_LIBRARY_IMPL(mdgd, CUDA, m) {
  m.impl("segment_combine_", &mdgd::cuda::segment_combine_);
}
