"""TFMQ-DM's temporal information block (METHODS.md §3): layers whose input depends only on the timestep.

The time-embedding MLP and every ResBlock's time projection (and a transformer's timestep / adaLN embedders)
see a function of ``t`` alone. Sampling visits a finite set of timesteps, so their activation ranges can be
calibrated exactly over that set (finite-set calibration): one static scale per step, i.e.
``act_granularity="per_step"`` with min-max ranges, read at inference through the step hook.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from vqsuite.config import QuantConfig, QuantSpec, resolve_config

#: layer-name patterns of the temporal information block (diffusers UNets, DiT/PixArt/FLUX embedders)
TEMPORAL_PATTERNS: tuple[str, ...] = (
    "time_embedding.*",
    "*.time_emb_proj",
    "*.temb_proj",
    "*emb_layers*",
    "*time_embed.*",
    "adaln_single.emb.*",
    "*timestep_embedder.*",
    "time_text_embed.timestep_embedder.*",
)


def temporal_layer_names(model: nn.Module, patterns: Sequence[str] = TEMPORAL_PATTERNS) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` in its temporal information block."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]


def with_temporal_calibration(
    config: str | QuantConfig | QuantSpec | dict,
    model: nn.Module,
    *,
    act: str = "int8",
    weight: str | None = "int8",
    patterns: Sequence[str] = TEMPORAL_PATTERNS,
) -> QuantConfig:
    """``config`` plus one exact-name override per temporal layer: weights as ``config`` says for that layer
    (``weight`` per channel if it keeps the layer in float), activations static ``act`` with one scale per step.

    The overrides come first, so they win over ``config``'s own patterns (and over a pipeline rule that keeps
    these layers in float).
    """
    cfg = resolve_config(config)
    overrides: list[tuple[str, QuantSpec | None]] = []
    for name in temporal_layer_names(model, patterns):
        base = cfg.spec_for(name)
        if base is None or base.weight is None:
            w, g, sd = weight, None, "float32"
        else:
            w, g, sd = base.weight, base.weight_group_size, base.scale_dtype
        spec = QuantSpec(
            weight=w,
            weight_group_size=g,
            scale_dtype=sd,
            act=act,
            act_mode="static",
            act_granularity="per_step",
            act_range="minmax",
        )
        overrides.append((_exact(name), spec))
    return cfg.with_overrides(overrides=tuple(overrides) + tuple(cfg.overrides))


def _exact(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)
