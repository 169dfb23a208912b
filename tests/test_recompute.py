"""Activation checkpointing of phi: it recomputes in eval mode, and the step is unchanged."""

from __future__ import annotations

import pytest
import torch
from llava_tiny import (  # noqa: F401
    checkpoint_activations,
    one_thread,
    perturbed_copy,
    random_batch,
    tiny_llava,
)

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, recompute_layers
from mdgd.distributed.shard import transformer_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def engine_pair(checkpoint: bool):
    ref = tiny_llava(seed=0)
    theta = perturbed_copy(ref, seed=1)
    if checkpoint:
        checkpoint_activations(theta)
    cfg = MDGDConfig(trainable=llava_trainable_patterns(ref.config, 2))
    return MDGDEngine(theta, ref, None, cfg)


def count_forwards(model) -> list[int]:
    """Count each layer's forward calls (recomputes included) from now on."""
    counts = [0] * len(transformer_layers(model))
    for i, layer in enumerate(transformer_layers(model)):
        plain = layer.forward

        def counted(*args, _plain=plain, _i=i, **kwargs):
            counts[_i] += 1
            return _plain(*args, **kwargs)

        layer.forward = counted
    return counts


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def test_phi_recomputes_when_theta_checkpoints():
    engine = engine_pair(checkpoint=True)
    counts = count_forwards(engine.ref_model)
    # the engine wrapped phi's layers before the counters: re-wrap on top of them
    recompute_layers(engine.ref_model)
    engine.backward(random_batch(engine.model.config, seed=3))
    # the decoder layers (on the gradient path to the projector): the forward, then one
    # recompute in each of the two backward calls; the vision layer (nothing trainable in
    # or before it) needs no backward, so no recompute
    vision, *decoder = counts
    assert vision == 1 and decoder == [3] * len(decoder), counts
    assert not engine.ref_model.training


def test_recomputing_phi_changes_nothing_but_memory():
    plain, ckpt = engine_pair(checkpoint=False), engine_pair(checkpoint=True)
    batch = random_batch(plain.model.config, seed=3)
    for engine in (plain, ckpt):
        engine.backward(batch)
    for a, b in ((plain.theta, ckpt.theta), (plain.phi, ckpt.phi)):
        for kind in ("g", "h"):
            torch.testing.assert_close(a.buffers[kind], b.buffers[kind], rtol=1e-6, atol=1e-8)
    kw = {**plain.visual.forward_kwargs, **batch}
    with_all = saved_bytes(lambda: plain.ref_model(**kw))
    recomputed = saved_bytes(lambda: ckpt.ref_model(**kw))
    assert recomputed < with_all / 2, (recomputed, with_all)


def test_recompute_layers_is_idempotent_and_keeps_names():
    model = tiny_llava(seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert recompute_layers(model) == recompute_layers(model) == len(transformer_layers(model))
    assert [n for n, _ in model.named_parameters()] == names
