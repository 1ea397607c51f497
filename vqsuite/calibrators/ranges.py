"""Range calibrators: choose a quantization range from observed values (activations) or from a weight.

Methods (``QuantSpec.act_range`` for static activation scales):

- ``"minmax"``: the absolute maximum seen.
- ``"ema"``: a running average of each batch's absolute maximum, momentum :data:`EMA_MOMENTUM` (Q-Diffusion's
  running-stat activation init: ``m = 0.95 m + 0.05 cur``).
- ``"percentile"``: the :data:`PERCENTILE` % quantile of ``|x|`` over a capped sample.
- ``"mse"``: shrink the range in 1 % steps (``amax * (1 - 0.01 i)``, ``i < 80``) and keep the one with the lowest
  L_p quantization error, ``p = 2.4`` (Q-Diffusion's init, METHODS.md §2), over a capped sample.

Symmetric formats: a range is an ``amax`` and the static scale is ``amax / qmax``. Memory per observer is
``O(reservoir)``, whatever is run through it.
"""

from __future__ import annotations

import torch

from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError, UserError
from vqsuite.formats import QTensor, fake_quantize, get_format, quantize
from vqsuite.nn.quantizers import fake_quantize_static, static_scale_from_amax

#: Q-Diffusion's L_p exponent for range search
LP_NORM = 2.4
#: range search: ``amax * (1 - SHRINK_STEP * i)`` for ``i < SHRINK_STEPS``
SHRINK_STEP = 0.01
SHRINK_STEPS = 80
#: running-stat momentum of the "ema" method
EMA_MOMENTUM = 0.95
#: quantile (in %) of |x| used by the "percentile" method
PERCENTILE = 99.99
#: values kept per observer for percentile and L_p search
DEFAULT_VALUE_RESERVOIR = 4096
RANGE_METHODS: tuple[str, ...] = ("minmax", "ema", "percentile", "mse")


class RangeObserver:
    """Running statistics of one tensor stream (a layer's input at one step slot), bounded memory.

    Attributes:
        absmax: max |x| over everything seen (0-d float32).
        ema: running average of per-update max |x| (0-d float32; the first update sets it).
        sample: ``[<= reservoir]`` float32, a uniform sample of the values seen (random-priority reservoir).
        count: values seen; updates: ``update`` calls with data; t_sum: sum of the timesteps given to ``update``.
    """

    def __init__(self, reservoir: int = DEFAULT_VALUE_RESERVOIR, keep_sample: bool = True, seed: int = 0) -> None:
        if reservoir <= 0:
            raise ValueError(f"reservoir={reservoir} must be positive")
        self.reservoir = int(reservoir)
        self.keep_sample = keep_sample
        self.absmax = torch.zeros(())
        self.ema: torch.Tensor | None = None
        self.sample = torch.zeros(0)
        self._keys = torch.zeros(0)
        self.count = 0
        self.updates = 0
        self.t_sum = 0.0
        self.t_count = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor, t: float | None = None) -> None:
        """Add the values of ``x`` (any shape, device, dtype); ``t``: the timestep they were seen at."""
        v = x.detach().reshape(-1)
        if v.numel() == 0:
            return
        cur = v.abs().amax().float().cpu()
        self.absmax = torch.maximum(self.absmax, cur)
        self.ema = cur if self.ema is None else EMA_MOMENTUM * self.ema + (1 - EMA_MOMENTUM) * cur
        self.count += v.numel()
        self.updates += 1
        if t is not None and t == t:  # not NaN
            self.t_sum += float(t)
            self.t_count += 1
        if not self.keep_sample:
            return
        # draw a fixed number of candidates first so a huge tensor never goes to the CPU whole
        if v.numel() > self.reservoir:
            idx = torch.randint(0, v.numel(), (self.reservoir,), generator=self._gen).to(v.device)
            v, weight = v[idx], v.numel() / self.reservoir
        else:
            weight = 1.0
        v = v.float().cpu()
        # priorities u^(1/w) make a candidate that stands for w values as likely to stay as w single values
        keys = torch.rand(v.numel(), generator=self._gen).pow(1.0 / weight)
        vals = torch.cat([self.sample, v])
        keys = torch.cat([self._keys, keys])
        if keys.numel() > self.reservoir:
            top = torch.topk(keys, self.reservoir).indices
            vals, keys = vals[top], keys[top]
        self.sample, self._keys = vals, keys

    @property
    def mean_t(self) -> float:
        return self.t_sum / self.t_count if self.t_count else float("nan")

    def amax(self, method: str, fmt_name: str, p: float = LP_NORM) -> torch.Tensor:
        """The calibrated range (0-d float32 amax) by ``method`` for format ``fmt_name``."""
        if self.updates == 0:
            return torch.tensor(float("nan"))
        if method == "minmax":
            return self.absmax.clone()
        if method == "ema":
            return self.ema.clone()
        if not self.keep_sample or self.sample.numel() == 0:
            raise ValueError(f"act_range={method!r} needs a value sample; the observer kept none")
        if method == "percentile":
            return percentile_amax(self.sample, PERCENTILE)
        if method == "mse":
            return search_lp_amax(self.sample, fmt_name, self.absmax, p=p)
        raise ConfigError(f"method={method!r} must be one of {', '.join(RANGE_METHODS)}")


def percentile_amax(values: torch.Tensor, q: float = PERCENTILE) -> torch.Tensor:
    """The ``q`` % quantile of ``|values|`` (0-d float32)."""
    if not 0 < q <= 100:
        raise UserError(f"q={q} must lie in (0, 100]")
    return torch.quantile(values.detach().abs().float().reshape(-1), q / 100.0)


def search_lp_amax(
    values: torch.Tensor, fmt_name: str, amax: torch.Tensor | None = None, p: float = LP_NORM
) -> torch.Tensor:
    """Per-tensor static range by L_p search: the ``amax * (1 - 0.01 i)`` (``i < 80``) whose fake-quantization of
    ``values`` has the lowest ``mean |x - Q(x)|^p``. ``amax`` defaults to ``max |values|``. 0-d float32."""
    v = values.detach().float().reshape(-1)
    top = v.abs().amax() if amax is None else amax.float().reshape(())
    if float(top) == 0.0:
        return top.clone()
    best, best_err = top.clone(), float("inf")
    for i in range(SHRINK_STEPS):
        cand = top * (1 - SHRINK_STEP * i)
        err = float((v - fake_quantize_static(v, fmt_name, static_scale_from_amax(cand, fmt_name))).abs().pow(p).mean())
        if err < best_err:
            best, best_err = cand, err
    return best.reshape(())


def static_scale(observer: RangeObserver, spec: QuantSpec) -> torch.Tensor:
    """Static activation scale (0-d float32) of ``spec.act`` from ``observer`` by ``spec.act_range``; NaN if empty."""
    return static_scale_from_amax(observer.amax(spec.act_range, spec.act), spec.act)


@torch.no_grad()
def search_weight_qtensor(
    w_nk: torch.Tensor, spec: QuantSpec, method: str = "mse", p: float = LP_NORM, name: str = "weight"
) -> QTensor:
    """Weight codes and scales with a searched clipping range per group (``spec.weight``, ``weight_group_size``).

    w_nk: ``[N, K]``. ``method="mse"`` tries ``r = 1 - 0.01 i`` (``i < 80``) per group and keeps the ``r`` with
    the lowest ``sum |w - Q_r(w)|^p`` in the group; ``"minmax"`` is plain round-to-nearest (``r = 1``). ``Q_r``
    quantizes ``clamp(w, ±r·amax_g)``, whose group maximum ``r·amax_g`` sets the scale: the codes equal clipping
    ``w`` itself. Returns a :class:`QTensor` for ``QuantLayer.set_pending_qtensor`` / ``freeze``.
    """
    if spec.weight is None:
        raise ConfigError("spec.weight is None: nothing to calibrate")
    fmt = get_format(spec.weight)
    if fmt.asymmetric:
        raise ConfigError(f"weight range search supports symmetric formats, not {spec.weight!r}")
    w = w_nk.detach().float()
    n, k = w.shape
    g = spec.weight_group_size or k
    kw = dict(scale_dtype=spec.torch_scale_dtype, name=name)
    if method == "minmax":
        return quantize(w, spec.weight, group_size=spec.weight_group_size, axis=-1, **kw)
    if method != "mse":
        raise ConfigError(f"weight range method={method!r} must be 'minmax' or 'mse'")
    wg = w.reshape(n, k // g, g)
    amax_g = wg.abs().amax(dim=-1, keepdim=True)
    best_r = torch.ones_like(amax_g)
    best_err = torch.full_like(amax_g, float("inf"))
    for i in range(SHRINK_STEPS):
        r = 1 - SHRINK_STEP * i
        lim = amax_g * r
        wc = torch.maximum(torch.minimum(wg, lim), -lim).reshape(n, k)
        wq = fake_quantize(wc, spec.weight, spec.weight_group_size, -1, **kw).reshape(n, k // g, g)
        err = (wg - wq).abs().pow(p).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    lim = amax_g * best_r
    wc = torch.maximum(torch.minimum(wg, lim), -lim).reshape(n, k)
    return quantize(wc, spec.weight, group_size=spec.weight_group_size, axis=-1, **kw)


@torch.no_grad()
def calibrate_weight_ranges(model: torch.nn.Module, method: str = "mse", p: float = LP_NORM) -> int:
    """Search each fake-quant layer's weight clipping (:func:`search_weight_qtensor`) and adopt the codes
    (``set_pending_qtensor``: the master weight becomes their dequantized values). Returns layers done."""
    from vqsuite.nn import QuantLayer

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLayer) and not m.frozen and m.quantizes_weight:
            w = m._to_gemm(m.__dict__["_parameters"]["weight"])
            m.set_pending_qtensor(search_weight_qtensor(w, m.spec, method, p, name=f"{m.layer_name}.weight"))
            n += 1
    return n
