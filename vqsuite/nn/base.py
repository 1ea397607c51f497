"""The two-state life of a quantized layer, shared by linear and conv layers.

*Fake-quant* (after ``from_float``): the float master ``weight`` is a Parameter; the forward quantizes it
(and the input activations) on the fly with a straight-through gradient. Calibration and fine-tuning run here.

*Frozen* (after ``freeze()``): ``weight`` is deleted; the layer holds packed codes and scales as buffers
(``qweight``, ``wscales`` [, ``wzeros``, ``wtscale``]) and memory really drops. ``layer.weight`` still answers,
with the dequantized weight computed on the fly, for code that reads ``.weight.dtype``/``.device``.

*Externally chosen codes* (GPTQ): ``freeze(qtensor)`` stores a given :class:`~vqsuite.formats.QTensor` as is, and
``set_pending_qtensor(qtensor)`` adopts one while staying in the fake-quant state: the master weight becomes
``dequantize(qtensor)``, the fake-quant forward uses exactly that (re-quantizing it by round-to-nearest need not
give the same codes: an INT4 group may use code -8, a 16-bit scale rounds), and a later ``freeze()`` stores the
QTensor, so fake-quant and frozen outputs stay bit-identical. If the master weight is changed afterwards (an
optimizer step), the layer notices, logs a warning and goes back to round-to-nearest. The pending QTensor follows
device moves and deep copies but is not part of ``state_dict``: save GPTQ results frozen.

Every layer sees its weight as a GEMM matrix ``[N, K]`` (groups run along K); subclasses say how their
weight tensor maps to that view (``_to_gemm``/``_from_gemm``).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import UserError
from vqsuite.formats import QTensor, dequantize, get_format, pack_4bit, quantize
from vqsuite.kernels import select
from vqsuite.nn import steps as _steps
from vqsuite.nn.quantizers import fake_quantize_weight, quantize_activation, ste

logger = logging.getLogger(__name__)

#: buffers holding packed codes and scales; dtype conversions of the module leave them alone
PROTECTED_BUFFERS: tuple[str, ...] = (
    "qweight",
    "wscales",
    "wzeros",
    "wtscale",
    "act_scale",
    "act_scale_steps",
    "act_scale_t",
)
#: name prefix of the non-persistent buffers holding a fast kernel's own weight layout (not in ``state_dict``)
PACKED_PREFIX = "packed_"
#: submodule name of an optional fine-tuning adapter (:mod:`vqsuite.finetune.qalora`); when registered (fake-quant
#: state only) it supplies the GEMM weight (``adapter.gemm_weight(layer, dtype)``) and may supply the input
#: activations' fake-quant (``adapter.quantize_input(layer, x)``, ``None`` = the layer's own); absent, nothing
#: changes
ADAPTER_NAME = "qalora"
#: elements of the master weight remembered to notice that it changed after ``set_pending_qtensor``
PENDING_PROBE_ELEMENTS = 256


def _probe(w: torch.Tensor) -> torch.Tensor:
    """A fixed, evenly spread sample of ``w``'s elements (a fingerprint that survives copies and moves)."""
    flat = w.detach().reshape(-1)
    steps = min(PENDING_PROBE_ELEMENTS, flat.numel())
    # integer arithmetic: a float linspace cannot address every element of a >16M-element weight
    idx = torch.arange(steps, device=flat.device) * (flat.numel() - 1) // max(steps - 1, 1)
    return flat[idx].clone()


def _qtensor_to(qt: QTensor, device: torch.device) -> QTensor:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return QTensor(
        codes=mv(qt.codes),
        scales=mv(qt.scales),
        fmt=qt.fmt,
        group_size=qt.group_size,
        axis=qt.axis,
        per_tensor=qt.per_tensor,
        zero_points=mv(qt.zero_points),
        tensor_scale=mv(qt.tensor_scale),
    )


class QuantLayer(nn.Module):
    """Base class of ``QLinear``, ``QLinearLowRank`` and the quantized convs (``QConvNd``, ``QConvTransposeNd``)."""

    #: constructor arguments recorded in checkpoints (subclasses extend)
    _ctor_fields: tuple[str, ...] = ()

    def __init__(
        self,
        spec: QuantSpec,
        weight_shape: tuple[int, ...],
        gemm_shape: tuple[int, int],
        bias_features: int | None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.frozen = False
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.gemm_shape = (int(gemm_shape[0]), int(gemm_shape[1]))
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.layer_name = ""  # set by quantize_model, used in messages
        self.act_observing = False
        self._pending_qtensor: QTensor | None = None  # codes chosen by a calibrator (GPTQ), see set_pending_qtensor
        self._pending_probe: torch.Tensor | None = None
        self.weight = nn.Parameter(torch.empty(self.weight_shape, device=device, dtype=dtype))
        if bias_features is not None:
            self.bias = nn.Parameter(torch.empty(bias_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if spec.act_mode == "static":
            self.register_buffer("act_scale", torch.full((), math.nan, device=device))
            if spec.act_granularity != "pooled" and spec.n_buckets is not None:
                self.register_buffer("act_scale_steps", torch.full((spec.n_buckets,), math.nan, device=device))
                self.register_buffer("act_scale_t", torch.full((spec.n_buckets,), math.nan, device=device))

    # ----------------------------------------------------------------- per-step static scales
    def __getattr__(self, name: str):
        # ``act_scale`` is what every kernel reads (``kernels.reference.static_act_scale``): with a per-step
        # table and a published step it resolves to that step's slot, so no kernel needs to know about steps
        if name == "act_scale":
            buffers = self.__dict__.get("_buffers", {})
            if buffers.get("act_scale_steps") is not None and _steps.current_steps():
                return self.current_act_scale()
        return super().__getattr__(name)

    @property
    def has_step_scales(self) -> bool:
        """Static activation scales per step or bucket (``act_scale_steps``) are present."""
        return self.__dict__["_buffers"].get("act_scale_steps") is not None

    def _slot_lists(self) -> tuple[list[bool], list[float]]:
        """(calibrated?, mean timestep) per slot as Python lists, recomputed only when the buffers change."""
        table, keys = self._buffers["act_scale_steps"], self._buffers["act_scale_t"]
        tag = (id(table), table._version, id(keys), keys._version)
        cache = self.__dict__.get("_slot_cache")
        if cache is None or cache[0] != tag:
            valid = [bool(v) for v in torch.isfinite(table).tolist()] if table.device.type != "meta" else []
            keys_t = [float(v) for v in keys.tolist()] if keys.device.type != "meta" else []
            cache = self.__dict__["_slot_cache"] = (tag, valid, keys_t)
        return cache[1], cache[2]

    def current_act_scale(self) -> torch.Tensor | None:
        """The static scale (0-d) for the step in progress: its slot of ``act_scale_steps`` when the denoiser's
        step hook published one, the pooled ``act_scale`` otherwise (or ``None`` for non-static layers)."""
        buffers = self.__dict__["_buffers"]
        pooled = buffers.get("act_scale")
        table = buffers.get("act_scale_steps")
        step = _steps.current_step()
        if table is None or step is None:
            if table is not None and not self.__dict__.get("_warned_no_step"):
                self._warned_no_step = True
                logger.warning(
                    "%s: per-step activation scales but no step published (attach a step tracker to the "
                    "denoiser: vqsuite.calibrators.timestep.attach_step_tracker); using the pooled scale",
                    self.layer_name or type(self).__name__,
                )
            return pooled
        valid, keys_t = self._slot_lists()
        slot = _steps.slot_for(step, self.spec.act_granularity, valid, keys_t)
        return pooled if slot is None else table[slot]

    @torch.no_grad()
    def set_act_scale_table(self, scales: torch.Tensor, keys_t: torch.Tensor, pooled: torch.Tensor) -> None:
        """Store calibrated static scales: ``scales [S]`` per slot (NaN = never calibrated), ``keys_t [S]`` the mean
        timestep of each slot, ``pooled`` (0-d) the scale used when no step is published.

        A ``per_step`` spec without ``n_buckets`` learns ``S`` here (the layer's spec gets ``n_buckets=S``, so a
        checkpoint rebuilds buffers of the right shape).
        """
        if self.spec.act_mode != "static" or self.spec.act_granularity == "pooled":
            raise ValueError(f"{self.layer_name or type(self).__name__}: spec {self.spec.short()} has no step scales")
        scales = scales.detach().float().reshape(-1)
        keys_t = keys_t.detach().float().reshape(-1)
        if keys_t.shape != scales.shape:
            raise ValueError(f"keys_t {tuple(keys_t.shape)} must match scales {tuple(scales.shape)}")
        if self.spec.n_buckets is None:
            self.spec = self.spec.replace(n_buckets=int(scales.numel()))
            self.__dict__.pop("_kernel_key", None)
        if scales.numel() != self.spec.n_buckets:
            raise ValueError(f"{scales.numel()} scales given, spec.n_buckets={self.spec.n_buckets}")
        dev = self._buffers["act_scale"].device
        self._buffers["act_scale"] = pooled.detach().float().reshape(()).to(dev).clone()
        self._buffers["act_scale_steps"] = scales.to(dev).clone()
        self._buffers["act_scale_t"] = keys_t.to(dev).clone()

    # ----------------------------------------------------------------- weight property
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        params = self.__dict__["_parameters"]
        if "weight" in params:
            return params["weight"]
        if self.__dict__.get("frozen"):
            return self._from_gemm(self.quantized_gemm_weight(self.weight_dtype))
        raise AttributeError("weight")

    @property
    def kernel_key(self) -> tuple:
        """What identifies this layer's kernel choice in the dispatcher's log (computed once)."""
        key = self.__dict__.get("_kernel_key")
        if key is None:
            key = self.__dict__["_kernel_key"] = (type(self).__name__, self.spec.short(), *self.gemm_shape)
        return key

    # ----------------------------------------------------------------- layout hooks
    def _to_gemm(self, w: torch.Tensor) -> torch.Tensor:
        """Layer weight (``self.weight_shape``) -> GEMM view ``[N, K]``."""
        raise NotImplementedError

    def _from_gemm(self, w_nk: torch.Tensor) -> torch.Tensor:
        """GEMM view ``[N, K]`` -> layer weight shape."""
        raise NotImplementedError

    # ----------------------------------------------------------------- quantized weight
    @property
    def quantizes_weight(self) -> bool:
        return self.spec.weight is not None

    def quantized_gemm_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the forward uses, as ``[N, K]`` in ``dtype``: dequantized storage when frozen,
        fake-quantized master weight (with STE gradient) otherwise, the float weight if weights stay 16-bit."""
        if self.frozen and self.quantizes_weight:
            _, fn = select("dequantize_weight", self.spec.kernel, self.kernel_key)
            return fn(
                self.qweight,
                self.wscales,
                self.spec,
                wzeros=getattr(self, "wzeros", None),
                wtscale=getattr(self, "wtscale", None),
                dtype=dtype or self.weight_dtype,
            )
        adapter = self.adapter
        if adapter is not None and self.quantizes_weight:
            return adapter.gemm_weight(self, dtype)
        w = self._to_gemm(self.__dict__["_parameters"]["weight"])
        if dtype is not None:
            w = w.to(dtype)
        if not self.quantizes_weight:
            return w
        pending = self.pending_qtensor()
        if pending is not None:  # the very values freeze() will store (same dequantize as the frozen path)
            return ste(w, dequantize(pending, w.dtype).to(w.device))
        return fake_quantize_weight(w, self.spec, name=f"{self.layer_name or type(self).__name__}.weight")

    @property
    def adapter(self) -> nn.Module | None:
        """The fine-tuning adapter registered as submodule ``ADAPTER_NAME``, or ``None``."""
        return self.__dict__["_modules"].get(ADAPTER_NAME)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Quantized weight in the layer's own shape."""
        return self._from_gemm(self.quantized_gemm_weight(dtype))

    def quantize_input(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """Activation fake-quant along ``channel_dim`` (moved last and back); identity while observing and for an
        empty batch (no tokens: nothing to quantize, the forward returns the empty output)."""
        if self.act_observing or self.spec.act is None or x.numel() == 0:
            return x
        adapter = self.adapter
        if adapter is not None:  # a fine-tuning adapter may own the activation fake-quant (QALoRA's TALSQ)
            xq = adapter.quantize_input(self, x)
            if xq is not None:
                return xq
        name = f"{self.layer_name or type(self).__name__}.input"
        scale = self.current_act_scale()
        if channel_dim in (-1, x.ndim - 1):
            return quantize_activation(x, self.spec, scale, name)
        xq = quantize_activation(x.movedim(channel_dim, -1), self.spec, scale, name)
        return xq.movedim(-1, channel_dim)

    # ----------------------------------------------------------------- frozen storage
    def stored_qtensor(self) -> QTensor:
        """The QTensor a frozen layer stores (codes ``[N, K]`` unpacked): the inverse of :meth:`freeze`."""
        if not self.frozen or not self.quantizes_weight:
            raise RuntimeError("stored_qtensor needs a frozen layer with a quantized weight")
        from vqsuite.kernels.reference import stored_qtensor

        b = self._buffers
        return stored_qtensor(b["qweight"], b["wscales"], self.spec, wzeros=b.get("wzeros"), wtscale=b.get("wtscale"))

    def frozen_buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the buffers a frozen layer holds for its weight."""
        if not self.quantizes_weight:
            return {}
        n, k = self.gemm_shape
        fmt = get_format(self.spec.weight)
        if fmt.storage_bits == 4:  # int2/int3/int4/fp4 codes: two per byte
            qdtype, qshape = torch.uint8, (n, k // 2)
        elif fmt.kind == "int":
            qdtype, qshape = (torch.uint8 if fmt.asymmetric else torch.int8), (n, k)
        else:
            from vqsuite.formats.fp8 import FP8_DTYPES

            qdtype, qshape = FP8_DTYPES[fmt.name], (n, k)
        groups = k // (self.spec.weight_group_size or k)
        sdtype = {"float": self.spec.torch_scale_dtype, "e4m3": torch.float8_e4m3fn, "e8m0": torch.uint8}[
            fmt.scale_kind
        ]
        out = {"qweight": (qshape, qdtype), "wscales": ((n, groups), sdtype)}
        if fmt.asymmetric:
            out["wzeros"] = ((n, groups), torch.uint8)
        if fmt.tensor_scale:
            out["wtscale"] = ((), torch.float32)
        return out

    def _storage_from_qtensor(self, qt: QTensor, *, given: bool) -> dict[str, torch.Tensor]:
        """Frozen buffers (``qweight`` packed, ``wscales`` [, ``wzeros``, ``wtscale``]) holding ``qt``.

        ``given``: ``qt`` came from the caller (a bad one is a ``UserError`` naming the mismatch); otherwise it
        came from :func:`quantize` and a mismatch is an internal invariant (``AssertionError``).
        """
        name = self.layer_name or type(self).__name__
        if given:
            if not isinstance(qt, QTensor):
                raise UserError(f"{name}: qtensor must be a vqsuite.formats.QTensor, got {type(qt).__name__}")
            if qt.fmt != self.spec.weight:
                raise UserError(f"{name}: qtensor.fmt={qt.fmt!r} does not match spec.weight={self.spec.weight!r}")
            if qt.group_size != self.spec.weight_group_size:
                raise UserError(
                    f"{name}: qtensor.group_size={qt.group_size} does not match "
                    f"spec.weight_group_size={self.spec.weight_group_size}"
                )
            if qt.per_tensor or qt.axis not in (-1, 1):
                raise UserError(f"{name}: qtensor must be grouped along K (axis=-1, per_tensor=False)")
            if tuple(qt.codes.shape) != self.gemm_shape:
                raise UserError(
                    f"{name}: qtensor.codes has shape {tuple(qt.codes.shape)}, the GEMM weight is {self.gemm_shape}"
                )
        store = {
            "qweight": pack_4bit(qt.codes) if get_format(self.spec.weight).storage_bits == 4 else qt.codes,
            "wscales": qt.scales,
            "wzeros": qt.zero_points,
            "wtscale": qt.tensor_scale,
        }
        out = {}
        for bname, (shape, dtype) in self.frozen_buffer_specs().items():
            t = store[bname]
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = "None" if t is None else f"{tuple(t.shape)} {t.dtype}"
                msg = f"{name}: {bname}: got {got}, expected {shape} {dtype}"
                if given:
                    raise UserError(msg)
                raise AssertionError(msg)  # an internal invariant, not user input
            out[bname] = t.contiguous()
        return out

    def pending_qtensor(self) -> QTensor | None:
        """The QTensor adopted by :meth:`set_pending_qtensor`, or ``None`` (none, or the master weight changed
        since; that case logs a warning once and drops it)."""
        qt = self.__dict__.get("_pending_qtensor")
        if qt is None:
            return None
        param = self.__dict__["_parameters"].get("weight")
        probe = self.__dict__.get("_pending_probe")
        cur = None if param is None else _probe(param)
        if cur is None or probe is None or cur.dtype != probe.dtype or not torch.equal(cur, probe.to(cur.device)):
            logger.warning(
                "%s: the master weight changed after its codes were chosen (GPTQ); falling back to round-to-nearest",
                self.layer_name or type(self).__name__,
            )
            self.clear_pending_qtensor()
            return None
        return qt

    def clear_pending_qtensor(self) -> None:
        self._pending_qtensor = None
        self._pending_probe = None

    @torch.no_grad()
    def set_pending_qtensor(self, qtensor: QTensor) -> None:
        """Adopt externally chosen codes and scales (GPTQ) in the fake-quant state.

        The master weight becomes ``dequantize(qtensor)`` (in its own dtype), the fake-quant forward uses exactly
        ``dequantize(qtensor)`` and :meth:`freeze` stores ``qtensor`` as is (see the module docstring).
        qtensor: codes ``[N, K]`` (the GEMM view) in ``spec.weight`` with ``spec.weight_group_size``.
        """
        if self.frozen:
            raise RuntimeError("set_pending_qtensor needs the fake-quant state; the layer is frozen")
        if not self.quantizes_weight:
            raise UserError("spec.weight is None: this layer keeps a 16-bit weight, there are no codes to adopt")
        param = self.__dict__["_parameters"]["weight"]
        self._storage_from_qtensor(qtensor, given=True)  # validates
        param.copy_(self._from_gemm(dequantize(qtensor, torch.float32).to(param.device)).to(param.dtype))
        self._pending_qtensor = _qtensor_to(qtensor, param.device)
        self._pending_probe = _probe(param)

    @torch.no_grad()
    def freeze(self, qtensor: QTensor | None = None) -> QuantLayer:
        """Quantize the master weight into packed storage and drop it. Idempotent.

        qtensor: codes and scales to store instead of round-to-nearest ones (GPTQ's); codes ``[N, K]`` in the
        GEMM view, ``spec.weight`` format and group. Without it, a QTensor adopted by :meth:`set_pending_qtensor`
        is stored; otherwise the master weight is quantized.
        """
        if self.frozen:
            if qtensor is not None:
                raise RuntimeError("the layer is already frozen; cannot freeze it from a QTensor")
            return self
        if qtensor is not None and not self.quantizes_weight:
            raise UserError("spec.weight is None: this layer keeps a 16-bit weight, there are no codes to store")
        if self.quantizes_weight:
            w = self._to_gemm(self.__dict__["_parameters"]["weight"].detach())
            given = qtensor is not None
            qt = qtensor if given else self.pending_qtensor()
            if qt is None:
                qt = quantize(
                    w,
                    self.spec.weight,
                    group_size=self.spec.weight_group_size,
                    axis=-1,
                    scale_dtype=self.spec.torch_scale_dtype,
                    name=f"{self.layer_name or type(self).__name__}.weight",
                )
            store = self._storage_from_qtensor(qt, given=given)
            for name, t in store.items():
                self.register_buffer(name, t.to(w.device))
            self.weight_dtype = w.dtype
            del self._parameters["weight"]
        self.clear_pending_qtensor()
        self.frozen = True
        return self

    def freeze_empty(self, device: torch.device | str = "meta") -> QuantLayer:
        """Enter the frozen state with uninitialised storage (for loading a checkpoint into)."""
        if self.frozen:
            return self
        for name, (shape, dtype) in self.frozen_buffer_specs().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if self.quantizes_weight:
            del self._parameters["weight"]
        self.frozen = True
        return self

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's own signature
        """``model.to(dtype)``/``.half()`` must not recast packed codes and scales (FP8 codes would become
        16-bit, FP32 scales would lose bits): storage buffers follow device moves only. The layer's compute
        dtype (``weight_dtype``) follows the conversion."""
        self.drop_packed()  # a kernel's packed layout is rebuilt from the stored codes where they land
        protected = {n: self._buffers.pop(n) for n in PROTECTED_BUFFERS if self._buffers.get(n) is not None}
        pending = self.pending_qtensor()  # checked before the conversion changes the master weight
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in protected.items():
                probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
                self._buffers[name] = buf if probe.device == buf.device else buf.to(device=probe.device)
            param = self.__dict__["_parameters"].get("weight")
            if pending is not None and param is not None:  # the codes follow the weight; the fingerprint is renewed
                self._pending_qtensor = _qtensor_to(pending, param.device)
                self._pending_probe = _probe(param)
        probe = fn(torch.empty(0, dtype=self.weight_dtype))
        if probe.is_floating_point():
            self.weight_dtype = probe.dtype
        return self

    def drop_packed(self) -> None:
        """Forget a fast kernel's packed weight layout (it is rebuilt on the next call that needs it)."""
        for name in self.__dict__.pop("_packed_names", ()):
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        self.__dict__.pop("_packed_tag", None)
        self.__dict__.pop("_kernel_call", None)  # QLinear's cached (kernel, operands) choice holds the old tensors

    # ----------------------------------------------------------------- bookkeeping
    def ctor_kwargs(self) -> dict:
        """What a checkpoint records to rebuild this layer (JSON-serialisable)."""
        out = {f: getattr(self, f) for f in self._ctor_fields}
        if "has_bias" in out:
            out["bias"] = out.pop("has_bias")
        return out

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else "fake-quant"
        return f"{self.gemm_shape[1]}->{self.gemm_shape[0]}, {self.spec.short()}, {state}"


def copy_float_params(qlayer: QuantLayer, module: nn.Module) -> QuantLayer:
    """Copy a float module's weight and bias into a freshly built quantized layer (same device/dtype)."""
    with torch.no_grad():
        qlayer.__dict__["_parameters"]["weight"].copy_(module.weight)
        if module.bias is not None:
            qlayer.bias.copy_(module.bias)
    qlayer.weight_dtype = module.weight.dtype
    qlayer.train(module.training)
    return qlayer
