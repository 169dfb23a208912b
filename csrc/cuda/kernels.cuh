// The CUDA kernels of the two mdgd:: ops, as pure device code (no torch).
//
// Pass 1, segment_gram (docs/math.md section 3): for every segment s,
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
//
// Pass 2, segment_combine_ (docs/math.md section 5): for i in segment s,
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
//
// dtype contract: T is float, __half or __nv_bfloat16, the same for the four
// buffers. Offsets are int64. Bytes moved: pass 1 reads 4 * sizeof(T) per
// element (8 B in bf16) plus 40 B of partials per chunk; pass 2 reads
// sizeof(T) per element for each non-zero coefficient and writes sizeof(T)
// (at most 10 B in bf16), and nothing for an identity row.
//
// Memory access: 16-byte vector loads/stores (4 fp32 or 8 bf16/fp16) when the
// buffers involved share the same address modulo 16 at the chunk start (always
// true for buffers from the caching allocator, whatever the chunk start); the
// few elements before the first 16-byte boundary and after the last full vector
// go through a scalar path. Buffers with different misalignments (views at odd
// storage offsets) take a scalar, still coalesced, path over the whole chunk.
//
// Only CUDA headers here, and only explicit conversion intrinsics, so the file
// compiles under torch's -D__CUDA_NO_HALF_CONVERSIONS__ /
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__ / -D__CUDA_NO_HALF_OPERATORS__ flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mdgd {
namespace cuda {

constexpr int kStatCols = 10; // columns of the [S, 10] statistics
constexpr int kTableCols = 3; // chunk-table row: segment id, first element, length
constexpr int kNumCoeffs = 4; // coefficient row: c1..c4 of gt, ht, gp, hp
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kGramThreads = 256;
constexpr int kCombineThreads = 256;
constexpr int kFinalizeWarps = 4; // segments per finalize block
// At least 4 resident blocks (1,024 threads) per SM: caps the chunk kernels at
// 64 registers. Without it ptxas spills the fp32 gram kernel on sm_80 at 48.
constexpr int kMinBlocksPerSM = 4;
// Vectors in flight per thread and buffer in the main loops: with 4 buffers that
// is 2 x 64 B of loads per thread before the first use, enough to cover HBM
// latency on A100/H100 even when a partial last wave leaves SMs half empty.
constexpr int kUnroll = 2;

// ---------------------------------------------------------------------------
// Element <-> float32, one element and one 16-byte vector at a time.
// ---------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[kVec]) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(
        __float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
        __float_as_uint(f[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  // bf16 is the top half of a float32: widening is a shift or a mask, exact.
  __device__ __forceinline__ static void unpack2(unsigned w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static unsigned pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi); // .x = lo (low address)
    return static_cast<unsigned>(__bfloat16_as_ushort(h.x)) |
        (static_cast<unsigned>(__bfloat16_as_ushort(h.y)) << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[kVec]) {
    unpack2(r.x, f[0], f[1]);
    unpack2(r.y, f[2], f[3]);
    unpack2(r.z, f[4], f[5]);
    unpack2(r.w, f[6], f[7]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static void unpack2(unsigned w, float& lo, float& hi) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static unsigned pack2(float lo, float hi) {
    return static_cast<unsigned>(__half_as_ushort(__float2half_rn(lo))) |
        (static_cast<unsigned>(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[kVec]) {
    unpack2(r.x, f[0], f[1]);
    unpack2(r.y, f[2], f[3]);
    unpack2(r.z, f[4], f[5]);
    unpack2(r.w, f[6], f[7]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

// ---------------------------------------------------------------------------
// Chunk geometry: [0, head) scalar, head + [0, nvec * kVec) vectors, the rest
// scalar. head is the number of elements before the first 16-byte boundary.
// ---------------------------------------------------------------------------

struct ChunkSplit {
  int64_t head; // scalar elements before the vector body
  int64_t nvec; // 16-byte vectors in the body
  int64_t tail_start; // first element after the body
  int64_t n_scalar; // head + (len - tail_start)
};

template <typename T>
__device__ __forceinline__ ChunkSplit split_chunk(uintptr_t addr, int64_t len) {
  constexpr int V = Elem<T>::kVec;
  // addr is a multiple of sizeof(T) (torch data pointers are element aligned).
  int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
  head = head < len ? head : len;
  ChunkSplit s;
  s.head = head;
  s.nvec = (len - head) / V;
  s.tail_start = head + s.nvec * V;
  s.n_scalar = head + (len - s.tail_start);
  return s;
}

// The k-th scalar element of a split chunk: the head first, then the tail.
__device__ __forceinline__ int64_t scalar_index(const ChunkSplit& s, int64_t k) {
  return k < s.head ? k : s.tail_start + (k - s.head);
}

// 16-byte accesses through the PTX intrinsics, so each is one 128-bit
// instruction whatever the optimiser does to the surrounding floats (a plain
// uint4 store assembled from floats was split into 4 + 4 + 8 byte stores).
// Pass 1 only reads: the read-only (non-coherent) path. Pass 2 writes g_theta,
// so its loads use the ordinary cached path (.ca, the default for ld.global).
__device__ __forceinline__ uint4 load16_ro(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ uint4 load16(const void* p) {
  return __ldca(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ void store16(void* p, const uint4& v) {
  __stwb(reinterpret_cast<uint4*>(p), v); // .wb: the default write-back store
}

// ---------------------------------------------------------------------------
// Pass 1.
// ---------------------------------------------------------------------------

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
  constexpr int V = Elem<T>::kVec;
  float a[V], b[V], c[V], d[V];
  Elem<T>::unpack(rgt, a);
  Elem<T>::unpack(rht, b);
  Elem<T>::unpack(rgp, c);
  Elem<T>::unpack(rhp, d);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    gram_accumulate(acc, a[e], b[e], c[e], d[e]);
  }
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

// Sum each of the kStatCols accumulators over the warp into lane 0 (a fixed
// shuffle tree: the same order on every call). T is float or double.
template <typename T>
__device__ __forceinline__ void warp_reduce(T (&acc)[kStatCols]) {
#pragma unroll
  for (int j = 0; j < kStatCols; ++j) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      acc[j] += __shfl_down_sync(kFullMask, acc[j], off);
    }
  }
}

// Sum acc over the block (fixed order: shuffle tree in each warp, then warp 0
// sums the warp totals in warp order) and write the 10 totals to out.
template <int kThreads>
__device__ __forceinline__ void block_reduce_store(float (&acc)[kStatCols], float* out) {
  static_assert(kThreads % kWarp == 0 && kThreads <= kWarp * kWarp, "block size");
  constexpr int kWarps = kThreads / kWarp;
  __shared__ float warp_sums[kWarps][kStatCols];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  warp_reduce(acc);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kStatCols; ++j) {
      warp_sums[warp][j] = acc[j];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kStatCols; ++j) {
      float x = lane < kWarps ? warp_sums[lane][j] : 0.f;
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) {
        x += __shfl_down_sync(kFullMask, x, off);
      }
      if (lane == 0) {
        out[j] = x;
      }
    }
  }
  __syncthreads(); // warp_sums is reused by the next chunk of a grid-stride loop
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

// ---------------------------------------------------------------------------
// Pass 2.
// ---------------------------------------------------------------------------

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
  constexpr int V = Elem<T>::kVec;
  float a[V], b[V], c[V], d[V], o[V];
  Elem<T>::unpack(rgt, a);
  Elem<T>::unpack(rht, b);
  Elem<T>::unpack(rgp, c);
  Elem<T>::unpack(rhp, d);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    o[e] = combine_one(r, a[e], b[e], c[e], d[e]);
  }
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

} // namespace cuda
} // namespace mdgd
