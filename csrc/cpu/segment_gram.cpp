// Pass 1 on CPU: per-segment Gram statistics of the four gradient buffers.
//
//   stats[s] = (gt.gt, gt.ht, ht.ht, gp.gp, gp.hp, hp.hp, gt.gp, gt.hp, ht.gp, ht.hp)
//
// over the elements of segment s (docs/math.md section 3; gt = g_theta, ht = h_theta,
// gp = g_phi, hp = h_phi). Buffers: bf16, fp16 or fp32, widened to float32 in
// registers; output float32 [S, 10]. Bytes moved: each buffer read once, 4N
// elements (8N bytes in bf16), plus 40 bytes per chunk of partials.
//
// Determinism: one task reduces one chunk (<= 64K elements) into ten float32
// partials with a fixed instruction order; the partials of a segment are then
// summed in chunk order in double. No value depends on which thread ran which
// chunk, so the bits are the same on every run and for every thread count.
#include "cpu/vec.h" // first: selects at::vec's code path

#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mdgd_common.h"

namespace mdgd::cpu {
namespace {

// Elements summed in float32 registers before they are folded into the chunk's
// running sums: each lane's running sum then has at most kBlock / kVecLen terms,
// which keeps the float32 rounding error near sqrt(n) * 2^-24 of the norms.
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kStep == 0, "a block is a whole number of steps");

// Below this many elements a whole call is cheaper on one thread.
constexpr int64_t kSerialBelow = 1 << 15;

using Acc = Vec[kGramCols];

// The ten products of one step, in the column order of the output. Ten
// independent FMA chains keep both FMA pipes busy without extra unrolling
// (ten accumulators + four operands fit the sixteen AVX2 registers).
inline void accumulate(Acc& a, const Vec& gt, const Vec& ht, const Vec& gp, const Vec& hp) {
  using at::vec::fmadd;
  a[0] = fmadd(gt, gt, a[0]);
  a[1] = fmadd(gt, ht, a[1]);
  a[2] = fmadd(ht, ht, a[2]);
  a[3] = fmadd(gp, gp, a[3]);
  a[4] = fmadd(gp, hp, a[4]);
  a[5] = fmadd(hp, hp, a[5]);
  a[6] = fmadd(gt, gp, a[6]);
  a[7] = fmadd(gt, hp, a[7]);
  a[8] = fmadd(ht, gp, a[8]);
  a[9] = fmadd(ht, hp, a[9]);
}

// Sum of the lanes in a fixed pairwise order.
inline float lane_sum(const Vec& v) {
  float x[kVecLen];
  v.store(x);
  int64_t width = kVecLen;
  while (width > 1) {
    width /= 2;
    for (int64_t i = 0; i < width; ++i) {
      x[i] += x[i + width];
    }
  }
  return x[0];
}

// The ten float32 partials of the n elements at the given pointers.
template <typename T>
void gram_chunk(const T* gt, const T* ht, const T* gp, const T* hp, int64_t n, float* out) {
  Acc total;
  for (auto& v : total) {
    v = Vec(0.f);
  }
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    Acc a;
    for (auto& v : a) {
      v = Vec(0.f);
    }
    Vec x0, x1, x2, x3;
    int64_t i = b;
    for (; i + kStep <= end; i += kStep) {
      // One float vector of each buffer at a time: ten accumulators and four
      // operands stay in the sixteen AVX2 registers (no spills).
      for (int64_t h = i; h < i + kStep; h += kVecLen) {
        load_vec(gt + h, x0);
        load_vec(ht + h, x1);
        load_vec(gp + h, x2);
        load_vec(hp + h, x3);
        accumulate(a, x0, x1, x2, x3);
      }
    }
    if (i < end) { // only in the chunk's last block
      Vec x0lo, x0hi, x1lo, x1hi, x2lo, x2hi, x3lo, x3hi;
      load_tail(gt + i, end - i, x0lo, x0hi);
      load_tail(ht + i, end - i, x1lo, x1hi);
      load_tail(gp + i, end - i, x2lo, x2hi);
      load_tail(hp + i, end - i, x3lo, x3hi);
      accumulate(a, x0lo, x1lo, x2lo, x3lo);
      accumulate(a, x0hi, x1hi, x2hi, x3hi);
    }
    for (int64_t k = 0; k < kGramCols; ++k) {
      total[k] = total[k] + a[k];
    }
  }
  for (int64_t k = 0; k < kGramCols; ++k) {
    out[k] = lane_sum(total[k]);
  }
}

template <typename T>
void gram_all_chunks(
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const int64_t* chunks,
    int64_t num_chunks,
    float* partial) {
  const T* gt = g_theta.const_data_ptr<T>();
  const T* ht = h_theta.const_data_ptr<T>();
  const T* gp = g_phi.const_data_ptr<T>();
  const T* hp = h_phi.const_data_ptr<T>();
  const int64_t grain = g_theta.numel() < kSerialBelow ? num_chunks : 1;
  at::parallel_for(0, num_chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t start = chunks[c * kChunkCols + 1];
      const int64_t len = chunks[c * kChunkCols + 2];
      gram_chunk(gt + start, ht + start, gp + start, hp + start, len, partial + c * kGramCols);
    }
  });
}

} // namespace

at::Tensor segment_gram(
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const at::Tensor& chunks,
    const at::Tensor& chunk_ptr) {
  constexpr const char* op = "mdgd::segment_gram";
  check_gram_args(op, g_theta, h_theta, g_phi, h_phi, chunks, chunk_ptr);
  TORCH_CHECK(g_theta.device().is_cpu(), op, ": the CPU kernel got tensors on ", g_theta.device());

  const int64_t num_segments = chunk_ptr.numel() - 1;
  const int64_t num_chunks = chunks.size(0);
  const int64_t* ptr = chunk_ptr.const_data_ptr<int64_t>();
  const int64_t* rows = chunks.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(
        0 <= ptr[s] && ptr[s] <= ptr[s + 1] && ptr[s + 1] <= num_chunks, op,
        ": chunk_ptr must be non-decreasing within [0, ", num_chunks, "], got ", ptr[s], ", ",
        ptr[s + 1], " at segment ", s);
  }
  check_chunk_rows(op, rows, num_chunks, g_theta.numel(), num_segments);

  at::Tensor out = at::zeros({num_segments, kGramCols}, g_theta.options().dtype(at::kFloat));
  if (num_chunks == 0) {
    return out;
  }
  std::vector<float> partial(num_chunks * kGramCols);
  dispatch_dtype(g_theta.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    gram_all_chunks<T>(g_theta, h_theta, g_phi, h_phi, rows, num_chunks, partial.data());
  });

  // Cross-chunk sums in chunk order, in double: O(C), serial, deterministic.
  float* o = out.mutable_data_ptr<float>();
  for (int64_t s = 0; s < num_segments; ++s) {
    double acc[kGramCols] = {};
    for (int64_t c = ptr[s]; c < ptr[s + 1]; ++c) {
      for (int64_t k = 0; k < kGramCols; ++k) {
        acc[k] += partial[c * kGramCols + k];
      }
    }
    for (int64_t k = 0; k < kGramCols; ++k) {
      o[s * kGramCols + k] = static_cast<float>(acc[k]);
    }
  }
  return out;
}

} // namespace mdgd::cpu

// The CPU kernel of mdgd::segment_gram (the schema is defined in mdgd_kernels/_ops.py).
TORCH_LIBRARY_IMPL(mdgd, CPU, m) {
  m.impl("segment_gram", &mdgd::cpu::segment_gram);
}
