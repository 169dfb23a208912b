"""Checkpoint and resume of MDGDEngine: a resumed run continues exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from llava_tiny import (
    one_thread,  # noqa: F401  (fixture)
    random_batch,
    tiny_llava,
)
from safetensors.torch import load_file
from tiny_engines import make_engine, run_steps

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns

pytestmark = pytest.mark.usefixtures("one_thread")


def params(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


@pytest.mark.parametrize("mode", ["gm", "ft"])
def test_resume_continues_exactly(tmp_path, mode):
    torch.manual_seed(1234)
    full = make_engine(mode)
    figures_full = run_steps(full, range(4))

    torch.manual_seed(1234)
    first = make_engine(mode)
    run_steps(first, range(2))
    first.save_checkpoint(tmp_path / "ckpt")
    del first
    torch.manual_seed(999)  # a different RNG state: the checkpoint must restore it
    resumed = make_engine(mode)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step_count == 2
    figures_resumed = run_steps(resumed, range(2, 4))

    assert repr(figures_resumed) == repr(figures_full[2:])  # NaN-aware, bit-exact floats
    want, got = params(full), params(resumed)
    assert all(torch.equal(want[n], got[n]) for n in want), "resumed run diverged"
    for p_full, p_res in zip(full.theta.params, resumed.theta.params):
        s_full, s_res = full.optimizer.state[p_full], resumed.optimizer.state[p_res]
        assert set(s_full) == set(s_res)
        assert all(torch.equal(s_full[k], s_res[k]) for k in s_full)


def test_checkpoint_files_are_safe_to_load(tmp_path):
    engine = make_engine()
    run_steps(engine, range(1))
    engine.save_checkpoint(tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 1 and state["config"]["mode"] == "gm"
    tensors = load_file(str(tmp_path / state["tensors_file"]))
    assert {f"model/{n}" for n in engine.param_names} <= set(tensors)
    assert any(k.startswith("optimizer/state/") for k in tensors)
    assert "rng/torch" in tensors


def test_checkpoint_errors(tmp_path):
    engine = make_engine()
    run_steps(engine, range(1))
    engine.backward(random_batch(engine.model.config, seed=0))
    with pytest.raises(RuntimeError, match="middle of an accumulation|not stepped"):
        engine.save_checkpoint(tmp_path)
    engine.step()
    engine.save_checkpoint(tmp_path)

    other = make_engine()
    other.config = MDGDConfig(mode="gm", alpha=0.9, trainable=other.config.trainable)
    with pytest.warns(UserWarning, match="resumed run will differ"):
        other.load_checkpoint(tmp_path)

    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    fewer = MDGDEngine(
        theta, ref, None, MDGDConfig(mode="gm", trainable=llava_trainable_patterns(ref, 1))
    )
    with pytest.raises(ValueError, match="same trainable patterns"):
        fewer.load_checkpoint(tmp_path)
