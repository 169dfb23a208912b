// Shared by every compiled backend of the two mdgd:: ops: the shapes of the
// statistics and coefficient tables, and the input guards.
//
// The guards are TORCH_CHECKs only: the Python layer (mdgd_kernels/ops.py)
// already raises a ValueError naming the argument for every user error, so a
// failure here means the op was called directly with malformed tables.
//
// Plain ATen, no vector intrinsics: safe to include from .cu files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace mdgd {

// Columns of segment_gram's [S, 10] output, docs/math.md section 3:
// 0 gt.gt 1 gt.ht 2 ht.ht 3 gp.gp 4 gp.hp 5 hp.hp 6 gt.gp 7 gt.hp 8 ht.gp 9 ht.hp
constexpr int64_t kGramCols = 10;
// Columns of a chunk-table row: segment id, first element, length.
constexpr int64_t kChunkCols = 3;
// Columns of segment_combine_'s coefficient table: c1..c4 of gt, ht, gp, hp.
constexpr int64_t kCoeffCols = 4;

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The four gradient buffers: flat, contiguous, one dtype, one device, one length.
inline void check_buffers(
    const char* op,
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi) {
  const at::Tensor* bufs[4] = {&g_theta, &h_theta, &g_phi, &h_phi};
  const char* names[4] = {"g_theta", "h_theta", "g_phi", "h_phi"};
  TORCH_CHECK(
      is_supported_dtype(g_theta.scalar_type()),
      op, ": g_theta has dtype ", g_theta.scalar_type(),
      "; supported: BFloat16, Half, Float");
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& b = *bufs[i];
    TORCH_CHECK(b.dim() == 1, op, ": ", names[i], " must be 1-D, got ", b.sizes());
    TORCH_CHECK(b.is_contiguous(), op, ": ", names[i], " must be contiguous");
    TORCH_CHECK(
        b.scalar_type() == g_theta.scalar_type(), op, ": ", names[i], " has dtype ",
        b.scalar_type(), " but g_theta has ", g_theta.scalar_type());
    TORCH_CHECK(
        b.device() == g_theta.device(), op, ": ", names[i], " is on ", b.device(),
        " but g_theta is on ", g_theta.device());
    TORCH_CHECK(
        b.numel() == g_theta.numel(), op, ": ", names[i], " has ", b.numel(),
        " elements but g_theta has ", g_theta.numel());
  }
}

// An int64 table on the buffers' device with the given trailing shape.
inline void check_table(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& like,
    int64_t dim,
    int64_t cols,
    at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.sizes());
  if (dim == 2) {
    TORCH_CHECK(t.size(1) == cols, op, ": ", name, " must have ", cols, " columns, got ", t.sizes());
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(
      t.device() == like.device(), op, ": ", name, " is on ", t.device(),
      " but the buffers are on ", like.device());
}

// The arguments of segment_gram: buffers, chunk table, chunk_ptr[S + 1].
inline void check_gram_args(
    const char* op,
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const at::Tensor& chunks,
    const at::Tensor& chunk_ptr) {
  check_buffers(op, g_theta, h_theta, g_phi, h_phi);
  check_table(op, "chunks", chunks, g_theta, 2, kChunkCols, at::kLong);
  check_table(op, "chunk_ptr", chunk_ptr, g_theta, 1, 0, at::kLong);
  TORCH_CHECK(chunk_ptr.numel() >= 1, op, ": chunk_ptr must have S + 1 >= 1 entries");
}

// The arguments of segment_combine_: buffers, chunk table, coeffs[S, 4] float32.
inline void check_combine_args(
    const char* op,
    const at::Tensor& g_theta,
    const at::Tensor& h_theta,
    const at::Tensor& g_phi,
    const at::Tensor& h_phi,
    const at::Tensor& chunks,
    const at::Tensor& coeffs) {
  check_buffers(op, g_theta, h_theta, g_phi, h_phi);
  check_table(op, "chunks", chunks, g_theta, 2, kChunkCols, at::kLong);
  check_table(op, "coeffs", coeffs, g_theta, 2, kCoeffCols, at::kFloat);
}

} // namespace mdgd
