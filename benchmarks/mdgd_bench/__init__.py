"""The code of the benchmarks in ``benchmarks/``, one module per benchmark over shared parts.

* :mod:`mdgd_bench.ops`: the fused ops against the pure-torch ways of writing them
  (``mdgd bench``, ``python benchmarks/bench_ops.py``);
* :mod:`mdgd_bench.step`: one training step of a small LLaVA, fine-tuning against MDGD
  (``mdgd bench step``, ``python benchmarks/bench_step.py``), its rows' engines in
  :mod:`mdgd_bench.step_engines`;
* :mod:`mdgd_bench.timing`: device sync, medians with 20th/80th percentiles, the machine;
* :mod:`mdgd_bench.results`: where the JSON results go and how they are named.
* :mod:`mdgd_bench.model`: the size options of the small LLaVA (:func:`mdgd.testing.tiny_llava`)
  that the step and activation benchmarks build.

The package lives in the checkout's ``benchmarks/`` folder and the mdgd wheel ships it,
so the scripts in ``benchmarks/`` and the ``mdgd bench`` command run this same code,
from a checkout and from an installed wheel alike.
"""
