"""What every multi-process strategy shares: the mode choice, waiting with a
timeout, and the check that all ranks build the same engine."""

from __future__ import annotations

import datetime
import hashlib
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch has only those
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

FINGERPRINT_PARTS = (
    "trainable parameter names and shapes",
    "parameter dtypes and device type",
    "segment layout (granularity)",
    "MDGDConfig (mode, align, alpha, alpha_by, visual_weight, eps, ...)",
    "distributed mode",
)
# the backend and the waiting/bucketing settings may differ per rank: the same function
_PER_RANK_SETTINGS = ("distributed", "dist_timeout_s", "dist_bucket_mb", "backend")


def is_fsdp(model: nn.Module | None) -> bool:
    """True for a module wrapped by FSDP2's ``fully_shard``."""
    if model is None or not dist.is_available():  # a torch built without distributed
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_deepspeed(model: nn.Module | None) -> bool:
    """True for a ``deepspeed.DeepSpeedEngine`` (checked only once deepspeed is imported:
    a model cannot be one before, and mdgd never imports deepspeed on its own)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def unwrap(model: nn.Module | None) -> nn.Module | None:
    """The user's module inside a DeepSpeed engine (whose parameter names gain a
    ``module.`` prefix); ``model`` itself otherwise (FSDP2 keeps the module)."""
    return model.module if is_deepspeed(model) else model


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape: ZeRO-3 empties ``p.data`` and records it in ``ds_shape``
    (a DTensor's shape is already the global one)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def global_numel(p: torch.Tensor) -> int:
    return math.prod(global_shape(p))


def _wrapper(model: nn.Module) -> str | None:
    return "FSDP2" if is_fsdp(model) else "DeepSpeed" if is_deepspeed(model) else None


def resolve_mode(requested: str, model: nn.Module, ref_model: nn.Module | None) -> str:
    """The strategy name for ``MDGDConfig.distributed`` and the two models."""
    reject_wrapped(model, "model")
    if ref_model is not None:
        reject_wrapped(ref_model, "ref_model")
        if _wrapper(model) != _wrapper(ref_model):
            one, other = ("model", "ref_model") if _wrapper(model) else ("ref_model", "model")
            wrapper = _wrapper(model) or _wrapper(ref_model)
            how = {
                "FSDP2": ("FSDP2 (fully_shard)", "mdgd.shard_models(model, ref_model)"),
                "DeepSpeed": ("DeepSpeed", "mdgd.deepspeed_models(model, ref_model, ds_config)"),
            }[wrapper]
            raise ValueError(
                f"{one} is wrapped by {how[0]} but {other} is not: wrap both the same way, "
                f"e.g. with {how[1]}"
            )
    if is_deepspeed(model):
        if requested not in ("auto", "deepspeed"):
            raise ValueError(
                f"the models are DeepSpeed engines but distributed={requested!r}: use "
                "distributed='deepspeed' (or 'auto'), or pass unwrapped models"
            )
        return "deepspeed"
    if requested == "deepspeed":
        raise ValueError(
            "distributed='deepspeed' needs DeepSpeed engines of both models: build them with "
            "mdgd.deepspeed_models(model, ref_model, ds_config) (docs/distributed.md)"
        )
    sharded = is_fsdp(model)
    if requested == "auto":
        if sharded:
            return "fsdp"
        ready = dist.is_available() and dist.is_initialized()
        return "dp" if ready and dist.get_world_size() > 1 else "none"
    if sharded and requested != "fsdp":
        raise ValueError(
            f"the models are wrapped by FSDP2 (fully_shard) but distributed={requested!r}: "
            "use distributed='fsdp' (or 'auto'), or pass unwrapped models"
        )
    if requested == "fsdp" and not sharded:
        raise ValueError(
            "distributed='fsdp' needs models wrapped by FSDP2: call "
            "mdgd.shard_models(model, ref_model) (or fully_shard each) before building the engine"
        )
    if requested == "dp" and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed='dp' needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (torchrun / accelerate launch "
            "set the environment for it), or use distributed='none'"
        )
    return requested


def reject_wrapped(model: nn.Module, which: str) -> None:
    """DDP and FSDP1 own gradient reduction in ways MDGD's two backward calls break."""
    names = {c.__name__ for c in type(model).__mro__}
    wrapper = names & {"DistributedDataParallel", "FullyShardedDataParallel"}
    if wrapper:
        raise ValueError(
            f"{which} is wrapped in {sorted(wrapper)[0]}: pass the unwrapped model (the MDGD "
            "driver owns the collectives, MDGDConfig(distributed='dp')) or shard it with FSDP2 "
            "(mdgd.shard_models). DDP averages only the first of MDGD's two backward calls "
            "and FSDP1 keeps the gradients in its own flat buffers"
        )


def fingerprint(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    segment_sizes: Sequence[int],
    config: dict[str, Any],
    mode: str,
) -> list[int]:
    """One 64-bit hash per part of :data:`FINGERPRINT_PARTS`, then three counts
    (tensors, elements, segments) for the message."""
    cfg = {k: v for k, v in config.items() if k not in _PER_RANK_SETTINGS}
    parts = [
        list(zip(names, shapes)),
        [str(dtype), device.type],
        list(segment_sizes),
        sorted(cfg.items()),
        mode,
    ]
    out = []
    for part in parts:
        digest = hashlib.sha256(repr(part).encode()).digest()
        out.append(int.from_bytes(digest[:8], "little", signed=True))
    return out + [len(names), sum(segment_sizes), len(segment_sizes)]


class Collectives:
    """The driver's collectives on one process group, each awaited with a timeout."""

    def __init__(self, group: Any, timeout_s: float) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        # NCCL's wait(timeout) blocks the host; there the process group's watchdog times out
        self.host_wait = dist.get_backend(group) != "nccl"

    def wait(self, work: Any, what: str) -> None:
        try:
            if self.host_wait:
                work.wait(timeout=self.timeout)
            else:
                work.wait()
        except RuntimeError as e:
            raise RuntimeError(
                f"mdgd (rank {self.rank} of {self.world}): the {what} did not complete "
                f"({e}); timeout {self.timeout.total_seconds():g} s "
                "(MDGDConfig.dist_timeout_s). Another rank failed or did not reach the same "
                "step: check the other ranks' logs"
            ) from e

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``t`` over the ranks in place (waits); returns it."""
        self.wait(dist.all_reduce(t, group=self.group, async_op=True), what)
        return t

    def global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def check_agreement(self, mine: list[int], local_error: str | None = None) -> None:
        """All-gather ``mine`` (a :func:`fingerprint`) and a flag for ``local_error``;
        raise the same ValueError on every rank when any rank has an error or differs."""
        local = torch.tensor(mine + [local_error is not None], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            local = local.cuda()
        every = torch.empty(self.world * local.numel(), dtype=torch.int64, device=local.device)
        work = all_gather_single(every, local, group=self.group, async_op=True)
        try:
            work.wait(timeout=self.timeout)  # once, at construction: a host wait is fine
        except RuntimeError as e:
            raise RuntimeError(
                f"mdgd (rank {self.rank} of {self.world}): the other ranks did not check in "
                f"their configuration within {self.timeout.total_seconds():g} s "
                "(MDGDConfig.dist_timeout_s): one of them failed before constructing its "
                f"MDGDEngine, or never constructs one ({e})"
            ) from e
        rows = every.view(self.world, -1).cpu().tolist()
        if local_error is not None:
            raise ValueError(local_error)
        failed = [r for r, row in enumerate(rows) if row[-1]]
        if failed:
            raise ValueError(
                f"mdgd: rank {failed[0]} could not build its MDGDEngine (see its error: the "
                "models are not wrapped alike there); every rank stops"
            )
        for r, row in enumerate(rows):
            for i, what in enumerate(FINGERPRINT_PARTS):
                if row[i] != rows[0][i]:
                    n0, e0, s0 = rows[0][-4:-1]
                    n1, e1, s1 = row[-4:-1]
                    raise ValueError(
                        f"mdgd: ranks disagree on the {what}: rank 0 and rank {r} differ "
                        f"(rank 0: {n0} trainable tensors, {e0:,} elements, {s0} segments; "
                        f"rank {r}: {n1} tensors, {e1:,} elements, {s1} segments). Every rank "
                        "must build the same model, trainable patterns and MDGDConfig"
                    )


def raised_by_a_collective(e: BaseException) -> bool:
    """Whether ``e`` came out of a torch.distributed collective (its innermost frame)."""
    if not isinstance(e, RuntimeError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("distributed_c10d.py")


def check_same_modality(
    comm: Collectives, visual: Any, model: nn.Module, batch: Any, device: Any, who: str
) -> None:
    """Raise the same ValueError on every rank unless the ranks' micro-batches are all
    text-only or all have images (one tiny all-reduce).

    Under a strategy whose forward and backward run collectives per module
    (``who``: FSDP2, DeepSpeed ZeRO), a text-only micro-batch skips the vision
    tower, the projector and the ``h`` backward, so the ranks would issue
    different collectives and hang.
    """
    from ..batches import is_text_only

    flag = torch.tensor([float(is_text_only(visual, model, batch))], device=device)
    text_only = int(comm.all_reduce(flag, "all-reduce of the text-only flags").item())
    if 0 < text_only < comm.world:
        raise ValueError(
            f"under {who} the ranks' micro-batches must all have images or all be "
            f"text-only, but {text_only} of {comm.world} ranks have a text-only one: each "
            f"rank would run other {who} collectives (the vision tower's). Group the "
            "samples by modality: --group-by-modality-length (mdgd train; on by default "
            "under FSDP2 and DeepSpeed) or MDGDTrainer(group_by_modality_length=True), with "
            "a dataset that has modality_lengths; or use distributed='dp'"
        )


def check_micro_batches(total: float, n: int, world: int) -> None:
    """Every rank must accumulate the same number of micro-batches per step."""
    if not math.isclose(total, n * world):
        raise ValueError(
            f"mdgd: this rank accumulated {n} micro-batch(es) but the {world} ranks "
            f"{int(total)} in all: every rank must run the same number of micro-batches "
            "per optimizer step"
        )


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """``name`` without the parts that wrappers insert (activation checkpointing's
    ``checkpoint_wrapper``, ``torch.compile``), so that theta's and phi's names match."""
    for part in _WRAPPER_PREFIXES:
        name = name.replace(part, "")
    return name
