// Pass 1 on CUDA, segment_gram (docs/math.md section 3): for every segment s,
//
//   stats[s] = (gt.gt, gt.ht, ht.ht, gp.gp, gp.hp, hp.hp, gt.gp, gt.hp, ht.gp, ht.hp)
//
// over the elements of s (gt = g_theta, ht = h_theta, gp = g_phi, hp = h_phi),
// products and per-thread sums in float32. Two launches, no float atomics, so the
// result is the same bits on every run:
//   1. segment_gram_chunks_kernel: one block per chunk of the chunk table
//      (mdgd_kernels/layout.py, at most 65,536 elements, inside one segment);
//      each thread sums its strided share of the chunk, a fixed warp-shuffle tree
//      and a fixed cross-warp sum reduce the block, and the block writes one row
//      of the float32 partials [C, 10].
//   2. segment_gram_finalize_kernel: one warp per segment sums the segment's
//      partial rows (chunk_ptr[s] .. chunk_ptr[s+1]) in float64, lane-strided in
//      chunk order, then a fixed shuffle tree; an empty segment gets zeros.
// Bytes moved: 4 * sizeof(T) per element (8 B in bf16) plus 40 B of partials
// per chunk.
//
// The kernels, then the torch glue (argument checks, scratch allocation, the
// launches on the current stream) and the registration for the CUDA key.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/chunk_io.cuh"
#include "cuda/launch.h"
#include "mdgd_common.h"

namespace mdgd {
namespace cuda {

constexpr int kGramThreads = 256;
constexpr int kFinalizeWarps = 4; // segments per finalize block

// The 10 products of one element, in the column order of docs/math.md section 3.
__device__ __forceinline__ void gram_accumulate(
    float (&acc)[kStatCols], float gt, float ht, float gp, float hp) {
  acc[0] = fmaf(gt, gt, acc[0]);
  acc[1] = fmaf(gt, ht, acc[1]);
  acc[2] = fmaf(ht, ht, acc[2]);
  acc[3] = fmaf(gp, gp, acc[3]);
  acc[4] = fmaf(gp, hp, acc[4]);
  acc[5] = fmaf(hp, hp, acc[5]);
  acc[6] = fmaf(gt, gp, acc[6]);
  acc[7] = fmaf(gt, hp, acc[7]);
  acc[8] = fmaf(ht, gp, acc[8]);
  acc[9] = fmaf(ht, hp, acc[9]);
}

template <typename T>
__device__ __forceinline__ void gram_accumulate_vec(
    float (&acc)[kStatCols], const uint4& rgt, const uint4& rht, const uint4& rgp,
    const uint4& rhp) {
  for_each_element<T>(rgt, rht, rgp, rhp, [&](int, float gt, float ht, float gp, float hp) {
    gram_accumulate(acc, gt, ht, gp, hp);
  });
}

// This thread's share of one chunk (the buffers already offset to its start).
template <typename T, int kThreads>
__device__ __forceinline__ void gram_chunk(
    const T* __restrict__ gt,
    const T* __restrict__ ht,
    const T* __restrict__ gp,
    const T* __restrict__ hp,
    int64_t len,
    float (&acc)[kStatCols]) {
  constexpr int V = Elem<T>::kVec;
  const int64_t tid = threadIdx.x;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(gt);
  const uintptr_t diff = (a0 ^ reinterpret_cast<uintptr_t>(ht)) |
      (a0 ^ reinterpret_cast<uintptr_t>(gp)) | (a0 ^ reinterpret_cast<uintptr_t>(hp));
  if ((diff & 15u) != 0) {
    // The buffers disagree modulo 16 bytes: no common vector alignment exists.
    for (int64_t i = tid; i < len; i += kThreads) {
      gram_accumulate(
          acc, Elem<T>::to_float(gt[i]), Elem<T>::to_float(ht[i]), Elem<T>::to_float(gp[i]),
          Elem<T>::to_float(hp[i]));
    }
    return;
  }
  const ChunkSplit s = split_chunk<T>(a0, len);
  for (int64_t k = tid; k < s.n_scalar; k += kThreads) {
    const int64_t i = scalar_index(s, k);
    gram_accumulate(
        acc, Elem<T>::to_float(gt[i]), Elem<T>::to_float(ht[i]), Elem<T>::to_float(gp[i]),
        Elem<T>::to_float(hp[i]));
  }
  const T* vgt = gt + s.head;
  const T* vht = ht + s.head;
  const T* vgp = gp + s.head;
  const T* vhp = hp + s.head;
  int64_t v = tid;
  // Issue all kUnroll x 4 loads before the first use, so they overlap.
  for (; v + (kUnroll - 1) * kThreads < s.nvec; v += kUnroll * kThreads) {
    uint4 r[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t off = (v + u * kThreads) * V;
      r[u][0] = load16_ro(vgt + off);
      r[u][1] = load16_ro(vht + off);
      r[u][2] = load16_ro(vgp + off);
      r[u][3] = load16_ro(vhp + off);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      gram_accumulate_vec<T>(acc, r[u][0], r[u][1], r[u][2], r[u][3]);
    }
  }
  for (; v < s.nvec; v += kThreads) {
    const int64_t off = v * V;
    gram_accumulate_vec<T>(
        acc, load16_ro(vgt + off), load16_ro(vht + off), load16_ro(vgp + off),
        load16_ro(vhp + off));
  }
}

// Pass 1a: partials[c, :] = the 10 sums over chunk c. Grid-stride over chunks.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) segment_gram_chunks_kernel(
    const T* __restrict__ g_theta,
    const T* __restrict__ h_theta,
    const T* __restrict__ g_phi,
    const T* __restrict__ h_phi,
    const int64_t* __restrict__ chunks, // [C, 3]: segment, start, length
    int64_t num_chunks,
    float* __restrict__ partials) { // [C, 10]
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int64_t start = chunks[c * kTableCols + 1];
    const int64_t len = chunks[c * kTableCols + 2];
    float acc[kStatCols];
#pragma unroll
    for (int j = 0; j < kStatCols; ++j) {
      acc[j] = 0.f;
    }
    gram_chunk<T, kThreads>(
        g_theta + start, h_theta + start, g_phi + start, h_phi + start, len, acc);
    block_reduce_store<kThreads>(acc, partials + c * kStatCols);
  }
}

// Pass 1b: out[s, :] = sum of partials[chunk_ptr[s] : chunk_ptr[s+1], :], in
// float64, one warp per segment (grid-stride over segments). Lane l adds the
// chunks l, l + 32, ... of the segment in order; a fixed shuffle tree adds the
// lanes. Deterministic for a given chunk table; zeros for an empty segment.
template <int kWarps>
__global__ void __launch_bounds__(kWarps* kWarp) segment_gram_finalize_kernel(
    const float* __restrict__ partials, // [C, 10]
    const int64_t* __restrict__ chunk_ptr, // [S + 1]
    int64_t num_segments,
    float* __restrict__ out) { // [S, 10]
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = threadIdx.x / kWarp;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(kWarps) + warp; s < num_segments;
       s += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t lo = chunk_ptr[s];
    const int64_t hi = chunk_ptr[s + 1];
    double acc[kStatCols];
#pragma unroll
    for (int j = 0; j < kStatCols; ++j) {
      acc[j] = 0.0;
    }
    for (int64_t k = lo + lane; k < hi; k += kWarp) {
      const float* row = partials + k * kStatCols;
#pragma unroll
      for (int j = 0; j < kStatCols; ++j) {
        acc[j] += static_cast<double>(row[j]);
      }
    }
    warp_reduce(acc);
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kStatCols; ++j) {
        out[s * kStatCols + j] = static_cast<float>(acc[j]);
      }
    }
  }
}

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

} // namespace cuda
} // namespace mdgd

// The CUDA kernel of mdgd::segment_gram (the schema is defined in mdgd_kernels/_ops.py).
TORCH_LIBRARY_IMPL(mdgd, CUDA, m) {
  m.impl("segment_gram", &mdgd::cuda::segment_gram);
}
