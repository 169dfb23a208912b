"""Start-up of ``mdgd train`` on LLaVA-scale data: launch to first optimizer step, and RSS.

    python benchmarks/bench_startup.py                      # 665K conversations, 1 and 2 ranks
    python benchmarks/bench_startup.py --samples 20000 --src /path/to/older/checkout

Generates (once, in ``--workdir``) a LLaVA-format JSON list of ``--samples``
multi-turn conversations (1-6 rounds, 85% with one of 8 images, the rest
text-only) and a tiny LLaVA checkpoint (:func:`mdgd.testing.save_tiny_llava_checkpoint`), then
launches ``mdgd train`` (``--max_steps 1``, monitor off) under ``torchrun`` with
1 and with 2 ranks, first with an empty data cache (``fresh``), then again
(``relaunch``), then resuming from the relaunch's checkpoint (``resume``, one
more step). Each rank reports, from inside
the process: the seconds from the launch (the benchmark's clock before starting
torchrun) to the end of the first optimizer step, its RSS before ``mdgd train``
built anything (after the imports) and at that step, and its peak RSS. The
reference for "JSON parsing" is ``json.load`` of the same file in a fresh
process: its seconds and RSS growth.

``--src DIR`` imports ``mdgd`` from another checkout (e.g. a commit before the
lazy dataset: ``git worktree add /tmp/before <commit>``) to measure "before".

Caveats: the tiny model makes the model's own load negligible, so the figures
are the data's; the page cache is warm after the generation (a cold first read
of a 1 GB file adds the disk's time); 2 ranks share the machine's cores.
Results: a table, and JSON under ``benchmarks/results/`` (``startup-cpu-...``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "startup_worker.py"
WORDS = (
    "the a of and to in is what color shape picture image left right top bottom "
    "square dot red green blue black white one two three four five six seven eight "
    "there are this that with on at near some many it its small large show describe"
).split()
N_IMAGES = 8


def conversation(rng: np.random.Generator, image: str | None) -> dict:
    rounds = int(rng.integers(1, 7))  # 1-6 rounds: 3.5 on average
    turns = []
    for r in range(rounds):
        question = " ".join(rng.choice(WORDS, int(rng.integers(5, 25))))
        answer = " ".join(rng.choice(WORDS, int(rng.integers(5, 80))))
        if r == 0 and image is not None:
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    rec = {"id": f"{int(rng.integers(1 << 40)):011x}"}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = turns
    return rec


def write_data(path: Path, samples: int, seed: int = 0) -> None:
    """A LLaVA-format JSON list (one sample a line, as LLaVA's files are written)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(N_IMAGES):
        pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{k}.png")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write("[\n")
        for i in range(samples):
            image = f"{int(rng.integers(N_IMAGES))}.png" if rng.random() < 0.85 else None
            f.write(json.dumps(conversation(rng, image)) + (",\n" if i + 1 < samples else "\n"))
        f.write("]\n")
    os.replace(tmp, path)


def checkpoint(workdir: Path) -> Path:
    """A tiny LLaVA-1.5 (4 image tokens per image) whose tokenizer knows the data's words."""
    from mdgd.testing import save_tiny_llava_checkpoint

    path = workdir / "tiny-llava"
    if not (path / "config.json").is_file():
        words = [*WORDS, "USER", "ASSISTANT", ":"]
        save_tiny_llava_checkpoint(path, words, max_position_embeddings=4096)
    return path


def json_load_cost(path: Path) -> dict:
    """``json.load`` of ``path`` in a fresh process: seconds and RSS growth."""
    code = (
        "import json, resource, sys, time\n"
        "import psutil\n"
        "p = psutil.Process(); before = p.memory_info().rss; t = time.perf_counter()\n"
        "with open(sys.argv[1]) as f: data = json.load(f)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, "
        "'rss_growth': p.memory_info().rss - before, 'samples': len(data)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def launch(args, data: Path, model: Path, ranks: int, run: str, cache: Path) -> list[dict]:
    out = args.workdir / "runs" / f"{run}-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, MDGD_DATA_CACHE=str(cache), OMP_NUM_THREADS="1")
    env["BENCH_T0"] = repr(time.time())
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
        f"--master-port={args.port + ranks}", str(WORKER),
        "--model", str(model), "--data", str(data), "--output_dir", str(out),
        "--image-folder", str(data.parent / "images"),
        "--per_device_train_batch_size", "2", "--monitor-steps", "0",
        "--report_to", "none", "--use_cpu", "true",
        "--max-length", "2048", "--dataloader_num_workers", "0", "--train-layers", "1",
    ]  # fmt: skip
    if run == "resume":  # from the relaunch's checkpoint: its first step is step 2
        checkpoint = args.workdir / "runs" / f"relaunch-{ranks}" / "checkpoint-1"
        cmd += ["--max_steps", "2", "--resume_from_checkpoint", str(checkpoint)]
    else:  # the relaunch leaves a checkpoint for the resume
        cmd += ["--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        raise RuntimeError(f"{run} with {ranks} rank(s) failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"startup-rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=665_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mdgd-bench-startup"))
    parser.add_argument("--src", type=Path, help="import mdgd from this checkout instead")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["fresh", "relaunch", "resume"],
        choices=["fresh", "relaunch", "resume"],
        help="in this order: fresh empties the data cache, resume needs relaunch before it",
    )
    parser.add_argument("--port", type=int, default=29610)
    parser.add_argument("--timeout", type=float, default=7200.0)
    from mdgd_bench.results import add_arguments, save

    add_arguments(parser)
    args = parser.parse_args()
    args.quick = False

    started = _dt.datetime.now(_dt.timezone.utc)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"llava-{args.samples}.json"
    if not data.is_file():
        t = time.perf_counter()
        write_data(data, args.samples)
        print(f"generated {data} ({data.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    size = data.stat().st_size
    model = checkpoint(args.workdir)
    parse = json_load_cost(data)
    print(f"json.load: {parse['seconds']:.1f} s, +{parse['rss_growth'] / 1e6:.0f} MB RSS "
          f"({parse['rss_growth'] / size:.2f}x the file's {size / 1e6:.0f} MB)")  # fmt: skip
    rows = []
    print(f"{'run':<9} {'ranks':>5} {'rank':>4} {'to 1st step s':>13} {'RSS growth MB':>13} "
          f"{'x JSON size':>11} {'peak RSS MB':>11}")  # fmt: skip
    for ranks in args.ranks:
        cache = args.workdir / f"cache-{ranks}"
        shutil.rmtree(cache, ignore_errors=True)
        for run in args.runs:
            for r, rec in enumerate(launch(args, data, model, ranks, run, cache)):
                growth = rec["rss_first_step"] - rec["rss_before"]
                rows.append(dict(rec, run=run, ranks=ranks, rank=r, rss_growth=growth))
                print(f"{run:<9} {ranks:>5} {r:>4} {rec['seconds_to_first_step']:>13.1f} "
                      f"{growth / 1e6:>13.0f} {growth / size:>11.2f} "
                      f"{rec['peak_rss'] / 1e6:>11.0f}")  # fmt: skip
    record = {
        "benchmark": "startup",
        "machine": {"device": "cpu", "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "dtype": "fp32",  # the tiny model's; the figures are the data's
        "commit": _commit(args.src or ROOT),
        "samples": args.samples,
        "json_bytes": size,
        "json_load": parse,
        "rows": rows,
    }
    args.tag = "-".join(filter(None, [f"{args.samples // 1000}k", args.tag]))
    save(record, args, benchmark="startup", device="cpu", dtype="fp32", started=started)


def _commit(path: Path) -> str | None:
    out = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
