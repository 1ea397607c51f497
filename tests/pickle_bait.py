"""Hostile pickles for the "nothing runs code from a file" tests, shared by every test module that plants one.

``Evil(marker)`` unpickles into ``open(marker, "w")``: what a crafted ``.bin``/``.pt``/``.pkl`` would do, harmlessly,
so a test asserts ``marker`` never appears. :func:`refuse_unpickling` makes every unpickling entry point record its
use and raise, so a test can also assert that no loader even tried.
"""

from __future__ import annotations

import builtins
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


class Evil:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def plant_pickle(file: Path, marker: Path) -> None:
    """Write a pickle of :class:`Evil` to ``file``."""
    file.write_bytes(pickle.dumps(Evil(marker)))


def refuse_unpickling(monkeypatch: pytest.MonkeyPatch, what: str) -> list[str]:
    """``pickle.load/loads/Unpickler`` and ``torch.load`` record their use and raise; returns the record (``what``
    names the operation in the raised message)."""
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., object]:
        def fn(*args: object, **kwargs: object) -> object:
            calls.append(name)
            raise AssertionError(f"{name} called while {what}")

        return fn

    class RefusingUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse("pickle.Unpickler")()

    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    return calls
