"""Finding layers that read the very same input tensor (q/k/v projections, FLUX's parallel MLP), by watching a
calibration run instead of knowing the architecture.

Two calls see "the same input" when the tensor they get is identical: same device, dtype, data pointer, shape,
strides and version counter, while the first tensor is still alive (so its memory cannot have been reused by a
different tensor). A layer's partners are the layers that got its input in *every* one of its calls; a group is
a set of layers that are each other's partners.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from vqsuite.calibrators.layer_input import register_input_hook

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    ref: weakref.ref
    names: list[str] = field(default_factory=list)


class SharedInputTracker:
    """Records which named layers receive identical input tensors; :meth:`groups` answers once a run is over."""

    def __init__(self) -> None:
        self._live: dict[tuple, _Entry] = {}
        self._dead: list[tuple] = []
        self._partners: dict[str, set[str]] = {}  # name -> layers that shared its input in every call so far
        self.calls: dict[str, int] = {}

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        try:
            version = x._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            version = -1
        return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), tuple(x.stride()), version)

    def _settle(self, entry: _Entry) -> None:
        """Fold one finished input's readers into every reader's partner set."""
        readers = set(entry.names)
        for name in readers:
            others = readers - {name}
            self._partners[name] = others if name not in self._partners else self._partners[name] & others

    def _flush_dead(self) -> None:
        while self._dead:
            key = self._dead.pop()
            entry = self._live.get(key)
            if entry is not None and entry.ref() is None:
                del self._live[key]
                self._settle(entry)

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Layer ``name`` is being called with input ``x``."""
        self._flush_dead()
        self.calls[name] = self.calls.get(name, 0) + 1
        key = self._key(x)
        entry = self._live.get(key)
        if entry is not None and entry.ref() is None:  # its tensor died; the memory may belong to a new one
            del self._live[key]
            self._settle(entry)
            entry = None
        if entry is None:
            dead = self._dead
            entry = _Entry(weakref.ref(x, lambda _ref, k=key: dead.append(k)))
            self._live[key] = entry
        entry.names.append(name)

    def finish(self) -> None:
        """Settle every input still alive (call after the run)."""
        self._flush_dead()
        for entry in self._live.values():
            self._settle(entry)
        self._live.clear()

    def partners(self, name: str) -> set[str]:
        return set(self._partners.get(name, set()))

    def groups(self, names: list[str]) -> list[list[str]]:
        """Partition ``names`` (in their order) into groups of mutual partners; unseen layers stand alone."""
        self.finish()
        wanted = set(names)
        parent = {n: n for n in names}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for n in names:
            for m in self._partners.get(n, set()) & wanted:
                if n in self._partners.get(m, set()):
                    parent[find(m)] = find(n)
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(find(n), []).append(n)
        return list(out.values())


@contextlib.contextmanager
def track_shared_inputs(modules: dict[str, nn.Module]) -> Iterator[SharedInputTracker]:
    """Hook ``modules`` (name -> module) and record which receive identical inputs (positional or ``input=``) while the
    ``with`` block runs the model; read ``tracker.groups(names)`` afterwards."""
    tracker = SharedInputTracker()
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, x: torch.Tensor) -> None:
            # empty inputs are skipped: they carry no data and two of them may share a data pointer by chance
            if x.numel() > 0:
                tracker.observe(name, x)

        return hook

    for name, m in modules.items():
        handles.append(register_input_hook(m, make_hook(name)))
    try:
        yield tracker
    finally:
        for h in handles:
            h.remove()
        tracker.finish()
