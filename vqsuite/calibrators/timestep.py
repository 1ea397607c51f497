"""Timestep-aware calibration: the step hook on the denoiser, step sampling, per-step statistics.

:class:`StepTracker` hooks a denoiser (UNet or transformer) and, for every forward call, publishes the step in
progress (:class:`~vqsuite.nn.steps.StepInfo`: index, timestep value, number of steps, CFG branch) through
:mod:`vqsuite.nn.steps`. Calibrators and quantized layers read it there, knowing nothing of the pipeline. With a
pipeline the tracker duck-types what it needs: ``pipe.scheduler.timesteps`` gives the step index and count (a
new ``timesteps`` tensor means a new sampling run), ``pipe.prepare_latents`` gives the latent batch, and a
denoiser batch twice that size holds both classifier-free-guidance branches (unconditional first, as diffusers
concatenates them), published as two entries with their rows.

Step sampling (which steps feed calibration statistics): :func:`all_steps`, :func:`uniform_steps` (Q-Diffusion's
``cali_st`` steps at even spacing), :func:`normal_steps` (PTQ4DM: ``t = int(N(mu, sigma^2) * T)``, indices counted
from the noisiest step).

:func:`calibrate_static_scales` observes static-activation layers with bounded memory (a
:class:`~vqsuite.calibrators.ranges.RangeObserver` per layer and per step slot, plus a pooled one) and stores their
scales: pooled, per step, or per bucket (``QuantSpec.act_granularity``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators.data import CalibData
from vqsuite.calibrators.minmax import check_reached, observe_layer_inputs, smoothed_input
from vqsuite.calibrators.ranges import DEFAULT_VALUE_RESERVOIR, RangeObserver, static_scale
from vqsuite.errors import ConfigError, UserError
from vqsuite.nn import steps as _steps
from vqsuite.nn.steps import StepInfo, bucket_of, current_steps

logger = logging.getLogger(__name__)

#: relative tolerance when matching a timestep against the scheduler's
TIMESTEP_MATCH_RTOL = 1e-4
#: ``uniform_steps``/``normal_steps`` default PTQ4DM parameters (code defaults, METHODS.md §3)
PTQ4DM_MU, PTQ4DM_SIGMA = 0.5, 0.35


# ------------------------------------------------------------------------------ the hook
def _timestep_of(args: tuple, kwargs: dict) -> torch.Tensor | float | None:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if "t" in kwargs:
        return kwargs["t"]
    if len(args) > 1 and isinstance(args[1], (torch.Tensor, int, float)):
        return args[1]
    return None


def _batch_of(args: tuple, kwargs: dict) -> int:
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None:
        for k in ("sample", "hidden_states", "x"):
            if isinstance(kwargs.get(k), torch.Tensor):
                x = kwargs[k]
                break
    return int(x.shape[0]) if x is not None and x.ndim > 0 else 0


def _first_value(t: torch.Tensor | float | None) -> float:
    if t is None:
        return math.nan
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else math.nan
    return float(t)


class StepTracker:
    """Publishes the current step around every forward call of ``denoiser`` (see the module docstring).

    Args:
        denoiser: the module whose forward is one denoising step (its timestep is ``timestep=`` or the second
            positional argument).
        scheduler: a callable returning the scheduler (its ``timesteps`` give index and step count), or ``None``.
        cfg: ``True``/``False``, a callable returning it, or ``None`` to infer it from the latent batch.
        num_steps: the trajectory length when there is no scheduler (the index then counts calls).
        latent_batch: a callable returning the latent batch of the running pipeline call (or ``None``).
        cfg_hint: asked when the latent batch is unknown (a pipeline's ``do_classifier_free_guidance``).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        scheduler: Callable[[], Any] | None = None,
        cfg: bool | Callable[[], bool] | None = None,
        num_steps: int | None = None,
        latent_batch: Callable[[], int | None] | None = None,
        cfg_hint: Callable[[], bool | None] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self._cfg_hint = cfg_hint
        self._scheduler = scheduler
        self._cfg = cfg
        self.num_steps = num_steps
        self._latent_batch = latent_batch
        self._run_key: int | None = None
        self._last_index = -1
        self._calls = 0
        self._before: list[tuple[StepInfo, ...]] = []
        self._undo: list[Callable[[], None]] = []
        self._handles = [
            denoiser.register_forward_pre_hook(self._pre, with_kwargs=True),
            denoiser.register_forward_hook(self._post, always_call=True),
        ]

    # -- what the hook publishes
    def new_run(self) -> None:
        """Start counting steps from 0 (a new sampling loop)."""
        self._calls = 0
        self._last_index = -1
        self._run_key = None

    def _locate(self, t: float) -> tuple[int, int]:
        """(index, num_steps) of a call with timestep ``t``; (-1, 0) when nothing tells."""
        sched = self._scheduler() if self._scheduler is not None else None
        timesteps = getattr(sched, "timesteps", None) if sched is not None else None
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
            if self._run_key != id(timesteps):  # set_timesteps made a new tensor: a new sampling run
                self.new_run()
                self._run_key = id(timesteps)
            ts = timesteps.detach().double().cpu().reshape(-1)
            n = int(ts.numel())
            if math.isfinite(t):
                for cand in (t, t * 1000.0):  # FLUX-style denoisers get t / 1000
                    hit = ((ts - cand).abs() <= TIMESTEP_MATCH_RTOL * max(1.0, abs(cand))).nonzero().reshape(-1)
                    if hit.numel():
                        pos = hit.tolist()
                        if self._last_index in pos:  # the same step again (CFG branches in separate calls)
                            return self._last_index, n
                        later = [p for p in pos if p > self._last_index]
                        return (later[0] if later else pos[0]), n
            return min(self._calls, n - 1), n
        if self.num_steps:
            return self._calls % self.num_steps, self.num_steps
        return -1, 0

    def _use_cfg(self, batch: int) -> bool:
        if batch < 2 or batch % 2:
            return False
        cfg = self._cfg
        if cfg is not None:
            return bool(cfg() if callable(cfg) else cfg)
        latent = self._latent_batch() if self._latent_batch is not None else None
        if latent is not None:
            return batch == 2 * latent
        hint = self._cfg_hint() if self._cfg_hint is not None else None
        return bool(hint)

    def steps_for(self, t: float, batch: int) -> tuple[StepInfo, ...]:
        index, n = self._locate(t)
        if self._use_cfg(batch):
            h = batch // 2
            return (
                StepInfo(index, t, n, "uncond", (0, h), batch),
                StepInfo(index, t, n, "cond", (h, batch), batch),
            )
        return (StepInfo(index, t, n, "all", (0, batch) if batch else None, batch),)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        outer = current_steps()
        t = _first_value(_timestep_of(args, kwargs))
        if outer and outer[0].known and self._scheduler is None and not self.num_steps:
            infos = outer  # a caller published a richer step; a bare tracker keeps it
        else:
            infos = self.steps_for(t, _batch_of(args, kwargs))
        self._before.append(_steps.set_current(infos))
        self._last_index = infos[0].index
        self._calls += 1

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._before:
            _steps.restore(self._before.pop())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for undo in self._undo:
            undo()
        self._undo = []
        if self.denoiser.__dict__.get("_vqsuite_step_tracker") is self:
            del self.denoiser.__dict__["_vqsuite_step_tracker"]


def _pipeline_denoiser(pipe: Any) -> nn.Module | None:
    for name in ("unet", "transformer", "prior"):
        m = getattr(pipe, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def attach_step_tracker(
    target: Any,
    *,
    denoiser: nn.Module | None = None,
    cfg: bool | Callable[[], bool] | None = None,
    num_steps: int | None = None,
) -> StepTracker:
    """Hook a pipeline's denoiser (or a bare denoiser module) so it publishes the current step. Replaces a
    tracker already attached to the same denoiser. Returns the tracker (``tracker.remove()`` detaches it).

    For a pipeline (an object with ``scheduler`` and a ``unet``/``transformer``): the scheduler's timesteps give
    index and count, ``prepare_latents`` gives the latent batch (CFG when the denoiser batch is twice it).
    """
    is_module = isinstance(target, nn.Module)
    den = denoiser if denoiser is not None else (target if is_module else _pipeline_denoiser(target))
    if den is None:
        raise UserError(f"cannot find the denoiser of {type(target).__name__}; pass denoiser=")
    old = den.__dict__.get("_vqsuite_step_tracker")
    if old is not None:
        old.remove()
    if is_module:
        tracker = StepTracker(den, cfg=cfg, num_steps=num_steps)
    else:
        pipe = target
        state: dict[str, int | None] = {"latent": None}
        tracker = StepTracker(
            den,
            scheduler=lambda: getattr(pipe, "scheduler", None),
            cfg=cfg,
            num_steps=num_steps,
            latent_batch=lambda: state["latent"],
            cfg_hint=lambda: getattr(pipe, "do_classifier_free_guidance", None),
        )
        prepare = getattr(pipe, "prepare_latents", None)
        if callable(prepare) and "prepare_latents" not in pipe.__dict__:

            def prepare_latents(*a: Any, **kw: Any) -> Any:
                out = prepare(*a, **kw)
                lat = out[0] if isinstance(out, tuple) else out
                state["latent"] = int(lat.shape[0]) if isinstance(lat, torch.Tensor) else None
                tracker.new_run()
                return out

            pipe.__dict__["prepare_latents"] = prepare_latents
            tracker._undo.append(lambda: pipe.__dict__.pop("prepare_latents", None))
    den.__dict__["_vqsuite_step_tracker"] = tracker
    return tracker


def step_tracker_of(module: nn.Module) -> StepTracker | None:
    """The tracker attached to ``module`` (a denoiser), if any."""
    return module.__dict__.get("_vqsuite_step_tracker")


# ------------------------------------------------------------------------------ step sampling
StepSampler = Callable[[int], frozenset[int]]


def all_steps() -> StepSampler:
    """Every step of the trajectory feeds calibration."""
    return lambda n: frozenset(range(n))


def uniform_steps(cali_st: int) -> StepSampler:
    """Q-Diffusion: ``cali_st`` steps at even spacing, ``range(0, n, n // cali_st)`` (all steps if fewer)."""
    if cali_st <= 0:
        raise ConfigError(f"cali_st={cali_st} must be positive")
    return lambda n: frozenset(range(0, n, max(n // cali_st, 1)))


def normal_steps(n_samples: int, mu: float = PTQ4DM_MU, sigma: float = PTQ4DM_SIGMA, seed: int = 0) -> StepSampler:
    """PTQ4DM (NDTC): draw ``n_samples`` steps ``int(N(mu, sigma^2) * n)`` clamped to ``[0, n-1]``, indices counted
    from the noisiest step (the loop's first); the set of distinct steps drawn feeds calibration."""
    if n_samples <= 0 or sigma < 0:
        raise ConfigError(f"n_samples={n_samples} must be positive and sigma={sigma} non-negative")

    def sample(n: int) -> frozenset[int]:
        g = torch.Generator().manual_seed(seed)
        draws = (torch.randn(n_samples, generator=g, dtype=torch.float64) * sigma + mu) * n
        return frozenset(int(v) for v in draws.floor().clamp(0, n - 1).tolist())

    return sample


# ------------------------------------------------------------------------------ per-step statistics
class StepStats:
    """Per-layer input statistics split by step slot and CFG branch, bounded memory.

    ``pooled``: one :class:`RangeObserver` over everything; ``slots[s]``: one per step slot (``per_step``: the step
    index, or the timestep value when the index is unknown; ``bucketed``: the bucket); ``branch_absmax[(s, b)]``:
    max |x| per slot and CFG branch (scalars).
    """

    def __init__(self, granularity: str, n_buckets: int | None, keep_sample: bool, reservoir: int, seed: int) -> None:
        self.granularity = granularity
        self.n_buckets = n_buckets
        self.keep_sample = keep_sample
        self.reservoir = reservoir
        self.seed = seed
        self.pooled = RangeObserver(reservoir, keep_sample, seed)
        self.slots: dict[Any, RangeObserver] = {}
        self.branch_absmax: dict[tuple[Any, str], float] = {}
        self.max_steps = 0

    def slot_key(self, step: StepInfo) -> Any:
        if self.granularity == "pooled":
            return None
        if self.granularity == "bucketed":
            return bucket_of(step.index, step.num_steps, self.n_buckets) if step.known else None
        if step.known:
            return ("i", step.index)
        return ("t", step.t) if math.isfinite(step.t) else None

    def update(self, x: torch.Tensor, step: StepInfo | None) -> None:
        self.pooled.update(x, None if step is None else step.t)
        if step is None:
            return
        key = self.slot_key(step)
        if key is None:
            return
        self.max_steps = max(self.max_steps, step.num_steps)
        obs = self.slots.get(key)
        if obs is None:
            obs = self.slots[key] = RangeObserver(self.reservoir, self.keep_sample, self.seed + len(self.slots) + 1)
        obs.update(x, step.t)
        bkey = (key, step.branch)
        self.branch_absmax[bkey] = max(self.branch_absmax.get(bkey, 0.0), float(x.detach().abs().amax()))

    def slot_table(self) -> list[RangeObserver | None]:
        """Observers in slot order: ``n_buckets`` buckets, or the steps of the longest run seen (or the distinct
        timesteps seen, largest first, when no index was published); ``None`` = slot never observed."""
        if self.granularity == "bucketed":
            return [self.slots.get(b) for b in range(self.n_buckets)]
        by_index = {k[1]: v for k, v in self.slots.items() if k[0] == "i"}
        if by_index:
            n = self.n_buckets or max(self.max_steps, max(by_index) + 1)
            return [by_index.get(i) for i in range(n)]
        by_t = sorted(((k[1], v) for k, v in self.slots.items() if k[0] == "t"), key=lambda kv: -kv[0])
        return [v for _, v in by_t]


def _split_rows(x: torch.Tensor, steps: tuple[StepInfo, ...]) -> list[tuple[torch.Tensor, StepInfo | None]]:
    """The parts of a layer input ``x`` that belong to each published branch (dim 0 is the batch, possibly
    times a constant such as attention heads); the whole of ``x`` for the first entry when it cannot split."""
    if not steps:
        return [(x, None)]
    if len(steps) == 1 or x.ndim == 0:
        return [(x, steps[0])]
    batch = steps[0].batch_size
    if batch <= 0 or x.shape[0] % batch:
        return [(x, StepInfo(steps[0].index, steps[0].t, steps[0].num_steps, "all", None, batch))]
    mult = x.shape[0] // batch
    return [(x[s.rows[0] * mult : s.rows[1] * mult], s) for s in steps]


@torch.no_grad()
def observe_step_stats(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calib_data: CalibData,
    *,
    sampler: StepSampler | None = None,
    reservoir: int = DEFAULT_VALUE_RESERVOIR,
) -> dict[str, StepStats]:
    """Run ``calib_data`` through ``model`` with the listed quantized layers observing (activation quantization
    off) and return each layer's :class:`StepStats` of its input (divided by its smoothing vector, if any).

    ``sampler`` limits which steps feed statistics (steps with an unknown index always do).
    """
    stats: dict[str, StepStats] = {}
    chosen: dict[int, frozenset[int]] = {}

    def wanted(step: StepInfo | None) -> bool:
        if sampler is None or step is None or not step.known:
            return True
        if step.num_steps not in chosen:
            chosen[step.num_steps] = sampler(step.num_steps)
        return step.index in chosen[step.num_steps]

    def hook(name: str):
        def fn(module: nn.Module, x: torch.Tensor) -> None:
            if x.numel() == 0:
                return  # nothing to observe (an empty batch would poison no statistic, but amax() refuses it)
            x = smoothed_input(module, x.detach())
            st = stats.get(name)
            if st is None:
                spec = module.spec
                st = stats[name] = StepStats(
                    spec.act_granularity,
                    spec.n_buckets,
                    keep_sample=spec.act_range in ("percentile", "mse"),
                    reservoir=reservoir,
                    seed=len(stats),
                )
            for part, step in _split_rows(x, current_steps()):
                if wanted(step):
                    st.update(part, step)

        return fn

    observe_layer_inputs(model, layers, calib_data, hook)
    check_reached(layers, stats)
    return stats


@torch.no_grad()
def calibrate_static_scales(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calib_data: CalibData,
    *,
    sampler: StepSampler | None = None,
    reservoir: int = DEFAULT_VALUE_RESERVOIR,
) -> dict[str, StepStats]:
    """Calibrate the static activation scales of ``layers`` (quantized layers with ``act_mode="static"``).

    Pooled specs get one scale (``act_scale``); ``per_step``/``bucketed`` specs also get a table of scales, one per
    step slot (``act_scale_steps``, with each slot's mean timestep in ``act_scale_t``), read at inference through
    the step hook. The range method is each spec's ``act_range``. Returns the statistics.
    """
    stats = observe_step_stats(model, layers, calib_data, sampler=sampler, reservoir=reservoir)
    for name, q in layers.items():
        st, spec = stats[name], q.spec
        pooled = static_scale(st.pooled, spec)
        if spec.act_granularity == "pooled":
            q.act_scale.copy_(pooled.to(q.act_scale.device))
            continue
        table = st.slot_table()
        if not any(o is not None for o in table):
            logger.warning(
                "%s: no step was published during calibration (attach_step_tracker on the denoiser); "
                "only the pooled scale is set",
                name,
            )
            table = [None] * (spec.n_buckets or 1)
        nan = torch.tensor(float("nan"))
        scales = torch.stack([nan if o is None else static_scale(o, spec) for o in table])
        keys_t = torch.tensor([math.nan if o is None else o.mean_t for o in table], dtype=torch.float32)
        q.set_act_scale_table(scales, keys_t, pooled)
    return stats


def attach_step_tracker_if_needed(target: Any) -> StepTracker | None:
    """Attach a step tracker to a loaded model or pipeline whose quantized layers keep per-step static scales
    (no-op otherwise, or when its denoiser already has one, unless ``target`` is a pipeline and the existing
    tracker is a bare one). Returns the tracker attached, if any."""
    from vqsuite.nn import QuantLayer

    is_module = isinstance(target, nn.Module)
    den = target if is_module else _pipeline_denoiser(target)
    if den is None or not any(isinstance(m, QuantLayer) and m.has_step_scales for m in den.modules()):
        return None
    old = step_tracker_of(den)
    if old is not None and (is_module or old._scheduler is not None):
        return None
    return attach_step_tracker(target, denoiser=den)
