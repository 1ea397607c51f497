"""The two-state life of a quantized layer, shared by linear and conv layers.

*Fake-quant* (after ``from_float``): the float master ``weight`` is a Parameter; the forward quantizes it
(and the input activations) on the fly with a straight-through gradient. Calibration and fine-tuning run here.

*Frozen* (after ``freeze()``): ``weight`` is deleted; the layer holds packed codes and scales as buffers
(``qweight``, ``wscales`` [, ``wzeros``, ``wtscale``]) and memory really drops. ``layer.weight`` still answers,
with the dequantized weight computed on the fly, for code that reads ``.weight.dtype``/``.device``.

Every layer sees its weight as a GEMM matrix ``[N, K]`` (groups run along K); subclasses say how their
weight tensor maps to that view (``_to_gemm``/``_from_gemm``).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.formats import get_format, pack_4bit, quantize
from vqsuite.kernels import select
from vqsuite.nn.quantizers import fake_quantize_weight, quantize_activation

logger = logging.getLogger(__name__)

#: buffers holding packed codes and scales; dtype conversions of the module leave them alone
PROTECTED_BUFFERS: tuple[str, ...] = ("qweight", "wscales", "wzeros", "wtscale", "act_scale")


class QuantLayer(nn.Module):
    """Base class of ``QLinear``, ``QLinearLowRank``, ``QConv2d`` and ``QConvTranspose2d``."""

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
        self.weight = nn.Parameter(torch.empty(self.weight_shape, device=device, dtype=dtype))
        if bias_features is not None:
            self.bias = nn.Parameter(torch.empty(bias_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if spec.act_mode == "static":
            self.register_buffer("act_scale", torch.full((), math.nan, device=device))

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
        w = self._to_gemm(self.__dict__["_parameters"]["weight"])
        if dtype is not None:
            w = w.to(dtype)
        if not self.quantizes_weight:
            return w
        return fake_quantize_weight(w, self.spec, name=f"{self.layer_name or type(self).__name__}.weight")

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Quantized weight in the layer's own shape."""
        return self._from_gemm(self.quantized_gemm_weight(dtype))

    def quantize_input(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """Activation fake-quant along ``channel_dim`` (moved last and back); identity while observing."""
        if self.act_observing or self.spec.act is None:
            return x
        name = f"{self.layer_name or type(self).__name__}.input"
        if channel_dim in (-1, x.ndim - 1):
            return quantize_activation(x, self.spec, getattr(self, "act_scale", None), name)
        xq = quantize_activation(x.movedim(channel_dim, -1), self.spec, getattr(self, "act_scale", None), name)
        return xq.movedim(-1, channel_dim)

    # ----------------------------------------------------------------- frozen storage
    def frozen_buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the buffers a frozen layer holds for its weight."""
        if not self.quantizes_weight:
            return {}
        n, k = self.gemm_shape
        fmt = get_format(self.spec.weight)
        if fmt.bits == 4:
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

    @torch.no_grad()
    def freeze(self) -> QuantLayer:
        """Quantize the master weight into packed storage and drop it. Idempotent."""
        if self.frozen:
            return self
        if self.quantizes_weight:
            w = self._to_gemm(self.__dict__["_parameters"]["weight"].detach())
            qt = quantize(
                w,
                self.spec.weight,
                group_size=self.spec.weight_group_size,
                axis=-1,
                scale_dtype=self.spec.torch_scale_dtype,
                name=f"{self.layer_name or type(self).__name__}.weight",
            )
            store = {
                "qweight": pack_4bit(qt.codes) if get_format(self.spec.weight).bits == 4 else qt.codes,
                "wscales": qt.scales,
                "wzeros": qt.zero_points,
                "wtscale": qt.tensor_scale,
            }
            expected = self.frozen_buffer_specs()
            for name, (shape, dtype) in expected.items():
                t = store[name]
                if tuple(t.shape) != shape or t.dtype != dtype:  # an internal invariant, not user input
                    raise AssertionError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
                self.register_buffer(name, t.contiguous())
            self.weight_dtype = w.dtype
            del self._parameters["weight"]
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
        protected = {n: self._buffers.pop(n) for n in PROTECTED_BUFFERS if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in protected.items():
                probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
                self._buffers[name] = buf if probe.device == buf.device else buf.to(device=probe.device)
        probe = fn(torch.empty(0, dtype=self.weight_dtype))
        if probe.is_floating_point():
            self.weight_dtype = probe.dtype
        return self

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
