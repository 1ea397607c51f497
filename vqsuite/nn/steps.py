"""The current denoising step, as plain shared state: what a step hook publishes and quantized layers read.

A hook on the denoiser (:class:`vqsuite.calibrators.timestep.StepTracker`) publishes, for the forward call in
progress, one :class:`StepInfo` per classifier-free-guidance branch in the batch. Calibrators read it to keep
per-step statistics; a quantized layer with per-step static activation scales reads it to pick its scale. Neither
knows anything about pipelines or schedulers. The state is thread-local.

Slots: a layer keeps ``S`` static scales. ``"per_step"`` tables have one slot per step of the calibration
trajectory (``S`` = its number of steps); ``"bucketed"`` tables split the trajectory into ``S`` equal buckets by
position (step ``i`` of ``n`` goes to bucket ``floor(i * S / n)``), which does not depend on ``n``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: CFG branch names: the whole batch (no guidance), or its unconditional / conditional half
BRANCHES: tuple[str, ...] = ("all", "uncond", "cond")


@dataclass(frozen=True)
class StepInfo:
    """One denoiser call's place in the sampling loop, for one CFG branch.

    Attributes:
        index: 0-based step in the sampling loop (``-1`` when unknown: only ``t`` was seen).
        t: the timestep value the denoiser receives (its first element), ``nan`` if none.
        num_steps: steps in this sampling run (``0`` when unknown).
        branch: ``"all"`` (no guidance), ``"uncond"`` or ``"cond"``.
        rows: ``(start, stop)`` rows of the denoiser batch that belong to ``branch``.
        batch_size: rows of the denoiser batch (``0`` when unknown).
    """

    index: int
    t: float = math.nan
    num_steps: int = 0
    branch: str = "all"
    rows: tuple[int, int] | None = None
    batch_size: int = 0

    def __post_init__(self) -> None:
        if self.branch not in BRANCHES:
            raise ValueError(f"branch={self.branch!r} must be one of {', '.join(BRANCHES)}")

    @property
    def known(self) -> bool:
        """Both the step index and the trajectory length are known."""
        return self.index >= 0 and self.num_steps > 0


_state = threading.local()
_listeners: list[Callable[[StepInfo], None]] = []


def current_steps() -> tuple[StepInfo, ...]:
    """The step published for the forward call in progress: one entry per CFG branch, ``()`` when none."""
    return getattr(_state, "steps", ())


def current_step() -> StepInfo | None:
    """The first published branch of the current step (all branches share index and ``t``), or ``None``."""
    steps = current_steps()
    return steps[0] if steps else None


@contextlib.contextmanager
def publish(steps: StepInfo | tuple[StepInfo, ...]) -> Iterator[None]:
    """Make ``steps`` the current step inside the block (nests; restores the previous one) and tell listeners."""
    steps = (steps,) if isinstance(steps, StepInfo) else tuple(steps)
    before = current_steps()
    _state.steps = steps
    for s in steps:
        for fn in list(_listeners):
            fn(s)
    try:
        yield
    finally:
        _state.steps = before


def set_current(steps: tuple[StepInfo, ...]) -> tuple[StepInfo, ...]:
    """Set the current step without a ``with`` block (forward pre-hooks); returns the previous one."""
    before = current_steps()
    _state.steps = tuple(steps)
    for s in steps:
        for fn in list(_listeners):
            fn(s)
    return before


def restore(before: tuple[StepInfo, ...]) -> None:
    _state.steps = before


def add_listener(fn: Callable[[StepInfo], None]) -> Callable[[], None]:
    """Call ``fn(step)`` for every published step (each branch); returns a function that removes it."""
    _listeners.append(fn)

    def remove() -> None:
        if fn in _listeners:
            _listeners.remove(fn)

    return remove


def bucket_of(index: int, num_steps: int, n_buckets: int) -> int:
    """Bucket of step ``index`` of ``num_steps``: ``floor(index * n_buckets / num_steps)``, clamped."""
    if num_steps <= 0 or n_buckets <= 0:
        raise ValueError(f"num_steps={num_steps} and n_buckets={n_buckets} must be positive")
    return min(max(index * n_buckets // num_steps, 0), n_buckets - 1)


def slot_for(step: StepInfo, granularity: str, valid: list[bool], keys_t: list[float]) -> int | None:
    """Which of a layer's ``len(valid)`` scale slots serves ``step``; ``None`` if no slot is valid.

    ``per_step``: the step's own slot when the run has as many steps as the calibration did and that slot was
    calibrated; otherwise the calibrated slot whose mean timestep is nearest ``step.t`` (by relative position in
    the trajectory when timesteps are unknown). ``bucketed``: the step's bucket by position; if that bucket was
    never calibrated, the nearest calibrated bucket.
    """
    n = len(valid)
    ok = [i for i in range(n) if valid[i]]
    if not ok:
        return None
    if granularity == "bucketed":
        if step.known:
            b = bucket_of(step.index, step.num_steps, n)
        else:
            b = _nearest_by_t(step.t, ok, keys_t)
            if b is None:
                return ok[0]
        return b if valid[b] else min(ok, key=lambda i: (abs(i - b), i))
    if step.known and step.num_steps == n and valid[step.index % n]:
        return step.index % n
    near = _nearest_by_t(step.t, ok, keys_t)
    if near is not None:
        return near
    if step.known:
        pos = step.index / max(step.num_steps - 1, 1)
        return min(ok, key=lambda i: (abs(i / max(n - 1, 1) - pos), i))
    return ok[0]


def _nearest_by_t(t: float, ok: list[int], keys_t: list[float]) -> int | None:
    cands = [i for i in ok if math.isfinite(keys_t[i])]
    if not cands or not math.isfinite(t):
        return None
    return min(cands, key=lambda i: (abs(keys_t[i] - t), i))
