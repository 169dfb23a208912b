"""``mdgd demo``: visual forgetting on a small LLaVA, in the shape of the paper's Table 1.

Modules: :mod:`.model` (the LLaVA config and the word vocabulary), :mod:`.tasks`
(the pre-trained tasks and the target task, made on the fly), :mod:`.pretrain`
(phase 1 and its cache), :mod:`.finetune` (phase 2, one run per method through
:class:`mdgd.MDGDEngine`), :mod:`.evaluate` (accuracy, effective rank),
:mod:`.report` (table, JSON, Markdown, PNG) and :mod:`.run` (the whole run).
"""

from .run import FULL, QUICK, DemoConfig, run_demo

__all__ = ["FULL", "QUICK", "DemoConfig", "run_demo"]
