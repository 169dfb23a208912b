"""ModalityLengthGroupedSampler: LLaVA's group_by_modality_length order worked out by
hand, as properties, through accelerate's sharding of a DataLoader, in MDGDTrainer, and
resumed mid-epoch on 2 ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given
from hypothesis import strategies as st
from llava_tiny import one_thread  # noqa: F401  (fixture)

import mdgd.data.sampler as sampler_module
from mdgd.data.sampler import (
    IMAGE,
    TEXT,
    ModalityLengthGroupedSampler,
    repeat_count,
    step_modalities,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny Trainer's model

ONE_IMAGE, ONE_TEXT, BOTH = frozenset({IMAGE}), frozenset({TEXT}), frozenset({IMAGE, TEXT})


@pytest.fixture
def unshuffled(monkeypatch):
    """Every permutation the identity, so that the order can be worked out by hand."""
    monkeypatch.setattr(sampler_module, "_permute", lambda n, generator: list(range(n)))


# ---------------------------------------------------------------------- by hand


def test_seven_images_five_texts_by_hand(unshuffled):
    # index:      0   1  2  3   4  5  6   7  8   9 10  11
    lengths = [5, -3, 2, 8, -6, 1, 4, -2, 7, -9, 3, -4]
    # B=1, W=2, GAS=2: M = 4 samples a step, 4 batches of 1; a micro-step is 2 samples.
    # images 0 2 3 5 6 8 10 -> full megabatch [0 2 3 5], tail [6 8 10]
    # texts  1 4 7 9 11     -> full megabatch [1 4 7 9], tail [11]
    # longest first: [0 2 3 5] (5 2 8 1) -> [3 0 2 5]; [1 4 7 9] (3 6 2 9) -> [9 4 1 7]
    # tails padded to whole micro-steps with the group's first samples: images
    #   [6 8 10] + [0] (4 7 3 5) -> [8 0 6 10]; texts [11] + [1] (4 3) -> [11 1]
    sampler = ModalityLengthGroupedSampler(
        lengths, batch_size=1, world_size=2, gradient_accumulation_steps=2
    )
    order = sampler.order()
    assert order == [3, 0, 2, 5, 9, 4, 1, 7, 8, 0, 6, 10, 11, 1]
    assert list(sampler) == order and len(sampler) == 14 and sampler.repeats == (1, 1)
    assert step_modalities(order, lengths, 1, 2, 2) == [ONE_IMAGE, ONE_TEXT, ONE_IMAGE, ONE_TEXT]
    # rank 0 takes batches 0, 2, 4, ...; step 2 is rank 0: [8] [6], rank 1: [0] [10]
    shards = [list(shard(order, 1, 2, r)) for r in range(2)]
    assert shards == [
        [[3], [2], [9], [1], [8], [6], [11]],
        [[0], [5], [4], [7], [0], [10], [1]],
    ]


def test_balanced_batches_and_padded_tails_by_hand(unshuffled):
    # index:      0  1   2  3  4   5  6  7   8
    lengths = [6, 3, -5, 1, 9, -2, 4, 7, -8]
    # B=2, W=2, GAS=1: M = 4, 2 batches of 2 a step, which is also one micro-step.
    # images 0 1 3 4 6 7 -> full megabatch [0 1 3 4], tail [6 7]; texts 2 5 8: all tail.
    # [0 1 3 4] longest first: 4(9) 0(6) 1(3) 3(1); dealt to the lighter batch with room:
    #   4 -> b0 (9), 0 -> b1 (6), 1 -> b1 (9, full), 3 -> b0 (10): [4 3] [0 1]
    # image tail [6 7] + [0 1] longest first 7(7) 0(6) 6(4) 1(3): [7 1] [0 6]
    # text tail [2 5 8] + [2] longest first 8(8) 2(5) 2(5) 5(2): [8 5] [2 2]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2)
    order = sampler.order()
    assert order == [4, 3, 0, 1, 7, 1, 0, 6, 8, 5, 2, 2]
    assert len(sampler) == 12 and sampler.repeats == (2, 1)
    assert step_modalities(order, lengths, 2, 2, 1) == [ONE_IMAGE, ONE_IMAGE, ONE_TEXT]


def test_one_rank_shares_the_tail_without_repeats_by_hand(unshuffled):
    lengths = [6, 3, -5, 1, 9, -2, 4, 7, -8]  # the case above on one rank, GAS=2: M = 4
    # tail: 5 samples, 3 batches (2 2 1); its 2 images open one batch each, shared with
    #   the 2 longest texts 8(8) 2(5): 7 -> b0 (7), 6 -> b1 (4), 8 -> b1 (12, full),
    #   2 -> b0 (12): [7 2] [6 8]; then the text-only batch [5].
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, gradient_accumulation_steps=2)
    order = sampler.order()
    assert order == [4, 3, 0, 1, 7, 2, 6, 8, 5]
    assert len(sampler) == 9 and sampler.repeats == (0, 0)
    assert step_modalities(order, lengths, 2, 1, 2) == [ONE_IMAGE, BOTH, ONE_TEXT]


@pytest.mark.parametrize(
    "samples, batch, world, repeats",
    [(7, 1, 1, 0), (7, 4, 1, 0), (0, 2, 3, 0), (6, 2, 3, 0), (7, 2, 3, 5), (1, 4, 4, 15)],
    ids=["one-rank", "one-rank-batch-4", "none", "whole", "one-over", "one-of-16"],
)
def test_repeat_count_by_hand(samples, batch, world, repeats):
    assert repeat_count(samples, batch, world) == repeats


# ---------------------------------------------------------------------- properties


def shard(order, batch_size, world_size, rank):
    """Rank ``rank``'s batches, as accelerate's ``prepare`` shards a DataLoader
    (``split_batches=False``, ``even_batches=True``; one process: not at all)."""
    loader = torch.utils.data.DataLoader(range(len(order)), batch_size=batch_size, sampler=order)
    batches = loader.batch_sampler
    if world_size > 1:
        batches = BatchSamplerShard(batches, world_size, rank, False, True)
    return ([int(i) for i in b] for b in batches)


@st.composite
def cases(draw, min_world: int = 1, max_world: int = 3):
    images = draw(st.integers(0, 50))
    texts = draw(st.integers(0 if images else 1, 50))
    lengths = draw(st.lists(st.integers(1, 40), min_size=images + texts, max_size=images + texts))
    signs = draw(st.permutations([1] * images + [-1] * texts))
    return dict(
        lengths=[s * n for s, n in zip(signs, lengths)],
        batch_size=draw(st.integers(1, 4)),
        world_size=draw(st.integers(min_world, max_world)),
        gradient_accumulation_steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**31)),
    )


def tail_facts(case):
    """(samples in the full megabatches, images and texts in the tail, repeats
    included), as the module's docstring defines them."""
    lengths, b, w = case["lengths"], case["batch_size"], case["world_size"]
    m = b * w * case["gradient_accumulation_steps"]
    images = sum(n > 0 for n in lengths)
    texts = len(lengths) - images
    a = images % m + repeat_count(images, b, w)
    t = texts % m + repeat_count(texts, b, w)
    return len(lengths) - images % m - texts % m, a, t


@given(cases(max_world=4))
def test_every_sample_once_and_fewer_than_a_micro_step_repeated(case):
    lengths, b, w = case["lengths"], case["batch_size"], case["world_size"]
    sampler = ModalityLengthGroupedSampler(**case)
    order = sampler.order()
    assert len(order) == len(sampler) == len(lengths) + sum(sampler.repeats)
    assert set(order) == set(range(len(lengths)))
    seen = [sum((lengths[i] > 0) == has_image for i in order) for has_image in (True, False)]
    counts = [sum((n > 0) == has_image for n in lengths) for has_image in (True, False)]
    assert [s - c for s, c in zip(seen, counts)] == list(sampler.repeats)
    if w == 1:
        assert sampler.repeats == (0, 0)
    else:
        assert all(0 <= r < w * b for r in sampler.repeats)
        assert len(order) % (w * b) == 0  # accelerate's even_batches adds nothing


@given(cases())
def test_every_step_but_the_tail_is_single_modality(case):
    lengths, b = case["lengths"], case["batch_size"]
    w, gas = case["world_size"], case["gradient_accumulation_steps"]
    order = ModalityLengthGroupedSampler(**case).order()
    m = b * w * gas
    full, a, t = tail_facts(case)
    steps = step_modalities(order, lengths, b, w, gas)
    mixed = [s for s, kinds in enumerate(steps) if kinds == BOTH]
    assert all(s * m >= full for s in mixed), (mixed, full)  # only the tail mixes
    assert all(s >= len(steps) - 2 for s in mixed)
    assert len(mixed) <= (1 if w > 1 or a + t <= m else 2)
    for s in range(full // m):  # full megabatches: longest first, balanced batches
        step = order[s * m : (s + 1) * m]
        sizes = [abs(lengths[i]) for i in step]
        assert sizes[0] == max(sizes)
        batches = [sizes[k : k + b] for k in range(0, m, b)]
        assert all(x == sorted(x, reverse=True) for x in batches)
        totals = [sum(x) for x in batches]
        assert max(totals) - min(totals) <= max(sizes), totals


@given(cases(max_world=4))
def test_tail_images_come_first(case):
    lengths, b, w = case["lengths"], case["batch_size"], case["world_size"]
    order = ModalityLengthGroupedSampler(**case).order()
    full, a, t = tail_facts(case)
    batches = [order[k : k + b] for k in range(full, len(order), b)]
    count = -(-(a + t) // b)
    assert len(batches) == count
    if w == 1:  # an image in each of the first batches, shared with texts
        kinds = [any(lengths[i] > 0 for i in x) for x in batches]
        with_image = min(a, count)
    else:  # batches of one modality, each modality in whole micro-steps
        kinds = [{lengths[i] > 0 for i in x} for x in batches]
        assert all(len(x) == 1 for x in kinds)
        kinds = [x == {True} for x in kinds]
        with_image = a // b
        assert a % (w * b) == 0 and t % (w * b) == 0
    assert kinds == [True] * with_image + [False] * (count - with_image)


@given(cases(), st.integers(0, 5))
def test_same_seed_and_epoch_same_order_on_every_rank(case, epoch):
    a, b = ModalityLengthGroupedSampler(**case), ModalityLengthGroupedSampler(**case)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    assert a.order() == b.order() == list(a)


def test_another_epoch_or_seed_another_order():
    lengths = [(-1) ** i * (i % 7 + 1) for i in range(100)]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3)
    first = sampler.order()
    sampler.set_epoch(1)
    assert sampler.order() != first
    sampler.set_epoch(0)
    assert sampler.order() == first
    other = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=4)
    assert other.order() != first


@given(cases(max_world=4))
def test_accelerate_shards_steps_as_step_modalities_says(case):
    """Each rank's batches from accelerate's BatchSamplerShard: an optimizer step over all
    ranks is the block of M samples step_modalities assumes (the last one may be short)."""
    lengths, b = case["lengths"], case["batch_size"]
    w, gas = case["world_size"], case["gradient_accumulation_steps"]
    order = ModalityLengthGroupedSampler(**case).order()
    ranks = [list(shard(order, b, w, r)) for r in range(w)]
    assert len({len(x) for x in ranks}) == 1  # even_batches
    m = b * w * gas
    steps = step_modalities(order, lengths, b, w, gas)
    micro = len(ranks[0])
    for s in range(len(steps)):  # every step, the last one too: accelerate repeats nothing
        samples = [
            i for j in range(s * gas, min((s + 1) * gas, micro)) for x in ranks for i in x[j]
        ]
        assert sorted(samples) == sorted(order[s * m : (s + 1) * m])
        assert {IMAGE if lengths[i] > 0 else TEXT for i in samples} == steps[s]


@given(cases(min_world=2, max_world=4))
def test_sharded_micro_steps_are_single_modality_all_epoch(case):
    """With several ranks, the W batches of every micro-step, tail included, all have
    images or are all text-only (what FSDP2 and ZeRO need), for fewer than W*B repeats
    per modality."""
    lengths, b, w = case["lengths"], case["batch_size"], case["world_size"]
    sampler = ModalityLengthGroupedSampler(**case)
    order = sampler.order()
    ranks = [list(shard(order, b, w, r)) for r in range(w)]
    assert [i for j in range(len(ranks[0])) for x in ranks for i in x[j]] == order  # no padding
    for j in range(len(ranks[0])):
        kinds = {any(lengths[i] > 0 for i in x[j]) for x in ranks}
        assert len(kinds) == 1, (j, [x[j] for x in ranks])
    assert all(r < w * b for r in sampler.repeats)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(batch_size=0), "batch_size must be at least 1, got 0"),
        (dict(world_size=0), "world_size must be at least 1, got 0"),
        (dict(gradient_accumulation_steps=-1), "gradient_accumulation_steps must be at least 1"),
        (dict(lengths=[]), "lengths is empty"),
        (dict(lengths=[3, -2, 0, 5]), r"lengths\[2\] is 0"),
        (dict(lengths=[1.5, -2.0]), "lengths must be ints"),
        (dict(lengths=[[1, 2], [3, 4]]), r"lengths must be 1-D .* shape \(2, 2\)"),
    ],
    ids=["batch", "world", "accumulation", "empty", "zero", "float", "2d"],
)
def test_errors_name_what_is_wrong(kw, message):
    args = dict(lengths=[3, -2, 5], batch_size=2) | kw
    with pytest.raises(ValueError, match=message):
        ModalityLengthGroupedSampler(**args)


def test_numpy_and_tensor_lengths():
    np = pytest.importorskip("numpy")
    ref = ModalityLengthGroupedSampler([4, -3, 2, -1, 5], batch_size=2).order()
    for lengths in (np.array([4, -3, 2, -1, 5], dtype=np.int32), torch.tensor([4, -3, 2, -1, 5])):
        assert ModalityLengthGroupedSampler(lengths, batch_size=2).order() == ref


# ---------------------------------------------------------------------- MDGDTrainer


@pytest.fixture(scope="module")
def trainer_parts():
    pytest.importorskip("transformers")
    from llava_tiny import MixedExamples, tiny_llava

    class Lengths(MixedExamples):
        """MixedExamples with LLaVA's modality_lengths (made-up lengths)."""

        def __init__(self, config, kinds: str) -> None:
            super().__init__(config, kinds)
            self.modality_lengths = [
                (k % 5 + 1) * (1 if kind == "I" else -1) for k, kind in enumerate(kinds)
            ]

    model = tiny_llava(seed=0)
    return model, Lengths(model.config, "IITIIITTIIITI"), MixedExamples(model.config, "IT")


def make_trainer(tmp_path, model, data, **kw):
    from llava_tiny import collate, trainer_args

    from mdgd import MDGDConfig
    from mdgd.integrations.hf import MDGDTrainer

    return MDGDTrainer(
        model=model,
        mdgd_config=MDGDConfig(mode="ft"),
        args=trainer_args(tmp_path, max_steps=1, data_seed=5),
        train_dataset=data,
        data_collator=collate,
        **kw,
    )


def indices_of(batch, data) -> list[int]:
    rows = [data[i]["input_ids"] for i in range(len(data))]
    return [
        next(i for i, r in enumerate(rows) if torch.equal(r, ids)) for ids in batch["input_ids"]
    ]


def test_trainer_loads_batches_in_the_sampler_order(tmp_path, trainer_parts):
    model, data, _ = trainer_parts
    trainer = make_trainer(tmp_path, model, data, group_by_modality_length=True)
    loader = trainer.get_train_dataloader()
    expect = ModalityLengthGroupedSampler(
        data.modality_lengths, batch_size=2, gradient_accumulation_steps=2, seed=5
    )
    for epoch in (0, 1):  # the Trainer's set_epoch reaches the sampler
        loader.set_epoch(epoch)
        expect.set_epoch(epoch)
        seen = [i for batch in loader for i in indices_of(batch, data)]
        assert seen == expect.order(), epoch
    assert (
        expect.order()
        != ModalityLengthGroupedSampler(
            data.modality_lengths, batch_size=2, gradient_accumulation_steps=2, seed=5
        ).order()
    )


def test_trainer_groups_by_default_only_when_sharded(tmp_path, trainer_parts):
    model, data, _ = trainer_parts
    trainer = make_trainer(tmp_path, model, data)
    assert not isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)
    trainer.is_deepspeed_enabled = True  # as under DeepSpeed (FSDP2: is_fsdp_enabled)
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)
    off = make_trainer(tmp_path, model, data, group_by_modality_length=False)
    off.is_deepspeed_enabled = True
    assert not isinstance(off._get_train_sampler(), ModalityLengthGroupedSampler)


def test_trainer_asked_to_group_without_modality_lengths(tmp_path, trainer_parts):
    model, _, plain = trainer_parts
    with pytest.raises(ValueError, match=r"\(MixedExamples\) to have modality_lengths"):
        make_trainer(tmp_path, model, plain, group_by_modality_length=True)
    make_trainer(tmp_path, model, plain)  # automatic: the Trainer's own sampler


# ---------------------------------------------------------------------- resuming mid-epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_loader_of_a_sharded_run_keeps_the_epoch(tmp_path, trainer_parts, rank):
    """Rank ``rank`` of 2 resumed 3 batches into epoch 1: accelerate's loader for it
    (``prepare_data_loader`` for 2 processes, as the Trainer's accelerator builds it), cut
    by ``MDGDTrainer.get_resumed_dataloader`` and set to the epoch as
    ``Trainer._run_epoch`` does, yields the rest of epoch 1's batches of that rank."""
    from accelerate.data_loader import prepare_data_loader

    model, data, _ = trainer_parts
    trainer = make_trainer(tmp_path, model, data, group_by_modality_length=True)

    def loader():  # a new process: its sampler at epoch 0
        sampler = ModalityLengthGroupedSampler(
            data.modality_lengths, batch_size=1, world_size=2, seed=5
        )
        plain = torch.utils.data.DataLoader(range(len(data)), batch_size=1, sampler=sampler)
        return prepare_data_loader(plain, num_processes=2, process_index=rank, put_on_device=False)

    whole = loader()
    whole.set_epoch(1)
    want = [b.tolist() for b in whole]
    whole.set_epoch(0)
    assert want != [b.tolist() for b in whole]  # else the test could not tell
    resumed = trainer.get_resumed_dataloader(loader(), 3)
    resumed.set_epoch(1)
    assert [b.tolist() for b in resumed] == want[3:]


@pytest.mark.slow  # 2 ranks, 2 Trainer runs: about 40 s on a busy 2-core CPU
def test_two_ranks_resumed_mid_epoch_train_on_the_uninterrupted_samples(tmp_path):
    """2 gloo ranks (tests/helpers/sampler_resume_worker.py): after resuming one step
    into the second epoch, each rank trains on the micro-batches the uninterrupted run
    trained on from there, not on the first epoch's."""
    from launch import HERE, WORLD, launch_ranks

    worker = os.path.join(HERE, "sampler_resume_worker.py")
    launch_ranks([worker, str(tmp_path)], timeout=240, what="the sampler's resume")
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"resume-{rank}.json").read_text())
        full, resumed = got["full"], got["resumed"]
        # 7 micro-batches a rank and epoch, 2 a step: step 5 took the 2nd epoch's first 2
        assert len(full) == 14 and len(resumed) == 5
        assert resumed == full[9:], rank
        assert resumed != full[2:7], rank  # the first epoch's batches at that place differ
