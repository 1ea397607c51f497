"""Kernel selection: frozen modules call one op; this module picks its implementation.

Preference order: the innermost ``with vqsuite.kernels.prefer(...)`` block, then the layer spec's ``kernel``
field. ``"auto"`` takes a registered fast implementation when it accepts the inputs (device, dtype, shape),
the plain-PyTorch reference otherwise; ``"reference"`` always takes the reference; ``"triton"`` demands the
fast path and raises if none accepts the inputs. The choice is logged once per (op, shape, choice).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vqsuite.config import KERNEL_PREFERENCES

logger = logging.getLogger(__name__)

_state = threading.local()
_logged: set[tuple] = set()


@dataclass(frozen=True)
class KernelImpl:
    """A fast implementation of an op and the predicate saying whether it can take a given call."""

    name: str
    fn: Callable
    accepts: Callable[..., bool]


_FAST: dict[str, list[KernelImpl]] = {}
_REFERENCE: dict[str, Callable] = {}


def register_reference(op: str, fn: Callable) -> None:
    _REFERENCE[op] = fn


def register_fast(op: str, impl: KernelImpl) -> None:
    _FAST.setdefault(op, []).append(impl)


@contextlib.contextmanager
def prefer(preference: str) -> Iterator[None]:
    """Force a kernel preference (``"auto"``, ``"triton"``, ``"reference"``) inside a ``with`` block."""
    if preference not in KERNEL_PREFERENCES:
        raise ValueError(f"preference={preference!r} must be one of {', '.join(KERNEL_PREFERENCES)}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(preference)
    try:
        yield
    finally:
        stack.pop()


def current_preference(default: str = "auto") -> str:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else default


def select(op: str, spec_preference: str, key: tuple, **call: object) -> tuple[str, Callable]:
    """Pick ``(impl_name, fn)`` for ``op``; ``key`` (e.g. the layer shape) identifies the log line."""
    pref = current_preference(spec_preference)
    chosen: tuple[str, Callable] | None = None
    if pref != "reference":
        for impl in _FAST.get(op, []):
            if impl.accepts(**call):
                chosen = (impl.name, impl.fn)
                break
        if chosen is None and pref == "triton":
            raise RuntimeError(f"kernel preference 'triton' but no fast {op} kernel accepts {key} here")
    if chosen is None:
        chosen = ("reference", _REFERENCE[op])
    log_key = (op, key, chosen[0])
    if log_key not in _logged:
        _logged.add(log_key)
        logger.info("kernel %s %s -> %s (preference %s)", op, key, chosen[0], pref)
    return chosen
