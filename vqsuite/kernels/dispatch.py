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
    """A fast implementation of an op and the predicate saying whether it can take a given call.

    ``pack`` (optional, ``qlinear`` only): ``pack(ops) -> dict[str, Tensor]``, the implementation's own weight
    layout built once from the stored codes; the layer keeps it as non-persistent buffers and passes it back in
    ``ops.packed`` (see :mod:`vqsuite.kernels.operands`).
    """

    name: str
    fn: Callable
    accepts: Callable[..., bool]
    pack: Callable[..., dict] | None = None


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


def select_impl(op: str, spec_preference: str, key: tuple, **call: object) -> KernelImpl:
    """Pick the :class:`KernelImpl` for ``op`` (the reference as one without ``pack``); ``key`` (e.g. the layer
    shape) identifies the log line. ``"triton"`` demands any fast implementation (Triton or the CPU family)."""
    pref = current_preference(spec_preference)
    chosen: KernelImpl | None = None
    if pref != "reference":
        for impl in _FAST.get(op, []):
            if impl.accepts(**call):
                chosen = impl
                break
        if chosen is None and pref == "triton":
            raise RuntimeError(f"kernel preference 'triton' but no fast {op} kernel accepts {key} here")
    if chosen is None:
        chosen = KernelImpl("reference", _REFERENCE[op], _accept_all)
    log_key = (op, key, chosen.name)
    if log_key not in _logged:
        _logged.add(log_key)
        logger.info("kernel %s %s -> %s (preference %s)", op, key, chosen.name, pref)
    return chosen


def select(op: str, spec_preference: str, key: tuple, **call: object) -> tuple[str, Callable]:
    """Pick ``(impl_name, fn)`` for ``op`` (:func:`select_impl` without the packing hook)."""
    impl = select_impl(op, spec_preference, key, **call)
    return impl.name, impl.fn


def _accept_all(**call: object) -> bool:
    return True
