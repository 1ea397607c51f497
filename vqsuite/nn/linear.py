"""Quantized linear layers: ``QLinear`` and ``QLinearLowRank`` (a 16-bit low-rank branch beside the
quantized residual, as in SVDQuant)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError
from vqsuite.kernels import current_preference, reference, select_impl
from vqsuite.kernels.dispatch import KernelImpl
from vqsuite.kernels.operands import QLinearOperands
from vqsuite.nn.base import PACKED_PREFIX, QuantLayer, copy_float_params

logger = logging.getLogger(__name__)


class QLinear(QuantLayer):
    """``y = Q_a(x) @ Q_w(W)^T + b`` with ``W: [out_features, in_features]``; the GEMM view is W itself."""

    _ctor_fields = ("in_features", "out_features", "has_bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = spec or QuantSpec()
        spec.validate_for(in_features)
        self.in_features, self.out_features, self.has_bias = int(in_features), int(out_features), bool(bias)
        super().__init__(
            spec,
            (out_features, in_features),
            (out_features, in_features),
            out_features if bias else None,
            device=device,
            dtype=dtype,
        )

    def _to_gemm(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def _from_gemm(self, w_nk: torch.Tensor) -> torch.Tensor:
        return w_nk

    @classmethod
    def from_float(cls, module: nn.Linear, spec: QuantSpec) -> QLinear:
        q = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            spec,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        return copy_float_params(q, module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own name (callers pass it)
        """input: ``[..., in_features]`` -> ``[..., out_features]`` (zero rows give zero rows).

        Frozen with packed weights: one ``qlinear`` kernel call on the layer's :meth:`qlinear_operands` (the
        dispatcher picks the implementation). Otherwise (fake-quant, or a 16-bit weight) the plain-torch math with
        the layer's own weight and activation fake-quant (STE gradients, fine-tuning adapters).
        """
        x = input
        if not (self.frozen and self.quantizes_weight):
            proj_down, proj_up = self.lowrank_branch()
            return reference.linear_with_weight(
                x,
                self.quantized_gemm_weight(x.dtype),
                self.bias,
                self.quantize_input,
                smooth=getattr(self, "smooth", None),
                proj_down=proj_down,
                proj_up=proj_up,
            )
        if x.numel() == 0:  # an empty batch: nothing to launch under any kernel preference, the reference's is exact
            return reference.qlinear(x, self.qlinear_operands())
        if torch.compiler.is_compiling():
            return self._run_uncached(x)
        key = self._call_key(x)
        cached = self.__dict__.get("_kernel_call")
        if cached is None or cached[0] != key:
            impl, ops = self._select_and_pack(x)
            cached = self.__dict__["_kernel_call"] = (key, impl, ops)
        _, impl, ops = cached
        if self.spec.act_mode == "static":  # a per-step scale is resolved on every call
            ops = ops.replace(act_scale=reference.static_act_scale(self))
        return impl.fn(x, ops)

    def _run_uncached(self, x: torch.Tensor) -> torch.Tensor:
        impl, ops = self._select_and_pack(x)
        return impl.fn(x, ops)

    def _select_and_pack(self, x: torch.Tensor) -> tuple[KernelImpl, QLinearOperands]:
        ops = self.qlinear_operands()
        impl = select_impl("qlinear", self.spec.kernel, self.kernel_key, x=x, ops=ops)
        if impl.pack is not None:
            ops = self._with_packed(impl, ops)
        return impl, ops

    def _call_key(self, x: torch.Tensor) -> tuple:
        """What a cached (kernel, operands) choice depends on: the preference in force, the input's device, dtype,
        width, grad need and M bucket (``M.bit_length()``: the CPU family's M thresholds are powers of two), the
        spec and observing state, and every stored tensor's identity and version (a load, ``copy_`` or device move
        changes the key; the packed copies derived from them do not count)."""
        m = x.numel() // max(int(x.shape[-1]), 1) if x.ndim else 0
        # packed layouts are derived from the stored codes (and tracked by ``_packed_tag``): not part of the key
        state = tuple(
            (id(t), t._version) for n, t in self._buffers.items() if t is not None and not n.startswith(PACKED_PREFIX)
        )
        params = tuple((id(t), t._version) for t in self._parameters.values() if t is not None)
        branch = self.__dict__.get("_branch_override")
        return (
            current_preference(self.spec.kernel),
            x.device,
            x.dtype,
            x.shape[-1] if x.ndim else None,
            x.requires_grad and torch.is_grad_enabled(),
            m.bit_length(),
            id(self.spec),
            self.act_observing,
            self.layer_name,
            state,
            params,
            None if branch is None else tuple((id(t), t._version) for t in branch),
        )

    def lowrank_branch(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(proj_down [K, r'], proj_up [N, r'])`` the layer runs: its own low-rank branch, or the longer one set by
        :meth:`set_branch_override` (LoRA adapters concatenated onto it, :mod:`vqsuite.pipelines.lora`)."""
        branch = self.__dict__.get("_branch_override")
        if branch is not None:
            return branch
        return self._parameters.get("proj_down"), self._parameters.get("proj_up")

    def set_branch_override(self, branch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Run ``branch = (proj_down [K, r'], proj_up [N, r'])`` (seeing the smoothed input ``x/λ``) in place of the
        stored ``proj_down``/``proj_up`` until called with ``None``. Nothing stored changes (state dict, checkpoint);
        the kernel-call cache keys on the override's tensors."""
        if branch is not None:
            down, up = branch
            if down.ndim != 2 or up.shape != (self.out_features, down.shape[1]) or down.shape[0] != self.in_features:
                raise ValueError(
                    f"{self.layer_name or type(self).__name__}: branch override proj_down {tuple(down.shape)} / "
                    f"proj_up {tuple(up.shape)} does not fit [K={self.in_features}, r] / [N={self.out_features}, r]"
                )
        self.__dict__["_branch_override"] = branch

    def qlinear_operands(self) -> QLinearOperands:
        """The frozen layer's tensors and format facts for a ``qlinear`` kernel (built per call: cheap)."""
        if not (self.frozen and self.quantizes_weight):
            raise RuntimeError("qlinear_operands needs a frozen layer with a quantized weight")
        b = self._buffers
        spec = self.spec
        observing = self.act_observing
        proj_down, proj_up = self.lowrank_branch()
        return QLinearOperands(
            qweight=b["qweight"],
            wscales=b["wscales"],
            gemm_shape=self.gemm_shape,
            weight=spec.weight,
            weight_group_size=spec.weight_group_size,
            wzeros=b.get("wzeros"),
            wtscale=b.get("wtscale"),
            bias=self.bias,
            smooth=b.get("smooth"),
            proj_down=proj_down,
            proj_up=proj_up,
            act=None if observing else spec.act,
            act_mode="none" if observing else spec.act_mode,
            act_group_size=spec.act_group_size,
            act_scale=reference.static_act_scale(self) if spec.act_mode == "static" else None,
            name=self.layer_name or type(self).__name__,
        )

    def _with_packed(self, impl: KernelImpl, ops: QLinearOperands) -> QLinearOperands:
        """``ops`` with ``impl``'s packed weight layout, packed once and kept as non-persistent buffers (repacked
        only when the stored codes change: a load, a device move)."""
        names = self.__dict__.get("_packed_names", ())
        if names and torch.compiler.is_compiling():
            # torch.compile cannot compare data pointers: a compiled forward reuses the layout an eager call packed
            return ops.replace(packed={n[len(PACKED_PREFIX) :]: self._buffers[n] for n in names})
        stored = (ops.qweight, ops.wscales, ops.wzeros, ops.wtscale)
        tag = (impl.name, *((t.data_ptr(), t._version) for t in stored if t is not None))
        if self.__dict__.get("_packed_tag") != tag:
            self.drop_packed()
            names = []
            for key, t in impl.pack(ops).items():
                self.register_buffer(PACKED_PREFIX + key, t, persistent=False)
                names.append(PACKED_PREFIX + key)
            self.__dict__["_packed_names"] = tuple(names)
            self.__dict__["_packed_tag"] = tag
        return ops.replace(packed={n[len(PACKED_PREFIX) :]: self._buffers[n] for n in names})


class QLinearLowRank(QLinear):
    """``y = Q_a(x/λ) @ Q_w(R)^T + (x/λ) @ proj_down @ proj_up^T + b``.

    ``R`` (the stored ``weight``) is the residual of the smoothed weight ``W·diag(λ)`` after the rank-``r`` branch;
    ``proj_down: [in_features, r]`` and ``proj_up: [out_features, r]`` stay 16-bit and see the unquantized
    smoothed input; ``smooth: [in_features]`` is λ (ones unless a smoothing calibrator set it).
    With rank 0 this is a ``QLinear`` with smoothing.
    """

    _ctor_fields = ("in_features", "out_features", "has_bias", "rank")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        rank: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = spec or QuantSpec()
        super().__init__(in_features, out_features, bias, spec, device=device, dtype=dtype)
        self.rank = int(spec.rank if rank is None else rank)
        if self.rank < 0 or self.rank > min(in_features, out_features):
            raise ConfigError(
                f"rank={self.rank} must lie in [0, min(in_features, out_features)={min(in_features, out_features)}]"
            )
        self.register_buffer("smooth", torch.ones(in_features, device=device, dtype=dtype))
        if self.rank > 0:
            self.proj_down = nn.Parameter(torch.zeros(in_features, self.rank, device=device, dtype=dtype))
            self.proj_up = nn.Parameter(torch.zeros(out_features, self.rank, device=device, dtype=dtype))
        else:
            self.register_parameter("proj_down", None)
            self.register_parameter("proj_up", None)

    @classmethod
    def from_float(
        cls, module: nn.Linear, spec: QuantSpec, rank: int | None = None, smooth: torch.Tensor | None = None
    ) -> QLinearLowRank:
        """Split ``W·diag(λ)`` into a rank-r SVD branch (float64 SVD) and the residual to quantize."""
        w = module.weight
        q = cls(
            module.in_features, module.out_features, module.bias is not None, spec, rank, device=w.device, dtype=w.dtype
        )
        copy_float_params(q, module)
        q.set_smoothing_and_lowrank(smooth)
        return q

    @torch.no_grad()
    def set_smoothing_and_lowrank(self, smooth: torch.Tensor | None = None) -> None:
        """Re-split the layer's float weight ``W = (R + proj_up @ proj_down^T) · diag(λ)^-1`` for a new λ.

        smooth: ``[in_features]`` positive, or ``None`` for ones. Fake-quant state only.
        """
        if self.frozen:
            raise RuntimeError("set_smoothing_and_lowrank needs the float weight; the layer is frozen")
        w_full = self.float_weight().double()
        lam = torch.ones_like(self.smooth, dtype=torch.float64) if smooth is None else smooth.double()
        if lam.shape != self.smooth.shape or not bool((lam > 0).all()) or not bool(torch.isfinite(lam).all()):
            raise ValueError(f"smooth must be finite, positive and of shape {tuple(self.smooth.shape)}")
        w_s = w_full * lam
        if self.rank > 0:
            up, down = lowrank_factors(w_s, self.rank)
            self.proj_up.copy_(up)
            self.proj_down.copy_(down)
            w_s = w_s - self.proj_up.double() @ self.proj_down.double().t()
        self.smooth.copy_(lam)
        self.__dict__["_parameters"]["weight"].copy_(w_s)

    def float_weight(self) -> torch.Tensor:
        """The float weight this layer represents, ``(R + proj_up @ proj_down^T) / λ``: ``[N, K]``."""
        w = self.__dict__["_parameters"]["weight"].double()
        if self.rank > 0:
            w = w + self.proj_up.double() @ self.proj_down.double().t()
        return (w / self.smooth.double()).to(self.weight_dtype)


def lowrank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``w: [N, K]`` by float64 SVD: ``(up [N, r] = U_r S_r, down [K, r] = V_r)``."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].t()
