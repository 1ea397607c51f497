"""Sharding work across processes with accelerate, gathering on every process in the original order.

Sample generation and feature extraction are "map over N items in batches": each process takes a contiguous
share of the item indices (``Accelerator.split_between_processes``), runs its batches, and the per-process results
are gathered back (``accelerate.utils.gather_object``, rank order = item order), so the gathered tensor equals the
single-process one. Launch with ``accelerate launch [--cpu] --num_processes K ...``; without a launcher (or with
``accelerator=None``) everything runs in this process. Only the main process should write files
(:func:`is_main_process`).

API::

    acc = get_accelerator()                       # None when not launched by accelerate with > 1 process
    out = sharded_map(fn, n, batch_size=8, accelerator=acc, desc="features")   # fn(indices: list[int]) -> Tensor
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("ACCELERATE_NUM_PROCESSES", "1") or 1) > 1


def get_accelerator(cpu: bool | None = None) -> Any:
    """An ``accelerate.Accelerator`` when this process was started by a multi-process launcher, else ``None``.

    ``cpu=True`` forces the CPU (gloo) backend; by default it follows ``torch.cuda.is_available()``.
    """
    if not _launched():
        return None
    from accelerate import Accelerator

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    acc = Accelerator(cpu=cpu)
    logger.info("accelerate: process %d of %d on %s", acc.process_index, acc.num_processes, acc.device)
    return acc


def is_main_process(accelerator: Any = None) -> bool:
    return accelerator is None or bool(accelerator.is_main_process)


def num_processes(accelerator: Any = None) -> int:
    return 1 if accelerator is None else int(accelerator.num_processes)


def shard(items: list[Any], accelerator: Any = None) -> list[Any]:
    """This process's contiguous share of ``items`` (all of them without an accelerator)."""
    if num_processes(accelerator) == 1:
        return list(items)
    with accelerator.split_between_processes(list(items)) as part:
        return list(part)


def gather_tensors(local: torch.Tensor, accelerator: Any = None) -> torch.Tensor:
    """Concatenate every process's ``local`` (uneven first dims allowed) in rank order, on every process."""
    if num_processes(accelerator) == 1:
        return local
    from accelerate.utils import gather_object

    parts = [p for p in gather_object([local.cpu()]) if p.numel()]
    return torch.cat(parts, dim=0) if parts else local


def sharded_map(
    fn: Callable[[list[int]], torch.Tensor],
    n: int,
    *,
    batch_size: int = 16,
    accelerator: Any = None,
    desc: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``cat([fn(batch) for batch in batches(range(n))])``, the batches spread over the processes.

    ``fn`` receives a list of item indices and returns a tensor whose first dim is their count. Every process gets
    the full gathered result; batches are cut inside each process's share, so the result does not depend on the
    number of processes (for deterministic per-item ``fn``).
    """
    from tqdm.auto import tqdm

    mine = shard(list(range(n)), accelerator)
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    outs = []
    bar = tqdm(batches, desc=desc, disable=not progress or not is_main_process(accelerator), leave=False)
    for b in bar:
        outs.append(fn(b))
    if outs:
        local = torch.cat(outs, dim=0)
    else:  # a process with no share still takes part in the gather
        local = torch.empty(0)
    return gather_tensors(local, accelerator)
