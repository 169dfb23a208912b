"""LLaVA-format instruction data for ``mdgd train``: loading, chat template, labels, batches.

The input is LLaVA's format, a JSON list (or JSON Lines, one sample a line) of

    {"id": "...", "image": "file.png",            # "image" absent: a text-only sample
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}, ...]}

(``"image"`` may also be a list of files, one per ``<image>``.) Each sample is
rendered with the model's own processor and chat template, so the tokens are
the ones ``processor.apply_chat_template`` gives at inference time. Only the
assistant turns are supervised: every other position of ``labels`` is -100.
An assistant turn is found as the text the template adds between the
conversation rendered up to the turn (with the generation prompt) and rendered
through it, so it includes what the template closes the turn with (e.g.
``</s>``), and the model learns to stop. Text-only samples are kept.

Samples longer than ``max_length`` tokens are truncated; one whose answers (or
an image's tokens) would be cut entirely is dropped, counted in
:attr:`LlavaDataset.dropped`, with one warning. Every problem in the input is a
:class:`DataError` whose message names the sample (index and id) or the line.

* :mod:`mdgd.data.records`: the JSON format: loading, checks, turns as chat messages;
* :mod:`mdgd.data.tokens`: the chat template, tokenization, labels, truncation, collation;
* :mod:`mdgd.data.dataset`: :class:`LlavaDataset`, which checks and tokenizes a file up front.
"""

from .dataset import LlavaDataset
from .records import PLACEHOLDER, ROLES, DataError, image_files, load_records, to_messages
from .tokens import IGNORE, Collator, Encoded, chunks, collate, encode, token_ids

__all__ = [
    "IGNORE",
    "PLACEHOLDER",
    "ROLES",
    "Collator",
    "DataError",
    "Encoded",
    "LlavaDataset",
    "chunks",
    "collate",
    "encode",
    "image_files",
    "load_records",
    "to_messages",
    "token_ids",
]
