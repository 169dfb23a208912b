"""The lean reference model (mdgd/reference.py): phi shares theta's frozen modules.

Against ``copy.deepcopy(model)``, the phi it replaces: the same parameters and buffers,
the frozen modules shared (same objects, same storage) and the trainable ones not, and
training with either phi lands on bit-identical parameters and figures (the engine, the
Trainer, activation checkpointing, the second forward with replayed random numbers, and
2 gloo ranks under "dp" and FSDP2). The shared frozen vision tower runs once per
micro-batch; its one-slot cache steps aside wherever reusing could change a result.

Run as a script, this file is one rank of the 2-rank test (``launch_ranks``).
"""

from __future__ import annotations

import copy
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

import pytest  # noqa: E402
import torch  # noqa: E402
from llava_tiny import (  # noqa: E402
    Examples,
    checkpoint_activations,
    one_thread,  # noqa: F401  (fixture)
    random_batch,
    tiny_llava,
    trainer_args,
)
from torch import nn  # noqa: E402

from mdgd import (  # noqa: E402
    MDGDConfig,
    MDGDEngine,
    llava_trainable_patterns,
    mark_trainable,
    reference_model,
)
from mdgd.reference import (  # noqa: E402
    SharedForward,
    shareable_modules,
    shared_bytes,
    shared_forward,
    unshare,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, MICRO = 3, 2


def patterns(model) -> list[str]:
    """The last two of three language-model layers and the projector."""
    return llava_trainable_patterns(model, 2)


def models(lean: bool, ckpt: bool = False, **model_kw):
    """(theta, phi, patterns): phi built from theta (lean or deep copy), then theta's
    trainable parameters perturbed, as if training had moved them (so L_v != 0 at once)."""
    theta = tiny_llava(seed=0, **model_kw)
    pats = patterns(theta)
    mark_trainable(theta, pats)
    if ckpt:
        checkpoint_activations(theta)
    ref = reference_model(theta, pats) if lean else copy.deepcopy(theta)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theta.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return theta, ref, pats


def build(lean: bool, mode: str = "mdgd", ckpt: bool = False, **model_kw):
    """(engine, theta) over :func:`models`."""
    theta, ref, pats = models(lean, ckpt, **model_kw)
    opt = torch.optim.AdamW([p for p in theta.parameters() if p.requires_grad], lr=1e-2)
    cfg = MDGDConfig(mode=mode, alpha=0.3, trainable=pats)
    engine = MDGDEngine(theta, ref, opt, cfg)
    theta.train()
    return engine, theta


def count_calls(module: nn.Module) -> list[int]:
    """A counter of ``module``'s forward calls (a hook: recomputes do not count)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def train(engine, theta) -> tuple[list[dict], int]:
    """STEPS steps of MICRO micro-batches; the figures and theta's vision-tower calls."""
    calls = count_calls(theta.model.vision_tower.embeddings)
    figures = []
    for step in range(STEPS):
        for m in range(MICRO - 1):
            engine.backward(random_batch(theta.config, seed=10 * step + m))
        figures.append(engine.step(random_batch(theta.config, seed=10 * step + MICRO - 1)))
    return figures, calls[0]


def same_figures(a: list[dict], b: list[dict]) -> bool:
    """Equal, bit for bit (NaN equals NaN)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in x)
        for x, y in zip(a, b)
    )


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{name} differs"


# ---------------------------------------------------------------------- what is shared


def test_frozen_modules_are_shared_and_trainable_ones_copied():
    theta = tiny_llava(seed=0)
    pats = patterns(theta)
    ref = reference_model(theta, pats)
    full = copy.deepcopy(theta)
    mine, theirs = dict(theta.named_modules()), dict(ref.named_modules())
    for name in [
        "model.vision_tower",
        "model.language_model.embed_tokens",
        "model.language_model.layers.0",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "lm_head",
    ]:
        assert theirs[name] is mine[name], name
    for name in ["", "model", "model.multi_modal_projector", "model.language_model.layers.1"]:
        assert theirs[name] is not mine[name], name
    frozen_bytes = 0
    params = dict(theta.named_parameters())
    for name, q in ref.named_parameters():
        p = params[name]
        assert torch.equal(q, p) and q.requires_grad == p.requires_grad, name
        if p.requires_grad:
            assert q is not p and q.data_ptr() != p.data_ptr(), f"{name} is trainable but shared"
        else:
            assert q is p, f"{name} is frozen but copied"
            frozen_bytes += p.numel() * p.element_size()
    # every parameter and buffer equals the deep copy's
    want = full.state_dict()
    got = ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    buffers = sum(b.numel() * b.element_size() for b in theta.buffers())
    assert shared_bytes(theta, ref) == frozen_bytes + buffers
    assert shared_bytes(theta, full) == 0


def test_partly_trainable_modules_share_their_frozen_parameters():
    theta = tiny_llava(seed=0)
    fc1 = r"vision_tower\.encoder\.layers\.0\.mlp\.fc1\.weight$"
    ref = reference_model(theta, patterns(theta) + [fc1, r"embeddings\.patch_embedding"])
    mine, theirs = theta.model.vision_tower, ref.model.vision_tower
    assert theirs is not mine  # it holds trainable parameters now
    a, b = mine.encoder.layers[0].mlp.fc1, theirs.encoder.layers[0].mlp.fc1
    assert b is not a and b.weight is not a.weight and torch.equal(b.weight, a.weight)
    assert b.bias is a.bias  # frozen, in a copied module
    assert theirs.encoder.layers[0].self_attn is mine.encoder.layers[0].self_attn
    # a copied module's buffers are its own copies
    assert theirs.embeddings is not mine.embeddings
    assert theirs.embeddings.position_embedding is mine.embeddings.position_embedding
    pos_a, pos_b = mine.embeddings.position_ids, theirs.embeddings.position_ids
    assert pos_b is not pos_a and torch.equal(pos_b, pos_a)


@pytest.mark.parametrize("embeddings", ["frozen", "trainable"])
def test_tied_weights_stay_tied(embeddings):
    theta = tiny_llava(seed=0, tie_word_embeddings=True)
    assert theta.lm_head.weight is theta.model.language_model.embed_tokens.weight
    extra = [r"embed_tokens"] if embeddings == "trainable" else []
    ref = reference_model(theta, patterns(theta) + extra)
    tied = ref.lm_head.weight
    assert tied is ref.model.language_model.embed_tokens.weight
    assert (tied is theta.lm_head.weight) == (embeddings == "frozen")
    assert torch.equal(tied, theta.lm_head.weight)


def test_modules_that_depend_on_the_mode_are_copied():
    """phi runs in eval mode while theta trains: a module with dropout is not shared."""
    theta = tiny_llava(seed=0, attention_dropout=0.2)  # the language model's attention
    ref = reference_model(theta, patterns(theta))
    layer_t, layer_p = theta.model.language_model.layers[0], ref.model.language_model.layers[0]
    assert layer_p is not layer_t
    assert layer_p.self_attn is not layer_t.self_attn
    assert layer_p.self_attn.q_proj.weight is layer_t.self_attn.q_proj.weight  # frozen: shared
    assert layer_p.mlp is layer_t.mlp
    assert ref.model.vision_tower is theta.model.vision_tower  # CLIP's dropout is 0
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net.requires_grad_(False)
    net[3].weight.requires_grad_(True)
    assert shareable_modules(net) == [net[0]]  # dropout and batch norm are copied


def test_reference_model_errors():
    theta = tiny_llava(seed=0)
    for p in theta.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        reference_model(theta)
    with pytest.raises(ValueError, match="no parameter .* matches"):
        reference_model(theta, [r"^nothing\."])


def test_engine_refuses_a_shared_trainable_parameter_and_accepts_shared_frozen_ones():
    theta = tiny_llava(seed=0)
    pats = patterns(theta)
    ref = reference_model(theta, pats)
    # the optimizer may hold theta's frozen parameters, which phi shares
    everything = torch.optim.SGD(theta.parameters(), lr=0.1)
    MDGDEngine(theta, ref, everything, MDGDConfig(trainable=pats))
    with pytest.raises(ValueError, match="holds .* parameter\\(s\\) of ref_model"):
        both = list({id(p): p for m in (theta, ref) for p in m.parameters()}.values())
        MDGDEngine(theta, ref, torch.optim.SGD(both, lr=0.1), MDGDConfig(trainable=pats))
    # lm_head is shared: training it now would train phi's too
    with pytest.raises(ValueError, match="shares parameter 'lm_head.weight', a trainable one"):
        MDGDEngine(theta, ref, None, MDGDConfig(trainable=pats + [r"^lm_head\."]))


def test_unshare_makes_a_full_copy():
    theta = tiny_llava(seed=0, tie_word_embeddings=True)
    pats = patterns(theta)
    ref = reference_model(theta, pats)
    shared = shared_bytes(theta, ref)
    assert shared > 0
    assert unshare(ref, theta) == shared
    assert shared_bytes(theta, ref) == 0
    assert not ({id(m) for m in ref.modules()} & {id(m) for m in theta.modules()})
    assert ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
    want = copy.deepcopy(theta).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in ref.state_dict().items())
    assert unshare(ref, theta) == 0


# ---------------------------------------------------------------------- bit-identical training


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("mode", ["mdgd", "gm"])
def test_lean_phi_trains_bit_identically_to_a_deep_copy(mode, ckpt):
    engine, theta = build(lean=False, mode=mode, ckpt=ckpt)
    want, calls_copy = train(engine, theta)
    engine, lean = build(lean=True, mode=mode, ckpt=ckpt)
    got, calls_lean = train(engine, lean)
    assert_same_params(lean, theta)
    assert same_figures(got, want), (got, want)
    assert all(f["loss_v"] > 0 for f in got)
    # theta's tower once per micro-batch either way; with the lean phi it is phi's too
    assert calls_copy == calls_lean == STEPS * MICRO
    assert engine.ref_model.model.vision_tower is lean.model.vision_tower
    assert "forward" not in vars(lean.model.vision_tower)  # no cache outside a forward


def test_second_forward_with_replayed_random_numbers():
    """The path of strategies that free the graph: both forwards again for the L_v
    backward, drawing the first ones' dropout masks; the tower runs once per pair."""
    runs = []
    for lean in (False, True):
        engine, theta = build(lean=lean, attention_dropout=0.2)
        engine.exchange.retains_graph = False
        torch.manual_seed(0)
        figures, calls = train(engine, theta)
        runs.append((theta, figures, calls))
    (theta, want, calls_copy), (lean, got, calls_lean) = runs
    assert_same_params(lean, theta)
    assert same_figures(got, want)
    assert calls_copy == calls_lean == 2 * STEPS * MICRO


def test_trainer_with_a_lean_phi_equals_the_deep_copy(tmp_path):
    from mdgd.integrations.hf import MDGDTrainer

    results = []
    for lean in (False, True):
        theta = tiny_llava(seed=0)
        pats = patterns(theta)
        checkpoint_activations(theta)
        ref = reference_model(theta, pats) if lean else copy.deepcopy(theta)
        trainer = MDGDTrainer(
            model=theta,
            ref_model=ref,
            mdgd_config=MDGDConfig(mode="gm", alpha=0.3, trainable=pats),
            args=trainer_args(tmp_path / str(lean), max_steps=2),
            train_dataset=Examples(theta.config, 8),
        )
        trainer.train()
        shared = trainer.engine.ref_model.model.vision_tower is theta.model.vision_tower
        assert shared == lean  # one process: the Trainer keeps the lean phi lean
        logs = [
            {k: v for k, v in h.items() if k.startswith(("loss", "mdgd/"))}
            for h in trainer.state.log_history
        ]
        results.append((theta, logs))
    (theta, want), (lean, got) = results
    assert_same_params(lean, theta)
    assert same_figures(got, want), (got, want)


def test_monitor_forwards_on_a_lean_phi():
    from mdgd.monitor import visual_erank

    engine, lean = build(lean=True)
    full = copy.deepcopy(engine.ref_model)  # phi as a deep copy would hold it
    batches = [random_batch(lean.config, seed=3)]
    assert visual_erank(engine.ref_model, batches) == visual_erank(full, batches)
    assert lean.training and not engine.ref_model.training
    train(engine, lean)  # and training goes on


# ---------------------------------------------------------------------- the one-slot cache


class Pair(nn.Module):
    """A stand-in for a model: a vision tower and a head."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.vision_tower = tower
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision_tower(x))


def pair(tower: nn.Module) -> tuple[Pair, Pair, list[int]]:
    """theta and phi sharing ``tower``, and a counter of the runs of its first submodule
    (a hook on the tower itself would count the calls that reuse the output too)."""
    theta, phi = Pair(tower), Pair(tower)
    return theta, phi, count_calls(next(tower.children()))


def test_cache_runs_the_shared_tower_once_and_only_inside_the_context():
    tower = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).requires_grad_(False)
    theta, phi, calls = pair(tower)
    shared = shared_forward(theta, phi)
    assert shared.modules == [tower]
    x = torch.randn(2, 4)
    with shared:
        _, b = theta(x), phi(x)
    assert calls == [1]
    assert shared._slots[0].entry is None and "forward" not in vars(tower)
    assert torch.equal(b, phi(x))  # outside: as usual
    assert calls == [2]
    with shared:  # another input: a miss
        theta(x), phi(torch.randn(2, 4))
    assert calls == [4]
    with shared:  # the input changed in place in between: a miss
        theta(x)
        x.mul_(2)
        phi(x)
    assert calls == [6]
    with shared:  # the output changed in place in between: a miss
        out = tower(x)
        out.add_(1)
        assert not torch.equal(tower(x), out)
    assert calls == [8]


def test_cache_steps_aside_for_dropout_and_gradients():
    tower = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).requires_grad_(False)
    theta, phi, calls = pair(tower)
    shared = shared_forward(theta, phi)
    x = torch.randn(2, 4)
    tower.train()
    with shared:
        theta(x), phi(x)
    assert calls == [2], "dropout is active: each call draws its own mask"
    tower.eval()
    with shared:
        theta(x), phi(x)
    assert calls == [3]
    # an input that needs a gradient
    xg = torch.randn(2, 4, requires_grad=True)
    with shared:
        theta(xg), phi(xg)
    assert calls == [5]
    # a shared module with a trainable parameter: its output needs a gradient
    tower[0].weight.requires_grad_(True)
    shared = shared_forward(theta, phi)
    with shared:
        theta(x), phi(x)
    assert calls == [7]
    with shared, torch.no_grad():  # no graph: reusable
        theta(x), phi(x)
    assert calls == [8]


def test_cache_of_a_frozen_tower_with_a_graph_gives_the_second_call_a_detached_output():
    """transformers' enable_input_require_grads makes the patch embeddings need a
    gradient: the frozen tower's output then carries a graph that leads to no parameter;
    the second call gets it detached."""
    tower = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).requires_grad_(False)
    tower[0].register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    theta, phi, calls = pair(tower)
    x = torch.randn(2, 4)
    with shared_forward(theta, phi):
        a, b = tower(x), tower(x)
    assert calls == [1] and a.requires_grad and not b.requires_grad and torch.equal(a, b)


def test_cache_keeps_model_outputs_apart():
    """The caller may set attributes on a returned ModelOutput (LLaVA sets pooler_output):
    the second call gets its own container."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x):
            x = self.inner(x)
            return BaseModelOutputWithPooling(last_hidden_state=x * 2, hidden_states=(x, x * 2))

    tower = Tower()
    theta, phi, calls = pair(tower)
    x = torch.randn(2, 4)
    with SharedForward([tower]):
        first = tower(x)
        first.pooler_output = torch.zeros(1)
        second = tower(x)
    assert calls == [1] and second.pooler_output is None
    assert torch.equal(second.last_hidden_state, first.last_hidden_state)
    assert type(second) is type(first) and len(second.hidden_states) == 2


# ---------------------------------------------------------------------- 2 ranks: "dp" and FSDP2


def rank_run(dmode: str, lean: bool, rank: int, shard_frozen: bool = True) -> dict:
    """Two steps on this rank's micro-batches; theta's full parameters and the figures."""
    from mdgd import shard_models

    theta, ref, pats = models(lean)
    if dmode == "fsdp":
        shard_models(theta, ref, shard_frozen=shard_frozen)
    calls = count_calls(theta.model.vision_tower.embeddings)
    opt = torch.optim.SGD([p for p in theta.parameters() if p.requires_grad], lr=0.5)
    cfg = MDGDConfig(trainable=pats, distributed=dmode, dist_timeout_s=60)
    engine = MDGDEngine(theta, ref, opt, cfg)
    figures = [engine.step(random_batch(theta.config, seed=100 * s + rank)) for s in range(2)]
    full = [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in theta.parameters()
    ]
    return {
        "params": [t.clone() for t in full],
        "figures": figures,
        "calls": calls[0],
        "shares_tower": ref.model.vision_tower is theta.model.vision_tower,
        "shared_bytes": shared_bytes(theta, ref),
    }


RANK_CASES = [("dp", True), ("fsdp", False), ("fsdp", True)]  # (mode, shard_frozen)


def rank_main(out: str) -> None:
    import datetime

    import torch.distributed as dist
    from launch import run_rank

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)

    def body() -> None:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        result = {
            f"{mode}-{frozen}": [rank_run(mode, lean, rank, frozen) for lean in (False, True)]
            for mode, frozen in RANK_CASES
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))

    run_rank(body)


def test_two_ranks_dp_and_fsdp2_equal_the_deep_copy(tmp_path):
    """7 s on an idle 2-core CPU, 22 s on a busy one."""
    from launch import WORLD, launch_ranks

    launch_ranks([os.path.abspath(__file__), str(tmp_path)], timeout=120, what="lean phi")
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for mode, frozen in RANK_CASES:
            key = f"{mode}-{frozen}"
            full, lean = result[key]
            assert all(torch.equal(a, b) for a, b in zip(full["params"], lean["params"])), key
            assert same_figures(lean["figures"], full["figures"]), key
            assert not full["shares_tower"] and full["shared_bytes"] == 0
            # FSDP2 with sharded frozen weights cannot share: phi got its own copies
            kept = mode == "dp" or not frozen
            assert lean["shares_tower"] == kept, key
            assert (lean["shared_bytes"] > 0) == kept, key
            # the tower runs once per step for both models (the lean phi's is theta's)
            assert lean["calls"] == full["calls"] == 2, key


if __name__ == "__main__":
    rank_main(sys.argv[1])
