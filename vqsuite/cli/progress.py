"""Progress bars for the CLI's long loops (tqdm, on stderr; a silent stand-in when tqdm is missing)."""

from __future__ import annotations

import inspect
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def bar(total: int, desc: str, unit: str = "it", disable: bool = False) -> Any:
    """A tqdm bar over ``total`` items (to stderr, so stdout stays the command's result)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


class StepProgress:
    """A bar fed by a diffusers ``callback_on_step_end``: one tick per denoising step of every pipeline call.

    Used for calibration, whose loop lives inside :func:`vqsuite.quantize_pipeline`: the bar opens on the first
    step (so a recipe that needs no calibration shows none) and counts ``total`` steps.
    """

    def __init__(self, total: int, desc: str, disable: bool = False) -> None:
        self.total, self.desc, self.disable = total, desc, disable
        self._bar: Any = None
        self._n = 0

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._bar is None:
            self._bar = bar(self.total, self.desc, unit="step", disable=self.disable)
        self._bar.update(1)
        self._n += 1
        if self._n == self.total:  # the pipeline runs are over; what follows (SVD, GPTQ) has its own bars
            self._bar.close()
        return callback_kwargs

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def accepts_step_callback(pipe: Any) -> bool:
    try:
        return "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False
