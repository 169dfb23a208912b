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
_lib.define("segment_gram" + GRAM_SCHEMA)
_lib.define("segment_combine_" + COMBINE_SCHEMA)
_lib.impl("segment_gram", torch_backend.segment_gram, "CompositeExplicitAutograd")
_lib.impl("segment_combine_", torch_backend.segment_combine_, "CompositeExplicitAutograd")


def gram_fake(g_theta, h_theta, g_phi, h_phi, chunks, chunk_ptr):
    return g_theta.new_empty((chunk_ptr.shape[0] - 1, 10), dtype=torch.float32)


def combine_fake(g_theta, h_theta, g_phi, h_phi, chunks, coeffs):
    return None


torch.library.register_fake("mdgd::segment_gram", gram_fake, lib=_lib)
torch.library.register_fake("mdgd::segment_combine_", combine_fake, lib=_lib)
