"""Crash-safe checkpoints: atomic saves, corrupted files and mismatched engines.

A save interrupted at any of its file operations leaves the previous checkpoint
loadable; a load that fails (truncated, corrupted, another trainable set, segment
layout or mode) names the file and the mismatch and changes nothing.
"""

from __future__ import annotations

import os

import pytest
import torch
from llava_tiny import one_thread, tiny_llava  # noqa: F401  (fixture)
from tiny_engines import make_engine, run_steps

import mdgd.checkpoint as ckpt
import mdgd.checkpoint_files as ckpt_files
from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(engine) -> dict[str, torch.Tensor]:
    """theta's trainable parameters and the optimizer's tensors, cloned."""
    out = {f"p/{n}": p.detach().clone() for n, p in zip(engine.param_names, engine.theta.params)}
    for i, st in enumerate(engine.optimizer.state.values()):
        out |= {f"o/{i}/{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)}
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loaded(path, mode="gm") -> dict[str, torch.Tensor]:
    engine = make_engine(mode)
    engine.load_checkpoint(path)
    return snapshot(engine)


class Killed(BaseException):
    """Stands for the process dying: nothing of the save after it runs."""


# every file operation of a save, in the order they happen
FILE_OPS = [(os, "replace"), (os, "fsync"), (ckpt_files, "save_file"), (torch, "save")]


def interrupted_save(engine, path, monkeypatch, at: int) -> list[str]:
    """Save, dying at the ``at``-th file operation (before it runs); returns the names
    of the operations called."""
    calls = []

    def wrap(fn, name):
        def op(*args, **kwargs):
            calls.append(name)
            if len(calls) == at:
                raise Killed
            return fn(*args, **kwargs)

        return op

    with monkeypatch.context() as m:
        for mod, name in FILE_OPS:
            m.setattr(mod, name, wrap(getattr(mod, name), name))
        try:
            engine.save_checkpoint(path)
        except Killed:
            pass
    return calls


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    engine = make_engine()
    run_steps(engine, range(1))
    engine.save_checkpoint(tmp_path)
    old = snapshot(engine)
    run_steps(engine, range(1, 2))
    new = snapshot(engine)
    ops = interrupted_save(engine, tmp_path / "probe", monkeypatch, at=0)
    assert ops.count("replace") == 2 and len(ops) >= 6, ops
    commit = len(ops) - ops[::-1].index("replace")  # the rename of state.pt
    for at in range(1, len(ops) + 1):
        interrupted_save(engine, tmp_path, monkeypatch, at)
        got = loaded(tmp_path)
        assert same(got, new if at > commit else old), f"dying at {ops[at - 1]} (#{at})"
    engine.save_checkpoint(tmp_path)
    assert same(loaded(tmp_path), new)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert len(names) == 2 and names[0] == "state.pt", f"older generations remain: {names}"


def saved(tmp_path):
    engine = make_engine()
    run_steps(engine, range(1))
    engine.save_checkpoint(tmp_path)
    return engine


def tensors_file(path):
    return path / torch.load(path / "state.pt", weights_only=True)["tensors_file"]


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, which, match",
    [
        (truncate, "tensors", "truncated or corrupted"),
        (flip_byte, "tensors", "truncated or corrupted"),
        (truncate, "state", "truncated or corrupted"),
        (flip_byte, "state", "corrupted|format"),
        (lambda f: f.unlink(), "tensors", "does not exist"),
    ],
    ids=["truncated-tensors", "flipped-tensors", "truncated-state", "flipped-state", "no-tensors"],
)
def test_damaged_checkpoint_raises_and_loads_nothing(tmp_path, damage, which, match):
    saved(tmp_path)
    file = tensors_file(tmp_path) if which == "tensors" else tmp_path / "state.pt"
    damage(file)
    engine = make_engine()
    run_steps(engine, range(2))
    before = snapshot(engine)
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        engine.load_checkpoint(tmp_path)
    assert file.name in str(info.value), "the error must name the file"
    assert same(snapshot(engine), before) and engine.step_count == 2


def test_pickled_code_is_refused(tmp_path):
    """state.pt is read with weights_only=True: an object that would run code is refused."""
    saved(tmp_path)
    torch.save({"format": ckpt.FORMAT, "evil": os.system}, tmp_path / "state.pt")
    with pytest.raises(ckpt.CheckpointError, match="state.pt"):
        make_engine().load_checkpoint(tmp_path)


def _other_trainable():
    ref = tiny_llava(seed=0, attention_dropout=0.2)
    cfg = MDGDConfig(mode="gm", alpha=0.5, trainable=llava_trainable_patterns(ref.config, 1))
    return _with_optimizer(MDGDEngine(tiny_llava(seed=1, attention_dropout=0.2), ref, None, cfg))


def _other_shapes():
    kw = dict(attention_dropout=0.2, text_hidden=48)
    ref = tiny_llava(seed=0, **kw)
    cfg = MDGDConfig(mode="gm", alpha=0.5, trainable=llava_trainable_patterns(ref.config, 2))
    return _with_optimizer(MDGDEngine(tiny_llava(seed=1, **kw), ref, None, cfg))


def _other_config(**change):
    engine = make_engine()
    cfg = engine.config.to_dict() | change
    engine.config = MDGDConfig(
        **{k: v for k, v in cfg.items() if k != "trainable"}, trainable=engine.config.trainable
    )
    return engine


def _with_optimizer(engine):
    params = [p for p in engine.model.parameters() if p.requires_grad]
    engine.optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: 1.0)
    return engine


@pytest.mark.parametrize(
    "build, match",
    [
        (_other_trainable, "trains .* parameters, this engine"),
        (_other_shapes, "has .* of shape"),
        (lambda: make_engine("mdgd"), "mode='gm', this engine has mode='mdgd'"),
        (lambda: _other_config(granularity="block:64"), "granularity='tensor'"),
    ],
    ids=["trainable-set", "shapes", "mode", "segment-layout"],
)
def test_mismatched_checkpoint_raises_and_loads_nothing(tmp_path, build, match):
    saved(tmp_path)
    engine = build()
    before = snapshot(engine)
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        engine.load_checkpoint(tmp_path)
    assert "state.pt" in str(info.value)
    assert same(snapshot(engine), before) and engine.step_count == 0
