"""The Triton backend of the two passes (``backend="triton"``).

* ``segment_gram(g_theta, h_theta, g_phi, h_phi, chunks, chunk_ptr) -> Tensor[S, 10]``
  (``torch.ops.mdgd.segment_gram_triton``, pass 1, :mod:`.gram`)
* ``segment_combine_(g_theta, h_theta, g_phi, h_phi, chunks, coeffs) -> None``
  (``torch.ops.mdgd.segment_combine_triton_``, pass 2, mutates ``g_theta``, :mod:`.combine`)

Both are ``torch.library.triton_op`` custom ops whose kernels are launched
through ``wrap_triton``, so ``torch.compile`` traces into them. They are separate
ops from ``mdgd::segment_gram`` / ``mdgd::segment_combine_`` because csrc/
registers those for the CUDA dispatch key. Arguments are the raw chunk table of
:mod:`mdgd_kernels.layout`; the public API (:func:`mdgd_kernels.segment_gram`,
:func:`mdgd_kernels.mdgd_direction_`) checks inputs and dispatches here.

Importing this package never fails: without a usable ``triton`` (or a torch too
old for ``triton_op``) ``available`` is False, ``error`` keeps the exception and
both entry points raise it when called. With ``TRITON_INTERPRET=1`` (set before
this package is imported) the kernels run in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

available = False
error: Exception | None = None

try:
    from .combine import segment_combine_
    from .gram import segment_gram

    available = True
except Exception as exc:  # ImportError (no triton), AttributeError (old torch), ...
    error = exc

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"the Triton backend is unavailable: {error!r}") from error

    segment_gram: Callable[..., torch.Tensor] = _unavailable  # type: ignore[no-redef]
    segment_combine_: Callable[..., None] = _unavailable  # type: ignore[no-redef]

__all__ = ["available", "error", "segment_combine_", "segment_gram"]
