// Pass 2 on CPU: the update direction, written in place into g_theta.
//
//   g_theta[i] <- c1*gt[i] + c2*ht[i] + c3*gp[i] + c4*hp[i]     for i in segment s
//
// with (c1, c2, c3, c4) = coeffs[s] (float32 [S, 4], docs/math.md section 5), computed in
// float32 and rounded once to the buffers' dtype (bf16, fp16 or fp32).
// Two rules make masked-out and skipped segments free (mdgd_kernels/coeffs.py):
//   * a coefficient that is exactly 0 (or -0) means its buffer is not read, so a
//     NaN/Inf there does not leak into d;
//   * a row exactly (1, 0, 0, 0) means the segment is not touched at all: no
//     read, no write, every bit (-0.0 and NaN payloads included) is kept.
// Bytes moved: per written element, one read of each buffer with a non-zero
// coefficient and one write of g_theta (at most 10 bytes in bf16).
//
// One task per chunk; each chunk picks the loop specialised for its set of
// non-zero coefficients, so a zero coefficient costs neither a load nor an FMA.
#include "cpu/vec.h" // first: selects at::vec's code path

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <utility>

#include "mdgd_common.h"

namespace mdgd::cpu {
namespace {

constexpr int64_t kSerialBelow = 1 << 15;

// Bit j of a mask: coefficient j is non-zero, so buffer j is read.
constexpr int kNumMasks = 1 << kCoeffCols;

template <int kMask, bool kFull, typename T>
inline void combine_step(
    T* gt, const T* ht, const T* gp, const T* hp, const Vec (&c)[kCoeffCols], int64_t n) {
  const T* src[kCoeffCols] = {gt, ht, gp, hp};
  // Start from +0 like the torch backend (d = zeros; d += c_j * x_j), so that a
  // segment whose coefficients are all zero is written with +0.
  Vec lo(0.f), hi(0.f), xlo, xhi;
  for (int j = 0; j < kCoeffCols; ++j) { // unrolled: j and kMask are constants
    if ((kMask >> j) & 1) {
      if constexpr (kFull) {
        load_vec(src[j], xlo); // two widening loads: no 128-bit lane extract
        load_vec(src[j] + kVecLen, xhi);
      } else {
        load_tail(src[j], n, xlo, xhi);
      }
      lo = at::vec::fmadd(c[j], xlo, lo);
      hi = at::vec::fmadd(c[j], xhi, hi);
    }
  }
  if constexpr (kFull) {
    store_step(gt, lo, hi);
  } else {
    store_tail(gt, n, lo, hi);
  }
}

template <int kMask, typename T>
void combine_chunk(T* gt, const T* ht, const T* gp, const T* hp, const float* coef, int64_t n) {
  const Vec c[kCoeffCols] = {Vec(coef[0]), Vec(coef[1]), Vec(coef[2]), Vec(coef[3])};
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    combine_step<kMask, true>(gt + i, ht + i, gp + i, hp + i, c, kStep);
  }
  if (i < n) {
    combine_step<kMask, false>(gt + i, ht + i, gp + i, hp + i, c, n - i);
  }
}

template <typename T>
using ChunkFn = void (*)(T*, const T*, const T*, const T*, const float*, int64_t);

template <typename T, int... kMasks>
constexpr std::array<ChunkFn<T>, kNumMasks> make_table(std::integer_sequence<int, kMasks...>) {
  return {&combine_chunk<kMasks, T>...};
}

template <typename T>
void combine_all_chunks(
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const int64_t* chunks,
    int64_t num_chunks,
    const float* coeffs) {
  static constexpr auto table = make_table<T>(std::make_integer_sequence<int, kNumMasks>{});
  T* gt = g_theta.mutable_data_ptr<T>();
  const T* ht = h_theta.const_data_ptr<T>();
  const T* gp = g_phi.const_data_ptr<T>();
  const T* hp = h_phi.const_data_ptr<T>();
  const int64_t grain = g_theta.numel() < kSerialBelow ? num_chunks : 1;
  at::parallel_for(0, num_chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t* row = chunks + c * kChunkCols;
      const int64_t start = row[1];
      const int64_t len = row[2];
      const float* coef = coeffs + row[0] * kCoeffCols;
      // == treats -0 as 0, like the torch backend's `coeffs == identity`.
      if (coef[0] == 1.f && coef[1] == 0.f && coef[2] == 0.f && coef[3] == 0.f) {
        continue;
      }
      int mask = 0;
      for (int j = 0; j < kCoeffCols; ++j) {
        mask |= (coef[j] != 0.f) << j; // NaN != 0: a NaN coefficient reads its buffer
      }
      table[mask](gt + start, ht + start, gp + start, hp + start, coef, len);
    }
  });
}

} // namespace

void segment_combine_(
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const at::Tensor& chunks,
    const at::Tensor& coeffs) {
  constexpr const char* op = "mdgd::segment_combine_";
  check_combine_args(op, g_theta, h_theta, g_phi, h_phi, chunks, coeffs);
  TORCH_CHECK(g_theta.device().is_cpu(), op, ": the CPU kernel got tensors on ", g_theta.device());

  const int64_t num_chunks = chunks.size(0);
  const int64_t* rows = chunks.const_data_ptr<int64_t>();
  check_chunk_rows(op, rows, num_chunks, g_theta.numel(), coeffs.size(0));
  if (num_chunks == 0) {
    return;
  }
  const float* coef = coeffs.const_data_ptr<float>();
  dispatch_dtype(g_theta.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    combine_all_chunks<T>(g_theta, h_theta, g_phi, h_phi, rows, num_chunks, coef);
  });
}

} // namespace mdgd::cpu

// The CPU kernel of mdgd::segment_combine_ (the schema is defined in mdgd_kernels/_ops.py).
TORCH_LIBRARY_IMPL(mdgd, CPU, m) {
  m.impl("segment_combine_", &mdgd::cpu::segment_combine_);
}
