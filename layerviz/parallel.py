"""Data parallelism on ``torch.distributed``: the same run in N processes, each with a share of the work.

Launched by the ecosystem's engines, never by layerviz itself::

    torchrun --nproc_per_node 2 -m layerviz run configs/demo.yaml
    accelerate launch --num_processes 2 -m layerviz run configs/demo.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m layerviz run CONFIG

Both set RANK / WORLD_SIZE / MASTER_ADDR; ``init()`` (called by the CLI) joins the process group (gloo
on CPU, NCCL on CUDA). What is split: the users of every evaluation (``TaskEvaluator``: test metrics,
PMI-calibration choices, ablations, subset evaluations), and the probe prompts of the importance pass
(per-sample rows, summed across processes). Each process computes its contiguous share; the results are
gathered in rank order, so every process holds the same full result. Rank 0 alone writes results and
caches (``store.cached``); the others compute into a private folder and wait at a barrier. In one process
(no launcher) every function here is a no-op and nothing changes.
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np


def _dist():
    """torch.distributed where it is loaded, else None: a process group needs it loaded, so importing this module
    (and the store, and the data below it) loads no torch."""
    return sys.modules.get("torch.distributed")


def active() -> bool:
    """Whether this process is one of several (a torch.distributed group of size > 1)."""
    dist = _dist()
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes."""
    return rank() == 0


def backend_for(device: str | None = None) -> str:
    """'nccl' for CUDA devices, 'gloo' otherwise (``LAYERVIZ_DIST_BACKEND`` overrides; NCCL needs CUDA)."""
    import torch  # heavy import: only to launch, or to check a device

    wanted = os.environ.get("LAYERVIZ_DIST_BACKEND") or ("nccl" if str(device or "").startswith("cuda") else "gloo")
    if wanted == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("NCCL was requested (LAYERVIZ_DIST_BACKEND=nccl or a cuda device) but this machine has "
                           "no CUDA device; use gloo (unset LAYERVIZ_DIST_BACKEND, or device: cpu)")
    return wanted


def init(device: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group that torchrun / accelerate launch describe in the environment -> whether joined.

    Without a launcher (WORLD_SIZE unset or 1) nothing happens. ``timeout_s``: how long a collective waits
    for a peer before failing (a dead process fails the run instead of hanging it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return active()
    import torch  # heavy import: a launcher started this process, so it computes with torch anyway
    import torch.distributed as dist  # (as above)

    if dist.is_available() and dist.is_initialized():
        return active()
    backend = backend_for(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("RANK", "0")) != 0:
        os.environ["LAYERVIZ_PROGRESS"] = "0"  # one set of progress bars: rank 0's
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shard(n: int) -> range:
    """This process's contiguous share of ``n`` items (rank order; sizes differ by at most one)."""
    r, w = rank(), world_size()
    return range(r * n // w, (r + 1) * n // w)


def batches(n: int, batch_size: int) -> list[list[int]]:
    """This process's share of the batches a single process would run over ``n`` items (the same batches,
    whole, so each item meets the same arithmetic as in one process)."""
    all_batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    return [all_batches[i] for i in shard(len(all_batches))]


def check_enough(n: int, what: str) -> None:
    """Refuse more processes than items: every process must have work (``what`` names the items)."""
    if world_size() > n:
        raise ValueError(f"{world_size()} processes but only {n} {what}: launch at most {n} processes "
                         f"(torchrun --nproc_per_node), or ask for more {what}")


def gather(local: list) -> list:
    """Every process's ``local`` list, concatenated in rank order (the same on every process)."""
    if not active():
        return list(local)
    parts: list = [None] * world_size()
    _dist().all_gather_object(parts, list(local))
    return [x for p in parts for x in p]


def sum_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Element-wise sums across processes of named float arrays (each process holds its own rows, zeros
    elsewhere, so a sum is exact)."""
    if not active():
        return arrays
    parts: list = [None] * world_size()
    _dist().all_gather_object(parts, arrays)
    return {k: np.sum([p[k] for p in parts], axis=0) for k in arrays}


def all_sum(x: float) -> float:
    """The sum over processes of a number (``x`` itself in one process)."""
    if not active():
        return x
    parts: list = [None] * world_size()
    _dist().all_gather_object(parts, x)
    return type(x)(sum(parts))


def all_reduce_grads(params) -> None:
    """Sum the parameters' gradients over processes, in one flat buffer (what DDP does after backward): each
    process back-propagated its share of the examples. A parameter without a gradient counts as zeros."""
    if not active():
        return
    import torch  # loaded already: a process group is active

    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    _dist().all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def barrier() -> None:
    if active():
        _dist().barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every process."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]
