"""The two low-level ops, defined once with ``torch.library``.

* ``mdgd::segment_gram(g_theta, h_theta, g_phi, h_phi, chunks, chunk_ptr) -> Tensor``
  pass 1, the ``[S, 10]`` float32 Gram statistics.
* ``mdgd::segment_combine_(g_theta!, h_theta, g_phi, h_phi, chunks, coeffs) -> ()``
  pass 2, ``g_theta <- c1*gt + c2*ht + c3*gp + c4*hp`` per segment, in place.

The composed-torch backend is registered as the ``CompositeExplicitAutograd``
kernel, so every device works; the compiled extension (``mdgd_kernels._C``) adds
CPU and CUDA kernels with ``TORCH_LIBRARY_IMPL``, which take precedence. Fake
(meta) kernels make both ops traceable by ``torch.compile``. The Triton kernels
are separate ops (``mdgd::segment_gram_triton`` ...), defined in
``mdgd_kernels.triton``, because they share the CUDA dispatch key with csrc/.

``backend="torch"`` is a pair of separate ops too, ``mdgd::segment_gram_torch``
and ``mdgd::segment_combine_torch_``, with only the composed-torch kernel: once
the extension has taken the CPU key, ``mdgd::segment_gram`` no longer reaches
it, and as an opaque op under ``torch.compile`` it runs the same kernel as in
eager mode, so compiled code gives the same bits (inductor would reorder the
float64 ``index_add_`` of an inlined one).
"""

from __future__ import annotations

import torch

from . import torch_backend

GRAM_SCHEMA = (
    "(Tensor g_theta, Tensor h_theta, Tensor g_phi, Tensor h_phi, "
    "Tensor chunks, Tensor chunk_ptr) -> Tensor"
)
COMBINE_SCHEMA = (
    "(Tensor(a!) g_theta, Tensor h_theta, Tensor g_phi, Tensor h_phi, "
    "Tensor chunks, Tensor coeffs) -> ()"
)

_lib = torch.library.Library("mdgd", "DEF")


def gram_fake(g_theta, h_theta, g_phi, h_phi, chunks, chunk_ptr):
    return g_theta.new_empty((chunk_ptr.shape[0] - 1, 10), dtype=torch.float32)


def combine_fake(g_theta, h_theta, g_phi, h_phi, chunks, coeffs):
    return None


def _define(suffix: str) -> None:
    """``mdgd::segment_gram{suffix}`` and ``mdgd::segment_combine{suffix}_``."""
    for name, schema, kernel, fake in (
        (f"segment_gram{suffix}", GRAM_SCHEMA, torch_backend.segment_gram, gram_fake),
        (f"segment_combine{suffix}_", COMBINE_SCHEMA, torch_backend.segment_combine_, combine_fake),
    ):
        _lib.define(name + schema)
        _lib.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"mdgd::{name}", fake, lib=_lib)


_define("")  # the public ops: the compiled extension adds CPU and CUDA kernels
_define("_torch")  # backend="torch": the composed-torch kernel on every device
