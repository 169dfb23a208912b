"""From chat messages to tokens and batches: the supervised pieces, tokenization, collation.

Only the assistant turns are supervised: every other position of ``labels`` is
:data:`IGNORE`. An assistant turn is found as the text the template adds
between the conversation rendered up to the turn (with the generation prompt)
and rendered through it (:func:`chunks`).
"""

from __future__ import annotations

import torch

from .records import DataError

IGNORE = -100
SKIPPED = "mdgd_skipped_samples"  # batch key: bad samples replaced (--on-bad-sample skip)


def render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    """The conversation as text, through the processor's chat template."""
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chunks(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, supervised)`` pieces, in order."""
    full = render(processor, messages)
    out, cursor = [], 0
    for a, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(processor, messages[:a], generation_prompt=True)
        through = render(processor, messages[: a + 1])
        if not (through.startswith(prompt) and full.startswith(through) and len(prompt) >= cursor):
            raise DataError(
                "the chat template does not render a conversation's turns as prefixes of one "
                "another, so its assistant turns cannot be located; use a processor whose "
                "template renders each turn after the previous ones"
            )
        out += [(full[cursor : len(prompt)], False), (full[len(prompt) : len(through)], True)]
        cursor = len(through)
    out.append((full[cursor:], False))
    return [(text, sup) for text, sup in out if text]


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (e.g. image tiles)."""
    if len(tensors) == 1:
        return tensors[0]
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_zeros(sum(t.shape[0] for t in tensors), *shape)
    row = 0
    for t in tensors:
        out[(slice(row, row + t.shape[0]),) + tuple(slice(0, s) for s in t.shape[1:])] = t
        row += t.shape[0]
    return out


class Encoded(dict):
    """One sample: 1-D ``input_ids``, ``labels`` and per-token tensors, image tensors batched."""


def encode(processor, messages: list[dict], images: list, first_special: bool) -> Encoded:
    """Tokenize a conversation piece by piece with the processor (images expanded by it).

    Returns ``input_ids``, ``labels`` (-100 off the assistant turns), the
    processor's other per-token outputs (1-D) and its image outputs (``[n, ...]``).
    """
    image_token = processor.image_token
    image_keys = set(processor.image_processor.model_input_names)
    per_token: dict[str, list[torch.Tensor]] = {}
    per_image: dict[str, list[torch.Tensor]] = {}
    labels, used = [], 0
    for k, (text, supervised) in enumerate(chunks(processor, messages)):
        n = text.count(image_token)
        out = processor(
            text=[text],
            images=images[used : used + n] or None,
            add_special_tokens=first_special and k == 0,
            return_tensors="pt",
        )
        used += n
        ids = out["input_ids"][0]
        labels.append(ids.clone() if supervised else torch.full_like(ids, IGNORE))
        for key, val in out.items():
            if not isinstance(val, torch.Tensor):
                continue
            if key in image_keys:
                per_image.setdefault(key, []).append(val)
            else:  # [1, length]
                per_token.setdefault(key, []).append(val[0])
    enc = Encoded({k: torch.cat(v) for k, v in per_token.items()})
    enc["labels"] = torch.cat(labels)
    enc.update({k: cat_padded(v) for k, v in per_image.items()})
    return enc


def token_ids(
    processor,
    messages: list[dict],
    counts: list[int],
    first_special: bool,
    pieces: list[tuple[str, bool]] | None = None,
) -> Encoded:
    """``input_ids`` and ``labels`` of :func:`encode` without reading an image.

    Each image token is repeated ``counts[i]`` times (``processor._get_num_multimodal_tokens``),
    which is how LLaVA-style processors expand it; :class:`LlavaDataset` checks that
    on its first sample with an image before relying on it. ``pieces``: the
    conversation's :func:`chunks`, when the caller has them.
    """
    tok = processor.tokenizer
    pieces = chunks(processor, messages) if pieces is None else pieces
    texts = [text for text, _ in pieces]
    ids = encode_texts(tok, texts[:1], first_special) + encode_texts(tok, texts[1:], False)
    return assemble(pieces, ids, counts, tok.convert_tokens_to_ids(processor.image_token))


def encode_texts(tok, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """``tok(texts)["input_ids"]``: one batched call (the Rust tokenizer's own, when fast)."""
    if not texts:
        return []
    if getattr(tok, "is_fast", False):  # what tok(texts) calls, without its per-call overhead
        return [
            e.ids
            for e in tok.backend_tokenizer.encode_batch(
                texts, add_special_tokens=add_special_tokens
            )
        ]
    return tok(texts, add_special_tokens=add_special_tokens)["input_ids"]


def assemble(
    pieces: list[tuple[str, bool]], ids_per_piece: list[list[int]], counts: list[int], image_id: int
) -> Encoded:
    """``input_ids`` and ``labels`` from each piece's ids, image tokens repeated ``counts[i]``."""
    ids_out, labels, used = [], [], 0
    for (_, supervised), piece_ids in zip(pieces, ids_per_piece):
        ids = []
        for t in piece_ids:
            if t == image_id:
                ids += [t] * counts[used]
                used += 1
            else:
                ids.append(t)
        ids_out += ids
        labels += ids if supervised else [IGNORE] * len(ids)
    return Encoded(input_ids=torch.tensor(ids_out), labels=torch.tensor(labels))


def truncate(enc: Encoded, max_length: int, image_token_id: int) -> Encoded | None:
    """``enc`` cut to ``max_length`` tokens, or None when no answer (or an image) would survive."""
    n = enc["input_ids"].shape[0]
    if n <= max_length:
        return enc
    ids = enc["input_ids"]
    cut_images = bool((ids[max_length:] == image_token_id).any())
    if cut_images or not bool((enc["labels"][:max_length] != IGNORE).any()):
        return None
    return Encoded(
        {k: (v[:max_length] if v.dim() == 1 and v.shape[0] == n else v) for k, v in enc.items()}
    )


def first_special(processor) -> bool:
    """Whether the first piece gets the tokenizer's special tokens: as
    ``ProcessorMixin.apply_chat_template(tokenize=True)``, not when the template writes BOS."""
    bos = processor.tokenizer.bos_token
    probe = render(processor, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    return not (bos is not None and probe.startswith(bos))


def collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into a batch (labels with -100, masks with 0).

    Samples a skipping dataset replaced (their count under :data:`SKIPPED`) are summed
    into the batch's ``SKIPPED`` entry, which :class:`~mdgd.integrations.hf.MDGDTrainer`
    takes out before the forward.
    """
    skipped = sum(int(s[SKIPPED]) for s in samples if SKIPPED in s)
    samples = [{k: v for k, v in s.items() if k != SKIPPED} for s in samples]
    length = max(s["input_ids"].shape[0] for s in samples)
    batch: dict[str, torch.Tensor] = {}
    token_keys = [
        k
        for k, v in samples[0].items()
        if v.dim() == 1 and v.shape[0] == samples[0]["input_ids"].shape[0]
    ]
    for key in token_keys:
        fill = pad_token_id if key == "input_ids" else IGNORE if key == "labels" else 0
        rows = [s[key] for s in samples]
        out = rows[0].new_full((len(rows), length), fill)
        for r, row in enumerate(rows):
            out[r, : row.shape[0]] = row
        batch[key] = out
    image_keys = {k for s in samples for k in s if k not in token_keys}
    for key in sorted(image_keys):
        parts = [s[key] for s in samples if key in s]
        batch[key] = cat_padded(parts)
    if skipped:
        batch[SKIPPED] = torch.tensor(skipped)
    return batch


class Collator:
    """``data_collator`` for the Trainer: :func:`collate` with the tokenizer's pad id."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.pad_token_id)
