"""Fused MDGD ops: per-segment Gram statistics and the in-place update direction.

Public API::

    stats = segment_gram(g_theta, h_theta, g_phi, h_phi, sizes)            # [S, 10] float32
    res = mdgd_direction_(g_theta, h_theta, g_phi, h_phi, sizes, mode="mdgd")
    # g_theta now holds the direction d; res.cos, res.k, res.mask, res.skipped

The math and the op contract are stated in ``docs/math.md`` and written out in
float64 in :mod:`mdgd_kernels.reference`. This module only re-exports:

* :mod:`mdgd_kernels.ops`: the public ops, their argument checks, ``MDGDResult``;
* :mod:`mdgd_kernels.backends`: which backend runs (``"triton"``, ``"cuda"``,
  ``"cpu"``, ``"torch"``; ``backend=None`` picks the best available one for the
  tensors' device, the environment variable ``MDGD_BACKEND`` overrides it);
* :mod:`mdgd_kernels.coeffs`: the statistics order, the coefficients, the mask;
* :mod:`mdgd_kernels.layout`: the cached segment layout and chunk table.
"""

from .backends import BACKENDS, available_backends, resolve_backend
from .coeffs import (
    ALPHA_BY,
    DEFAULT_EPS,
    MASKED,
    MODES,
    STAT_NAMES,
    Coefficients,
    coefficients,
    stat_columns,
    top_alpha_mask,
)
from .layout import CHUNK, SegmentLayout, get_layout
from .ops import (
    DTYPES,
    NONFINITE,
    MDGDResult,
    mdgd_direction_,
    segment_combine_,
    segment_gram,
)

__all__ = [
    "ALPHA_BY",
    "BACKENDS",
    "CHUNK",
    "DEFAULT_EPS",
    "DTYPES",
    "MASKED",
    "MDGDResult",
    "MODES",
    "NONFINITE",
    "STAT_NAMES",
    "Coefficients",
    "SegmentLayout",
    "available_backends",
    "coefficients",
    "get_layout",
    "mdgd_direction_",
    "resolve_backend",
    "segment_combine_",
    "segment_gram",
    "stat_columns",
    "top_alpha_mask",
]
