"""LLaVA-format instruction data for ``mdgd train``: loading, chat template, labels, batches.

The input is LLaVA's format, a JSON list (or JSON Lines, one sample a line, or
LLaVA-NeXT's YAML list of such files) of

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
:class:`DataError` whose message names the file and the sample (index and id),
the line, or the byte offset.

* :mod:`mdgd.data.records`: the JSON format: checks, turns as chat messages;
* :mod:`mdgd.data.scan`: one streaming pass over a file (each sample's byte offset), the
  YAML list of files, one sample read by its offset;
* :mod:`mdgd.data.index`: the checked, cached index (modality, lengths, token bounds);
* :mod:`mdgd.data.tokens`: the chat template, tokenization, labels, truncation, collation;
* :mod:`mdgd.data.dataset`: :class:`LlavaDataset`, lazy samples over the index;
* :mod:`mdgd.data.sampler`: LLaVA's ``group_by_modality_length`` sampler.
"""

from .dataset import LlavaDataset
from .records import PLACEHOLDER, ROLES, DataError, image_files, load_records, to_messages
from .sampler import ModalityLengthGroupedSampler
from .tokens import IGNORE, SKIPPED, Collator, Encoded, chunks, collate, encode, token_ids

__all__ = [
    "IGNORE",
    "PLACEHOLDER",
    "ROLES",
    "SKIPPED",
    "Collator",
    "DataError",
    "Encoded",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "chunks",
    "collate",
    "encode",
    "image_files",
    "load_records",
    "to_messages",
    "token_ids",
]
