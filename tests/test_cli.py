"""The ``mdgd`` command line: subcommands, help for every option, lazy bench import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mdgd.cli import build_demo_parser, main


def test_top_level_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fly"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_help_explains_every_option(capsys):
    parser = build_demo_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, f"option {action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--quick", "--seed", "--out", "--cache-dir", "--methods", "--threads", "--lr"):
        assert opt in out
    assert "Phase 1" in out and "Phase 2" in out


@pytest.mark.parametrize(
    "argv, module, prog",
    [
        (["--quick", "--workload", "small"], "ops", "mdgd bench"),
        (["ops", "--quick", "--workload", "small"], "ops", "mdgd bench"),
        (["step", "--quick", "--workload", "small"], "step", "mdgd bench step"),
    ],
    ids=["default-ops", "ops", "step"],
)
def test_bench_forwards_its_arguments(monkeypatch, argv, module, prog):
    from mdgd.cli import benchmark_module

    seen = []
    bench = benchmark_module(module)
    monkeypatch.setattr(bench, "main", lambda argv=None, prog=None: seen.append((argv, prog)))
    assert main(["bench", *argv]) == 0
    assert seen == [(["--quick", "--workload", "small"], prog)]


def test_python_m_mdgd_and_lazy_bench_import():
    code = (
        "import sys\n"
        "from mdgd.cli import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('BENCH_IMPORTED', 'mdgd_bench' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "BENCH_IMPORTED False" in out.stdout
    res = subprocess.run(
        [sys.executable, "-m", "mdgd", "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and "demo" in res.stdout


def test_deepspeed_launchers_local_rank_before_the_command(monkeypatch):
    """``deepspeed --num_gpus N $(which mdgd) train ...`` runs ``mdgd --local_rank=R train
    ...``: the flag is taken off (and sets LOCAL_RANK); after the command it is the
    Trainer's own flag and stays."""
    from mdgd.cli import _take_local_rank

    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded: restored (removed) after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert _take_local_rank(["--local_rank=1", "train", "--x", "1"]) == ["train", "--x", "1"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _take_local_rank(["--local-rank", "0", "info"]) == ["info"]
    assert _take_local_rank(["train", "--local_rank=3"]) == ["train", "--local_rank=3"]
