"""One rank of test_data's shared index build: ``python data_index_worker.py DATA IMAGES
MODEL OUT``; writes ``OUT/rank<R>.pt``: the index's arrays and lists, or the DataError."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from launch import run_rank  # noqa: E402

from mdgd.data import DataError, LlavaDataset  # noqa: E402
from mdgd.data.index import Index  # noqa: E402


def main() -> None:
    data, images, model, out = sys.argv[1:5]
    rank = int(os.environ["RANK"])

    def body() -> None:
        from transformers import AutoProcessor

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        proc = AutoProcessor.from_pretrained(model)
        try:
            ds = LlavaDataset(
                data, proc, images, cache_dir=os.path.join(out, "cache"), shared_build=True
            )
            result = {k: getattr(ds.index, k) for k in Index.ARRAYS}
            result["len"] = len(ds)
        except DataError as e:
            result = {"error": str(e)}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))

    run_rank(body)


if __name__ == "__main__":
    main()
