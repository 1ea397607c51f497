"""Capturing layer inputs during calibration with bounded memory.

``InputStats`` keeps, per layer, running per-channel absolute maxima, a uniform reservoir of input rows
(tokens) and, optionally, the Gram matrix ``X^T X`` (for GPTQ). ``capture_inputs`` hooks a set of modules,
runs the model (or a pipeline) and returns their stats. Memory per layer is ``O(reservoir * K + K^2)``,
independent of how many prompts and steps are run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vqsuite.calibrators.layer_input import register_input_hook

logger = logging.getLogger(__name__)

#: rows kept per layer by default (enough for an output-error objective, small enough for FLUX-sized K)
DEFAULT_RESERVOIR = 512


class InputStats:
    """Running statistics of one layer's input ``x [..., K]`` (rows = tokens).

    Attributes:
        absmax: ``[K]`` float32, max |x| per input channel over every row seen.
        sample: ``[<= reservoir, K]`` float32, a uniform random sample of the rows seen (reservoir sampling
            by random priorities, so every row has the same chance whatever batch it came in).
        gram: ``[K, K]`` float64 ``sum x^T x`` over every row (only with ``track_gram``).
        n_rows: number of rows seen.
    """

    def __init__(
        self, in_features: int, reservoir: int = DEFAULT_RESERVOIR, track_gram: bool = False, seed: int = 0
    ) -> None:
        if reservoir <= 0:
            raise ValueError(f"reservoir={reservoir} must be positive")
        self.in_features = int(in_features)
        self.reservoir = int(reservoir)
        self.absmax = torch.zeros(in_features)
        self.sample = torch.zeros(0, in_features)
        self._keys = torch.zeros(0)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64) if track_gram else None
        self.n_rows = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x [..., K]`` (any device/dtype; stats live on CPU in float32/64)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} channels, stats expect {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).float()
        if rows.numel() == 0:
            return
        self.absmax = torch.maximum(self.absmax, rows.abs().amax(dim=0).cpu())
        if self.gram is not None:
            r64 = rows.double()
            self.gram += (r64.t() @ r64).cpu()
        keys = torch.rand(rows.shape[0], generator=self._gen)
        self.n_rows += rows.shape[0]
        keys_all = torch.cat([self._keys, keys])
        if keys_all.numel() <= self.reservoir:
            self.sample = torch.cat([self.sample, rows.cpu()])
            self._keys = keys_all
            return
        top = torch.topk(keys_all, self.reservoir).indices
        # pull only the selected new rows to the CPU
        n_old = self._keys.numel()
        old_sel = top[top < n_old]
        new_sel = top[top >= n_old] - n_old
        self.sample = torch.cat([self.sample[old_sel], rows[new_sel.to(rows.device)].cpu()])
        self._keys = torch.cat([self._keys[old_sel], keys[new_sel]])


def _rows_channel_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows of a layer as ``[..., K]``: an N-D conv (1-3 spatial dims) has its channels at dim ``-(N + 1)``
    of ``[B, C, *spatial]`` or unbatched ``[C, *spatial]``."""
    kernel = getattr(module, "kernel_size", None)
    if kernel is not None:
        dims = len(kernel) if isinstance(kernel, tuple | list) else 2  # a bare int: the 2-D case, as before
        if x.ndim in (dims + 1, dims + 2):
            return x.movedim(-(dims + 1), -1)
    return x


@contextlib.contextmanager
def capture_inputs(
    modules: dict[str, nn.Module],
    reservoir: int = DEFAULT_RESERVOIR,
    track_gram: bool = False,
    transform: Callable[[str, nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, InputStats]]:
    """Hook ``modules`` (name -> module) and collect :class:`InputStats` of their input (positional or ``input=``)
    while the ``with`` block runs the model. ``transform(name, module, x)`` may rewrite the input first."""
    stats: dict[str, InputStats] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, x: torch.Tensor) -> None:
            x = x if transform is None else transform(name, module, x)
            x = _rows_channel_last(module, x)
            if name not in stats:
                stats[name] = InputStats(x.shape[-1], reservoir, track_gram, seed=len(stats))
            stats[name].update(x)

        return hook

    for name, m in modules.items():
        handles.append(register_input_hook(m, make_hook(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
