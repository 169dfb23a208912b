// The device code shared by the two CUDA passes (segment_gram.cu and
// segment_combine.cu): the chunk table's layout, element <-> float32
// conversion, the split of a chunk into a scalar head, 16-byte vectors and a
// scalar tail, the 16-byte loads and stores, and the fixed-order warp and
// block sums. The CPU kernels' counterpart is csrc/cpu/vec.h.
//
// dtype contract: T is float, __half or __nv_bfloat16, the same for the four
// buffers. Offsets are int64.
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
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

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

// The 16-bit types: each 32-bit word of a vector holds two elements, the first
// (lower address) in the low half. Word supplies unpack2 and pack2 for one word.
template <typename Word>
struct Elem16 {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[kVec]) {
    Word::unpack2(r.x, f[0], f[1]);
    Word::unpack2(r.y, f[2], f[3]);
    Word::unpack2(r.z, f[4], f[5]);
    Word::unpack2(r.w, f[6], f[7]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(
        Word::pack2(f[0], f[1]), Word::pack2(f[2], f[3]), Word::pack2(f[4], f[5]),
        Word::pack2(f[6], f[7]));
  }
};

template <>
struct Elem<__nv_bfloat16> : Elem16<Elem<__nv_bfloat16>> {
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
};

template <>
struct Elem<__half> : Elem16<Elem<__half>> {
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
};

// Widens one 16-byte vector of each buffer (gt, ht, gp, hp) to float32 and
// calls f(e, gt, ht, gp, hp) for each element e of the vector, in order.
template <typename T, typename F>
__device__ __forceinline__ void for_each_element(
    const uint4& rgt, const uint4& rht, const uint4& rgp, const uint4& rhp, F&& f) {
  constexpr int V = Elem<T>::kVec;
  float a[V], b[V], c[V], d[V];
  Elem<T>::unpack(rgt, a);
  Elem<T>::unpack(rht, b);
  Elem<T>::unpack(rgp, c);
  Elem<T>::unpack(rhp, d);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    f(e, a[e], b[e], c[e], d[e]);
  }
}

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
// Reductions in a fixed order over the warp and the block.
// ---------------------------------------------------------------------------

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

} // namespace cuda
} // namespace mdgd
