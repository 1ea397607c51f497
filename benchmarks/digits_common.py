"""Shared pieces of the digit-pipeline benchmarks (``diffusion_quality.py``, ``timestep_scales.py``): grey digits as
RGB for the Inception, and the cached FID statistics of the first ``n`` MNIST test digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: where the reference statistics are cached
FID_CACHE = Path("~/.cache/vqsuite/fid")


def rgb(u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 1, H, W]`` -> ``[N, 3, H, W]`` (grey repeated)."""
    return u8.expand(-1, 3, -1, -1).contiguous()


def mnist_reference(net: Any, n: int) -> Any:
    """FID statistics (:class:`vqsuite.evals.fid.FeatureStats`) of the first ``n`` MNIST test digits, cached."""
    from vqsuite.evals.fid import cached_stats
    from vqsuite.zoo.datasets import mnist_test

    return cached_stats("mnist-test", lambda: rgb(mnist_test()[0][:n]), net, FID_CACHE.expanduser(), extra={"n": n},
                        progress=False)  # fmt: skip
