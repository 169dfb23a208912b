// Vectorised float32 views of bf16/fp16/fp32 buffers for the CPU kernels, and
// the host-side check of the chunk table.
//
// Include this header FIRST in a CPU kernel file: it decides which code path of
// ATen's header-only at::vec library the file gets, and that has to happen
// before any ATen header pulls at::vec in.
//
// * setup.py compiles with -mavx2 -mfma -mf16c; ATen selects its AVX2
//   Vectorized<float> only when CPU_CAPABILITY_AVX2 is defined (inside ATen the
//   build system defines it per kernel file), so we define it ourselves. Without
//   those flags (MDGD_NATIVE=0) the portable at::vec fallback is used instead.
// * at::vec puts everything in `inline namespace CPU_CAPABILITY`. Its inline
//   functions are emitted as weak symbols; if ours had the same mangled names as
//   libtorch's copies compiled for another instruction set, the dynamic linker
//   could bind our calls to theirs (an ODR violation with a different calling
//   convention). A namespace of our own rules that out.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY mdgd_cpu
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace mdgd::cpu {

using Vec = at::vec::Vectorized<float>;
// Elements per step: two float vectors, i.e. one 256-bit load of a 16-bit dtype.
constexpr int64_t kVecLen = Vec::size();
constexpr int64_t kStep = 2 * kVecLen;

// ---------------------------------------------------------------- loads

// One float vector (kVecLen elements). For 16-bit dtypes the conversion folds
// the 128-bit load into the widening instruction and needs no lane extract.
inline void load_vec(const float* p, Vec& x) {
  x = Vec::loadu(p);
}
inline void load_vec(const c10::BFloat16* p, Vec& x) {
  at::vec::load_fp32_from_bf16(p, x);
}
inline void load_vec(const c10::Half* p, Vec& x) {
  at::vec::load_fp32_from_fp16(p, x);
}

// Two float vectors (kStep elements).

inline void load_step(const float* p, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p);
  hi = Vec::loadu(p + kVecLen);
}
inline void load_step(const c10::BFloat16* p, Vec& lo, Vec& hi) {
  at::vec::load_fp32_from_bf16(p, lo, hi);
}
inline void load_step(const c10::Half* p, Vec& lo, Vec& hi) {
  at::vec::load_fp32_from_fp16(p, lo, hi);
}

// The last n < kStep elements of a chunk, padded with +0 (which adds nothing to
// a dot product). Never reads past the end of the buffer.
template <typename T>
inline void load_tail(const T* p, int64_t n, Vec& lo, Vec& hi) {
  T buf[kStep];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
  load_step(buf, lo, hi);
}

// ---------------------------------------------------------------- stores
// Rounding float32 -> bf16/fp16 is round-to-nearest-even (at::vec), the same
// rounding as torch's .to(dtype).

inline void store_step(float* p, const Vec& lo, const Vec& hi) {
  lo.store(p);
  hi.store(p + kVecLen);
}
inline void store_step(c10::BFloat16* p, const Vec& lo, const Vec& hi) {
  at::vec::convert_float_bfloat16(lo, hi).store(p);
}
inline void store_step(c10::Half* p, const Vec& lo, const Vec& hi) {
  at::vec::convert_float_half(lo, hi).store(p);
}

template <typename T>
inline void store_tail(T* p, int64_t n, const Vec& lo, const Vec& hi) {
  T buf[kStep];
  store_step(buf, lo, hi);
  std::memcpy(static_cast<void*>(p), buf, n * sizeof(T));
}

// ---------------------------------------------------------------- dtype dispatch

template <typename T>
struct DtypeTag {
  using type = T;
};

// Calls f(DtypeTag<T>{}) with the C++ type of a checked buffer dtype.
template <typename F>
inline void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(DtypeTag<float>{});
      break;
    case at::kBFloat16:
      f(DtypeTag<c10::BFloat16>{});
      break;
    case at::kHalf:
      f(DtypeTag<c10::Half>{});
      break;
    default:
      TORCH_CHECK(false, "mdgd: unsupported dtype ", dtype);
  }
}

// ---------------------------------------------------------------- chunk table

// Every chunk row (segment, start, length) must lie inside the buffer and name
// an existing segment: the kernels index raw pointers with it. O(C), serial,
// a few microseconds for a whole model.
inline void check_chunk_rows(
    const char* op, const int64_t* chunks, int64_t num_chunks, int64_t numel, int64_t num_segments) {
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t seg = chunks[c * 3 + 0];
    const int64_t start = chunks[c * 3 + 1];
    const int64_t len = chunks[c * 3 + 2];
    TORCH_CHECK(
        seg >= 0 && seg < num_segments, op, ": chunk ", c, " names segment ", seg, " of ",
        num_segments);
    TORCH_CHECK(
        start >= 0 && len >= 0 && start <= numel - len, op, ": chunk ", c, " covers elements ",
        start, "..", start + len, " outside the buffer of ", numel);
  }
}

} // namespace mdgd::cpu
