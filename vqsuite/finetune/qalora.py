"""EfficientDM: quantization-aware low-rank fine-tuning (QALoRA) of a diffusion denoiser (METHODS.md §4).

Per quantized layer (a :class:`~vqsuite.nn.QuantLayer` that quantizes its weight) a :class:`QALoRAAdapter` is
registered as the submodule ``qalora`` (``vqsuite.nn.base.ADAPTER_NAME``); the layer then computes
``Y = Q(X; s_x^t) · Q(W0 + B·A; s_w)`` (paper Eq. 6):

- ``W0`` is the layer's master weight, frozen. For a frozen (packed) layer it is the dequantized stored weight,
  exactly EfficientDM's W0 (the layer is unfrozen first).
- LoRA: ``A [r, K]`` kaiming-uniform (a=√5), ``B [N, r]`` zeros, on the layer's GEMM view ``[N, K]``. For a
  conv (groups=1) ``A`` is the k×k conv in→r flattened (``[r, Cin·kh·kw]``, same fan-in, same init) and ``B`` the
  1×1 conv r→out, so ``B·A`` is exactly the merged conv delta. ``QConvTranspose2d`` (groups=1) gets the LoRA on its
  GEMM view ``[O·kh·kw, I]`` (a 1×1 conv I→r then a k×k transposed conv r→O). Grouped convs get none (logged).
  ``QLinearLowRank`` (SVDQuant): the LoRA trains the quantized residual; ``proj_up``/``proj_down`` stay frozen.
- Weights in an integer format: a learnable scale per group (per output channel when
  ``spec.weight_group_size`` is None), initialised from the layer's own codes (a pending QTensor: GPTQ, MSE
  range search, unfrozen storage) or round-to-nearest ones of ``W0``; LSQ with straight-through rounding; the
  scale is rounded to its storage dtype (``spec.torch_scale_dtype``) in the forward, so the frozen layer is the
  trained one bit for bit. Asymmetric formats keep their zero points fixed (those of the initial codes).
  Float formats (fp8, nvfp4, mxfp4): scales are not learned (LoRA only, the layer's round-to-nearest quantizer
  on ``W0 + BA``).
- Static activations (``act_mode="static"``): TALSQ (Eq. 9), one learnable step per slot of the layer's static
  scale table (:class:`~vqsuite.finetune.lsq.TimestepLSQActQuantizer`): ``per_step`` layers get one slot per
  training step (``num_inference_steps``), ``bucketed`` layers keep their buckets, ``pooled`` layers learn their
  one scale. Initialised from the calibrated table (what the layer used at that step). Symmetric: the static
  formats are symmetric here, so EfficientDM's asymmetric zero point is not used. At inference the slot is
  chosen by :func:`vqsuite.nn.steps.slot_for` (its own slot at the training step count, the nearest training
  timestep otherwise; the paper interpolates, the official code subsamples ``v[::5]``). Dynamic activations
  have nothing to learn.

Training (:func:`qalora`) is EfficientDM's data-free distillation (Eq. 7): latents ``x_T ~ N(0, I)``, the FP
teacher drives a fresh copy of the pipeline's scheduler; at every step the same ``x_t`` (and text embeddings, with
classifier-free guidance as at inference) goes to teacher and student, the loss is the MSE of the CFG-mixed
outputs, one optimizer update per step, then ``x_t`` advances with the teacher's output.

After training the LoRA is merged (``W = W0 + BA``), codes are taken with the learned scales, and the layer is
frozen with exactly that QTensor (``freeze=False`` adopts it with ``set_pending_qtensor``), the learned
activation steps become the layer's static scale table, and the adapters are removed: no inference overhead.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.errors import ConfigError, UserError
from vqsuite.finetune.checkpoint import CheckpointError, check_child, read_json
from vqsuite.finetune.lsq import TimestepLSQActQuantizer, grad_scale
from vqsuite.formats import QTensor, dequantize, get_format, quantize
from vqsuite.nn import QuantLayer
from vqsuite.nn import steps as _steps
from vqsuite.nn.base import ADAPTER_NAME
from vqsuite.nn.conv import QConvBase
from vqsuite.nn.quantizers import fake_quantize_weight
from vqsuite.nn.steps import StepInfo

logger = logging.getLogger(__name__)

#: LoRA rank of the paper and the official code
DEFAULT_RANK = 32
#: official code: each layer's LoRA learning rate is its mean weight scale / 2500 (for 16k updates)
LORA_LR_DIVISOR = 2500.0
#: default ``lr_scale``: the official 1/2500. On mini-sd a larger one (1/50, 1/10) lowers the held-out denoiser MSE
#: far more in 200-1000 updates (-61 % / -68 % vs -11 % at W4A4) but makes the images drift further from FP (PSNR
#: vs FP 21.1 -> 16.7 dB at 1/10), see BENCHMARKS.md "QALoRA on mini-sd"; the denoiser MSE is not the target
DEFAULT_LR_SCALE = 1.0 / LORA_LR_DIVISOR
#: AdamW weight decay of the LoRA factors (torch's default); scales and activation steps are not decayed
LORA_WEIGHT_DECAY = 0.01
#: files of one checkpoint (inside ``checkpoint_dir/step-XXXXXX``) and the pointer to the latest one
CKPT_TRAINABLE, CKPT_OPTIM, CKPT_STATE, CKPT_TENSORS, CKPT_LATEST = (
    "trainable.safetensors",
    "optimizer.pt",
    "state.json",
    "tensors.safetensors",
    "latest.json",
)
#: the only names ``latest.json`` may point to (a plain child of the checkpoint folder)
CKPT_DIR_PATTERN = r"step-\d{6}"
#: recorded in every ``state.json``: marks the ``step-XXXXXX`` folders qalora wrote (and may remove)
CKPT_FORMAT = "vqsuite-qalora-checkpoint"


# ------------------------------------------------------------------------------------------------ the adapter
def _scale_floor(dtype: torch.dtype) -> float:
    """Smallest positive scale stored in ``dtype`` (learned scales are clamped there: division stays finite)."""
    return 2.0**-24 if dtype == torch.float16 else float(torch.finfo(dtype).tiny)


class QALoRAAdapter(nn.Module):
    """LoRA + learnable weight scales + per-step activation steps of one quantized layer (see module docstring).

    Registered on the layer as ``layer.qalora``; the layer calls :meth:`gemm_weight` and :meth:`quantize_input`.
    The adapter does not hold the layer (no reference cycle in the module tree): the layer passes itself.

    Attributes:
        lora_A: ``[r, K]`` float32. lora_B: ``[N, r]`` float32 (zeros at start).
        w_scale: ``[N, K/G]`` float32 learnable scales (integer weight formats), else ``None``.
        w_zero: ``[N, K/G]`` float32 fixed zero points (asymmetric integer formats), else ``None``.
        act: the :class:`TimestepLSQActQuantizer` (static activations), else ``None``.
        mean_scale: the layer's mean initial weight scale (sets the LoRA learning rate).
    """

    def __init__(
        self,
        layer: QuantLayer,
        rank: int,
        *,
        generator: torch.Generator,
        act_slots: tuple[torch.Tensor, list[float], str] | None = None,
    ) -> None:
        super().__init__()
        n, k = layer.gemm_shape
        spec = layer.spec
        param = layer.__dict__["_parameters"]["weight"]
        dev = param.device
        self.rank = int(min(rank, n, k))
        a = torch.empty(self.rank, k)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(n, self.rank, device=dev))
        fmt = get_format(spec.weight)
        self.fmt = fmt.name
        self.learn_scales = fmt.kind == "int"
        self.group_size = spec.weight_group_size
        self.scale_dtype = spec.torch_scale_dtype
        w0 = layer._to_gemm(param.detach()).float()
        if self.learn_scales:
            qt = layer.pending_qtensor()
            if qt is None:
                qt = quantize(w0, fmt.name, group_size=self.group_size, axis=-1, scale_dtype=self.scale_dtype)
            self.qn, self.qp = float(fmt.qmin), float(fmt.qmax)
            self.w_scale = nn.Parameter(qt.scales.float().clone().to(dev))
            zeros = None if qt.zero_points is None else qt.zero_points.float().clone().to(dev)
            self.register_buffer("w_zero", zeros)
            self.mean_scale = float(self.w_scale.detach().mean())
        else:
            self.register_parameter("w_scale", None)
            self.register_buffer("w_zero", None)
            # the nominal round-to-nearest scale: per-group amax / largest magnitude of the format
            g = self.group_size or k
            self.mean_scale = float((w0.reshape(n, k // g, g).abs().amax(-1) / float(fmt.qmax)).mean())
        if act_slots is not None:
            init, keys_t, granularity = act_slots
            self.act = TimestepLSQActQuantizer(init.to(dev), spec.act)
            self.act_keys_t = [float(v) for v in keys_t]
            self.act_granularity = granularity
        else:
            self.act = None
        self._warned_no_step = False

    # -------------------------------------------------------------------------------- weight
    def merged_weight(self, layer: QuantLayer) -> torch.Tensor:
        """``W0 + B·A`` as the GEMM view ``[N, K]`` float32 (with gradients to the LoRA factors)."""
        w0 = layer._to_gemm(layer.__dict__["_parameters"]["weight"]).float()
        return w0 + self.lora_B @ self.lora_A

    def _stored_scales(self) -> torch.Tensor:
        """The learned scales as they will be stored: clamped positive, in ``scale_dtype``; ``[N, K/G]``."""
        return self.w_scale.detach().clamp(min=_scale_floor(self.scale_dtype)).to(self.scale_dtype)

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        g = self.group_size or k
        return w.reshape(n, k // g, g)

    def _codes(self, w32: torch.Tensor, s32: torch.Tensor) -> torch.Tensor:
        """Integer codes (float tensor) of ``w32 [N, K]`` with scales ``s32 [N, K/G]``; ``[N, K]``."""
        v = torch.round(self._grouped(w32) / s32.unsqueeze(-1))
        if self.w_zero is not None:
            v = v + self.w_zero.unsqueeze(-1)
        return v.clamp(self.qn, self.qp).reshape(w32.shape)

    def _quantized(self, w32: torch.Tensor) -> QTensor:
        """``w32 [N, K]`` (detached) quantized with the learned, stored-dtype scales: codes in the format's
        storage dtype, zero points uint8 — what :meth:`qtensor` hands to ``freeze`` and :meth:`gemm_weight`
        dequantizes."""
        stored = self._stored_scales()
        asym = self.w_zero is not None
        return QTensor(
            codes=self._codes(w32, stored.float()).to(torch.uint8 if asym else torch.int8),
            scales=stored,
            fmt=self.fmt,
            group_size=self.group_size,
            axis=-1,
            per_tensor=False,
            zero_points=self.w_zero.to(torch.uint8) if asym else None,
        )

    @torch.no_grad()
    def qtensor(self, layer: QuantLayer) -> QTensor:
        """The merged weight quantized with the learned scales (integer formats): what ``freeze`` stores."""
        return self._quantized(self.merged_weight(layer).detach())

    def gemm_weight(self, layer: QuantLayer, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quantized ``Q(W0 + BA; s_w)`` as ``[N, K]`` in ``dtype`` (gradients: LoRA and, for integer
        formats, LSQ to ``w_scale``). Its value is exactly the dequantized storage :meth:`qtensor` gives."""
        dtype = dtype or layer.weight_dtype
        w32 = self.merged_weight(layer)
        if not self.learn_scales:
            w = w32.to(layer.weight_dtype).to(dtype)
            return fake_quantize_weight(w, layer.spec, name=f"{layer.layer_name or type(layer).__name__}.weight")
        value = dequantize(self._quantized(w32.detach()), dtype)
        if not torch.is_grad_enabled():
            return value
        # LSQ: straight-through rounding, the step's gradient scaled by 1/sqrt(group * q_max)
        g = 1.0 / math.sqrt((self.group_size or w32.shape[1]) * self.qp)
        s = grad_scale(self.w_scale.clamp(min=_scale_floor(self.scale_dtype)), g).unsqueeze(-1)
        z = 0.0 if self.w_zero is None else self.w_zero.unsqueeze(-1)
        v = torch.clamp(self._grouped(w32) / s + z, self.qn, self.qp)
        y = ((v + (torch.round(v) - v).detach() - z) * s).reshape(w32.shape).to(dtype)
        return value + (y - y.detach())

    # -------------------------------------------------------------------------------- activations
    def slot(self) -> int | None:
        """The activation slot of the published step (``None`` when no step is published)."""
        step = _steps.current_step()
        if step is None or self.act is None:
            return None
        if self.act_granularity == "pooled":
            return 0
        return _steps.slot_for(step, self.act_granularity, [True] * self.act.num_slots, self.act_keys_t)

    def quantize_input(self, layer: QuantLayer, x: torch.Tensor) -> torch.Tensor | None:
        """TALSQ's fake-quant of ``x`` (any layout: the step is per tensor) when the layer's activations are static
        and a step is published; ``None`` otherwise, and the layer quantizes with its own quantizer."""
        slot = self.slot()
        if slot is not None:
            return self.act(x, slot)
        if self.act is not None and not self._warned_no_step:
            self._warned_no_step = True
            logger.warning("%s: no denoising step published; TALSQ uses the layer's scale", layer.layer_name)
        return None

    @torch.no_grad()
    def store_act_scales(self, layer: QuantLayer) -> None:
        """Write the learned steps into the layer's static scale table (the pooled scale stays the calibrated
        one: it serves forwards with no published step)."""
        if self.act is None:
            return
        learned = self.act.step.detach().float().clamp(min=torch.finfo(torch.float32).tiny)
        if self.act_granularity == "pooled":
            layer._buffers["act_scale"].copy_(learned[0])
            return
        if layer.spec.n_buckets is not None and layer.spec.n_buckets != learned.numel():
            # a per-step table calibrated at another step count: the table now has the training steps' slots
            layer.spec = layer.spec.replace(n_buckets=None)
            layer.__dict__.pop("_kernel_key", None)
        pooled = layer._buffers["act_scale"]
        layer.set_act_scale_table(learned, torch.tensor(self.act_keys_t), pooled)


# ------------------------------------------------------------------------------------------------ layers
def _weight_layers(den: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in den.named_modules() if isinstance(m, QuantLayer) and m.quantizes_weight]


@torch.no_grad()
def unfreeze_layer(layer: QuantLayer) -> QuantLayer:
    """Back to the fake-quant state with the master weight = the dequantized stored weight (EfficientDM's W0);
    the stored codes are adopted (``set_pending_qtensor``), so the layer's outputs do not change."""
    if not layer.frozen or not layer.quantizes_weight:
        return layer
    qt = layer.stored_qtensor()
    dev = layer._buffers["qweight"].device
    for name in layer.frozen_buffer_specs():
        layer._buffers.pop(name, None)
    # set_pending_qtensor writes dequantize(qt) into the master weight
    w = torch.empty(layer.weight_shape, dtype=layer.weight_dtype, device=dev)
    layer._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    layer.frozen = False
    layer.set_pending_qtensor(qt)
    return layer


def _act_slots(layer: QuantLayer, timesteps: list[float]) -> tuple[torch.Tensor, list[float], str] | None:
    """(initial steps [S], slot timesteps [S], granularity) of TALSQ for a static-activation layer, else None."""
    spec = layer.spec
    if spec.act is None or spec.act_mode != "static":
        return None
    n = len(timesteps)
    gran = spec.act_granularity
    pooled = layer._buffers["act_scale"].detach().float()
    if gran == "per_step":
        init = []
        for i, t in enumerate(timesteps):
            with _steps.publish(StepInfo(i, t, n)):
                init.append(layer.current_act_scale().detach().float().reshape(()))
        init_t, keys = torch.stack(init), list(timesteps)
    elif gran == "bucketed":
        table = layer._buffers["act_scale_steps"].detach().float()
        init_t = torch.where(torch.isfinite(table), table, pooled)
        keys = []
        for b in range(table.numel()):
            ts = [t for i, t in enumerate(timesteps) if _steps.bucket_of(i, n, table.numel()) == b]
            keys.append(sum(ts) / len(ts) if ts else float(layer._buffers["act_scale_t"][b]))
    else:
        init_t, keys = pooled.reshape(1), [math.nan]
    if not bool(torch.isfinite(init_t).all()):
        raise UserError(f"{layer.layer_name}: static activation scales are not calibrated; quantize with calib data")
    return init_t, keys, gran


def attach_adapters(
    den: nn.Module, rank: int, *, seed: int = 0, timesteps: list[float] | None = None
) -> dict[str, QALoRAAdapter]:
    """Register a :class:`QALoRAAdapter` on every weight-quantizing layer of ``den`` (fake-quant state; frozen
    layers are unfrozen). ``timesteps``: the training trajectory's timestep values (TALSQ slots). Returns
    ``{layer name: adapter}``; the rest of ``den`` gets ``requires_grad=False``."""
    den.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, QALoRAAdapter] = {}
    logged: set[str] = set()

    def once(key: str, msg: str, *args: Any) -> None:
        if key not in logged:
            logged.add(key)
            logger.info(msg, *args)

    for name, layer in _weight_layers(den):
        if isinstance(layer, QConvBase) and layer.groups != 1:
            logger.info("qalora: %s is a grouped conv (groups=%d): no LoRA, left as is", name, layer.groups)
            continue
        unfreeze_layer(layer)
        slots = _act_slots(layer, timesteps or [])
        adapter = QALoRAAdapter(layer, rank, generator=gen, act_slots=slots)
        if not adapter.learn_scales:
            once("float", "qalora: %s weights are a float format: LoRA only, scales not learned", layer.spec.weight)
        if slots is None and layer.spec.act is not None:
            once("dyn", "qalora: %s activations are dynamic: no TALSQ step sizes to learn", layer.spec.act_mode)
        layer.add_module(ADAPTER_NAME, adapter)
        out[name] = adapter
    return out


@torch.no_grad()
def merge_adapters(den: nn.Module, *, freeze: bool = True) -> int:
    """Merge every adapter of ``den`` into its layer and remove it (see module docstring); returns layers done.

    Integer formats: codes of ``W0 + BA`` with the learned scales, frozen (``freeze``) or adopted with
    ``set_pending_qtensor``; float formats: the master weight becomes ``W0 + BA`` (round-to-nearest as in
    training). Learned activation steps become the static scale table.
    """
    done = 0
    for _, layer in _weight_layers(den):
        adapter = layer._modules.get(ADAPTER_NAME)
        if adapter is None:
            continue
        param = layer._parameters["weight"]
        if adapter.learn_scales:
            qt = adapter.qtensor(layer)
            del layer._modules[ADAPTER_NAME]
            layer.clear_pending_qtensor()
            if freeze:
                layer.freeze(qt)
            else:
                layer.set_pending_qtensor(qt)
        else:
            merged = adapter.merged_weight(layer).to(param.dtype)
            del layer._modules[ADAPTER_NAME]
            layer.clear_pending_qtensor()
            param.copy_(layer._from_gemm(merged))
            if freeze:
                layer.freeze()
        adapter.store_act_scales(layer)
        done += 1
    # layers left out of training (grouped convs, 16-bit-weight layers) are frozen too when asked
    if freeze:
        for m in den.modules():
            if isinstance(m, QuantLayer) and not m.frozen:
                m.freeze()
    return done


# ------------------------------------------------------------------------------------------------ trajectories
class _Trajectories:
    """Data-free distillation trajectories: the FP teacher denoises seeded ``x_T`` with a fresh scheduler copy.

    Supports denoisers called like SD's ``UNet2DConditionModel`` (``encoder_hidden_states``) and PixArt
    transformers (attention mask, ``added_cond_kwargs``).
    """

    def __init__(
        self,
        pipe: Any,
        teacher: nn.Module,
        student: nn.Module,
        prompts: list[str],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        batch_size: int,
        seed: int,
    ) -> None:
        self.pipe, self.teacher, self.student = pipe, teacher, student
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.guidance = float(guidance_scale)
        self.cfg = self.guidance > 1.0
        self.num_inference_steps = num_inference_steps
        name = type(student).__name__
        if name.startswith("PixArt"):
            self.family = "pixart"
        elif name == "UNet2DConditionModel" and getattr(student.config, "addition_embed_type", None) is None:
            self.family = "unet"
        else:
            raise UserError(
                f"qalora supports SD-style UNet2DConditionModel and PixArt denoisers, not {name} "
                "(its conditioning inputs are not wired here yet)"
            )
        if not callable(getattr(pipe, "encode_prompt", None)):
            raise UserError(f"{type(pipe).__name__} has no encode_prompt: qalora needs a text-to-image pipeline")
        self.device = next(student.parameters()).device
        self.dtype = next(teacher.parameters()).dtype
        self.base_scheduler = copy.deepcopy(pipe.scheduler)
        self.scheduler = self._fresh_scheduler()
        self.timesteps = [float(t) for t in self.scheduler.timesteps]
        self.steps_per_traj = len(self.timesteps)
        self._step_gen = "generator" in inspect.signature(self.scheduler.step).parameters

    def _fresh_scheduler(self) -> Any:
        sched = copy.deepcopy(self.base_scheduler)
        sched.set_timesteps(self.num_inference_steps, device=self.device)
        return sched

    # -- one trajectory
    def start(self, j: int) -> None:
        """Set up trajectory ``j``: its prompts, conditioning, ``x_T`` and scheduler."""
        b = self.batch_size
        self.traj = j
        self.batch_prompts = [self.prompts[(j * b + r) % len(self.prompts)] for r in range(b)]
        self.cond = self._encode(self.batch_prompts)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        cfg = self.student.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        x = torch.randn((b, cfg.in_channels, *size), generator=gen)
        self.scheduler = self._fresh_scheduler()
        self.x = (x * self.scheduler.init_noise_sigma).to(self.device, self.dtype)
        self.step_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j + 500_000)
        self.i = 0

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        pipe, dev = self.pipe, self.device
        if self.family == "unet":
            pe, ne = pipe.encode_prompt(prompts, dev, 1, self.cfg, negative_prompt=None)
            return {"encoder_hidden_states": torch.cat([ne, pe]) if self.cfg else pe}
        kw = {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.encode_prompt).parameters else {}
        pe, pm, ne, nm = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=self.cfg, negative_prompt="", device=dev, **kw
        )
        rows = 2 * len(prompts) if self.cfg else len(prompts)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(self.student, "use_additional_conditions", False):
            side = self.student.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
            added = {
                "resolution": torch.tensor([[side, side]], device=dev, dtype=pe.dtype).repeat(rows, 1),
                "aspect_ratio": torch.tensor([[1.0]], device=dev, dtype=pe.dtype).repeat(rows, 1),
            }
        return {
            "encoder_hidden_states": torch.cat([ne, pe]) if self.cfg else pe,
            "encoder_attention_mask": torch.cat([nm, pm]) if self.cfg else pm,
            "added_cond_kwargs": added,
        }

    def step_infos(self) -> tuple[StepInfo, ...]:
        t, n, b = self.timesteps[self.i], self.steps_per_traj, self.batch_size
        if self.cfg:
            return (StepInfo(self.i, t, n, "uncond", (0, b), 2 * b), StepInfo(self.i, t, n, "cond", (b, 2 * b), 2 * b))
        return (StepInfo(self.i, t, n, "all", (0, b), b),)

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.scheduler.timesteps[self.i]
        x = torch.cat([self.x, self.x]) if self.cfg else self.x
        return self.scheduler.scale_model_input(x, t), t

    def eps(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's CFG-mixed output on ``x`` (learned-variance channels dropped): ``[B, C, H, W]``."""
        tt = t.reshape(()).expand(x.shape[0]).to(self.device) if self.family == "pixart" else t
        out = model(x, timestep=tt, return_dict=False, **self.cond)[0]
        if self.cfg:
            u, c = out.chunk(2)
            out = u + self.guidance * (c - u)
        ch = self.x.shape[1]
        return out[:, :ch] if out.shape[1] == 2 * ch else out

    @torch.no_grad()
    def advance(self, eps_teacher: torch.Tensor) -> None:
        t = self.scheduler.timesteps[self.i]
        kw = {"generator": self.step_gen} if self._step_gen else {}
        self.x = self.scheduler.step(eps_teacher.to(self.x.dtype), t, self.x, return_dict=False, **kw)[0]
        self.i += 1

    @torch.no_grad()
    def replay(self, j: int, i: int) -> None:
        """Trajectory ``j`` advanced ``i`` steps by the teacher alone (deterministic: resumes mid-trajectory)."""
        self.start(j)
        while self.i < i:
            x, t = self.model_input()
            self.advance(self.eps(self.teacher, x, t))


@contextlib.contextmanager
def _own_step_publishing(pipe: Any, den: nn.Module) -> Iterator[None]:
    """Detach a pipeline step tracker from ``den`` (it would locate steps in ``pipe.scheduler``, not in the
    training scheduler) while we publish steps ourselves; re-attach it after."""
    from vqsuite.calibrators.timestep import attach_step_tracker, step_tracker_of

    tracker = step_tracker_of(den)
    reattach = tracker is not None and tracker._scheduler is not None
    if reattach:
        tracker.remove()
    try:
        yield
    finally:
        if reattach:
            attach_step_tracker(pipe, denoiser=den)


#: per-step loss weightings of :func:`qalora` (``min_snr`` uses ``MIN_SNR_GAMMA``)
LOSS_WEIGHTINGS = ("eps", "x0", "min_snr")
MIN_SNR_GAMMA = 5.0


def _step_weights(scheduler: Any, kind: str) -> list[float] | None:
    """One loss weight per step of ``scheduler.timesteps`` (mean 1), or ``None`` for ``"eps"``."""
    if kind == "eps":
        return None
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise ConfigError(f"loss_weighting={kind!r} needs a scheduler with alphas_cumprod")
    a = torch.stack([acp[int(t)] for t in scheduler.timesteps]).double().clamp(1e-8, 1 - 1e-8)
    snr = a / (1 - a)
    w = 1 / snr if kind == "x0" else torch.clamp(MIN_SNR_GAMMA / snr, max=1.0)
    return (w / w.mean()).tolist()


def _default_guidance(pipe: Any) -> float:
    try:
        p = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    except (TypeError, ValueError):
        p = None
    return float(p.default) if p is not None and isinstance(p.default, (int, float)) else 1.0


@torch.no_grad()
def qalora_mse(
    pipe: Any,
    teacher: nn.Module,
    prompts: list[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    batch_size: int = 2,
    seed: int = 1234,
    trajectories: int = 1,
) -> float:
    """Mean over the steps of ``trajectories`` teacher trajectories of the MSE between the CFG-mixed outputs of
    ``pipe``'s denoiser (quantized, any state) and ``teacher`` on the same ``x_t``: the distillation loss,
    measured. Use another ``seed`` than training's for held-out inputs."""
    from vqsuite.pipelines.diffusers import default_calib_prompts, find_denoiser

    _, den = find_denoiser(pipe)
    prompts = list(prompts) if prompts is not None else default_calib_prompts()
    g = _default_guidance(pipe) if guidance_scale is None else guidance_scale
    tr = _Trajectories(
        pipe, teacher, den, prompts, num_inference_steps=num_inference_steps, guidance_scale=g,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    total, count = 0.0, 0
    with _own_step_publishing(pipe, den):
        for j in range(trajectories):
            tr.start(j)
            while tr.i < tr.steps_per_traj:
                x, t = tr.model_input()
                with _steps.publish(tr.step_infos()):
                    e_t = tr.eps(teacher, x, t)
                    e_s = tr.eps(den, x, t)
                total += float(F.mse_loss(e_s.float(), e_t.float()))
                count += 1
                tr.advance(e_t)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------ checkpoints
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _is_ours(d: Path) -> bool:
    """A ``step-XXXXXX`` folder qalora wrote: a real folder (not a symlink) holding its ``state.json`` (an object
    with our ``format``, or the ``signature`` of checkpoints written before the format key)."""
    if d.is_symlink() or not d.is_dir() or (d / CKPT_STATE).is_symlink():
        return False
    try:
        state = json.loads((d / CKPT_STATE).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and (state.get("format") == CKPT_FORMAT or "signature" in state)


def _pointed(folder: Path) -> Path | None:
    """The checkpoint folder ``latest.json`` names, when it is a valid one of ours; else ``None`` (nothing to
    remove: a foreign or broken pointer is never followed for deletion)."""
    try:
        name = json.loads((folder / CKPT_LATEST).read_bytes()).get("dir")
        d = check_child(folder, name, CKPT_DIR_PATTERN, CKPT_LATEST)
    except (OSError, ValueError, AttributeError):  # CheckpointError is a ValueError
        return None
    return d if _is_ours(d) else None


def _rmtree_ours(d: Path) -> None:
    if _is_ours(d):
        shutil.rmtree(d, ignore_errors=True)


def _save_checkpoint(
    folder: Path, u: int, trainable: dict[str, nn.Parameter], optim: torch.optim.Optimizer, state: dict, x: torch.Tensor
) -> None:
    """Write ``folder/step-XXXXXX`` (in a temporary folder, renamed into place), point ``latest.json`` at it, then
    remove the checkpoint the pointer named before: only folders qalora wrote are ever removed."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{u:06d}"
    if (final.exists() or final.is_symlink()) and not _is_ours(final):
        raise CheckpointError(f"{final} exists and was not written by qalora; move it or choose another checkpoint_dir")
    previous = _pointed(folder)
    tmp = folder / f".tmp-step-{u:06d}"
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: p.detach().contiguous().cpu() for k, p in trainable.items()}, str(tmp / CKPT_TRAINABLE))
    tensors = {"latents": x.detach().contiguous().cpu(), "cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / CKPT_TENSORS))
    torch.save(optim.state_dict(), tmp / CKPT_OPTIM)  # plain tensors and numbers: loaded with weights_only=True
    (tmp / CKPT_STATE).write_text(json.dumps({"format": CKPT_FORMAT, **state}, indent=1))
    old = None
    if final.exists():  # ours (checked above): moved aside, so the pointer never names a half-removed folder
        old = folder / f".old-step-{u:06d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _atomic_write_bytes(folder / CKPT_LATEST, json.dumps({"dir": final.name, "updates": u}).encode())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if previous is not None and previous.name != final.name:
        _rmtree_ours(previous)


def _check_planned(folder: Path, u0: int, steps: int, every: int) -> None:
    """Before training: no ``step-XXXXXX`` folder a later save would replace may be someone else's."""
    if not every or not folder.is_dir():
        return
    for d in folder.iterdir():
        if re.fullmatch(CKPT_DIR_PATTERN, d.name) and not _is_ours(d):
            u = int(d.name[5:])
            if u0 < u <= steps and (u % every == 0 or u == steps):
                raise CheckpointError(f"{d} exists and was not written by qalora (a checkpoint would replace it); "
                                      "move it or choose another checkpoint_dir")  # fmt: skip


def _load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict[str, torch.Tensor]] | None:
    """``(state, trainable tensors, optimizer state, extra tensors)`` of the checkpoint ``latest.json`` names, or
    ``None`` without a ``latest.json``. A pointer that leaves ``folder`` (``..``, absolute paths, separators,
    symlinks), a missing, truncated or corrupt file, or an optimizer file holding anything but tensors and numbers
    is one :class:`CheckpointError` line; no file content is ever quoted, nothing is unpickled beyond
    ``weights_only``."""
    from safetensors.torch import load_file

    latest = folder / CKPT_LATEST
    if not latest.is_file():
        return None
    pointer = read_json(latest, "checkpoint pointer")
    if not isinstance(pointer, dict):
        raise CheckpointError(f"checkpoint pointer {latest} is not a JSON object")
    d = check_child(folder, pointer.get("dir"), CKPT_DIR_PATTERN, f"checkpoint pointer {latest}")
    if not d.is_dir():
        raise CheckpointError(f"{latest} names a checkpoint folder that does not exist ({d.name})")
    for name in (CKPT_STATE, CKPT_TRAINABLE, CKPT_OPTIM, CKPT_TENSORS):
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {d} is incomplete: {name} is missing")
        check_child(d, name, re.escape(name), f"checkpoint file {f}")  # a symlink out of the checkpoint
    state = read_json(d / CKPT_STATE, "checkpoint state")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {d / CKPT_STATE} is not a JSON object")
    out = []
    for name in (CKPT_TRAINABLE, CKPT_TENSORS):
        try:
            out.append(load_file(str(d / name)))
        except Exception as e:  # safetensors' own error types for truncated or corrupt files
            raise CheckpointError(f"checkpoint file {d / name} cannot be read ({type(e).__name__}); truncated or "
                                  "corrupt") from None  # fmt: skip
    try:
        optim = torch.load(d / CKPT_OPTIM, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError's message quotes the file: only its type is named
        raise CheckpointError(f"checkpoint file {d / CKPT_OPTIM} cannot be read ({type(e).__name__}): corrupt, or it "
                              "holds more than tensors and numbers (refused unread)") from None  # fmt: skip
    if not isinstance(optim, dict):
        raise CheckpointError(f"checkpoint file {d / CKPT_OPTIM} is not an optimizer state")
    return state, out[0], optim, out[1]


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Read and check the latest checkpoint in ``folder`` (see :func:`_load_checkpoint`) before any training;
    its state, or ``None`` when there is none."""
    loaded = _load_checkpoint(Path(folder))
    return None if loaded is None else loaded[0]


def _restore_checkpoint(
    ckpt: Path, loaded: tuple, signature: dict, trainable: dict[str, nn.Parameter], optim: Any, steps: int
) -> tuple[int, list[float], float, torch.Tensor]:
    """Load a checkpoint into the trainables, the optimizer and the RNGs; ``(updates, loss_curve, wall_s, latents)``.
    Anything that does not fit is one :class:`CheckpointError` line naming only our own keys."""
    state, tensors, optim_state, extra = loaded
    what = f"checkpoint in {ckpt}"
    saved = state.get("signature")
    if saved != signature:
        saved = saved if isinstance(saved, dict) else {}
        diff = [k for k in signature if saved.get(k) != signature[k]]
        raise CheckpointError(f"{what} was made with other settings ({', '.join(diff) or 'unknown'} differ); "
                              "resume with the same settings or restart without resume")  # fmt: skip
    u0, curve, wall = state.get("updates"), state.get("loss_curve"), state.get("wall_s")
    if not isinstance(u0, int) or isinstance(u0, bool) or not 0 <= u0 <= steps:
        raise CheckpointError(f"{what}: its update count is not an integer in 0..{steps}")
    if not isinstance(curve, list) or len(curve) != u0 or not all(isinstance(v, (int, float)) for v in curve):
        raise CheckpointError(f"{what}: its loss curve does not hold one number per update")
    if not isinstance(wall, (int, float)) or isinstance(wall, bool):
        raise CheckpointError(f"{what}: its wall_s is not a number")
    for k, p in trainable.items():
        t = tensors.get(k)
        if t is None or t.shape != p.shape:
            raise CheckpointError(f"{what} does not fit the model: {k} is missing or of another shape")
    for k in ("latents", "cpu_rng"):
        if k not in extra:
            raise CheckpointError(f"{what} is incomplete: {CKPT_TENSORS} lacks {k}")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(tensors[k].to(p.device, p.dtype))
    try:
        optim.load_state_dict(optim_state)
        torch.set_rng_state(extra["cpu_rng"])
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{what}: its optimizer or RNG state does not fit ({type(e).__name__})") from None
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])
    return u0, [float(v) for v in curve], float(wall), extra["latents"]


# ------------------------------------------------------------------------------------------------ entry point
def _has_quant_layers(den: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in den.modules())


def qalora(
    pipe: Any,
    config: Any = "w4a4",
    steps: int = 200,
    rank: int = DEFAULT_RANK,
    lr_scale: float = DEFAULT_LR_SCALE,
    prompts: list[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    batch_size: int = 2,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    deterministic: bool = False,
    freeze: bool = True,
    progress: bool = True,
    calib_prompts: list[str] | None = None,
    lr_weight_scale: float = 1e-6,
    lr_act_scale: float = 5e-4,
    teacher: nn.Module | None = None,
    loss_weighting: str = "eps",
    call_kwargs: dict[str, Any] | None = None,
) -> Any:
    """EfficientDM fine-tuning of ``pipe``'s quantized denoiser, in place; returns ``pipe``.

    Args:
        pipe: a diffusers text-to-image pipeline (SD-style UNet or PixArt denoiser). A float denoiser is copied as
            the FP teacher, then quantized with ``config`` (``quantize_pipeline(..., freeze=False)``); an already
            quantized one (fake-quant or frozen) is used as is and needs ``teacher``.
        config: the quantization recipe (preset name, ``QuantConfig``, ...) when the denoiser is still float.
        steps: optimizer updates, one per denoising step (a trajectory gives ``num_inference_steps`` of them).
        rank: LoRA rank (clipped to ``min(N, K)`` per layer).
        lr_scale: each layer's LoRA learning rate is ``lr_scale · mean(s_w)`` (default: the official code's
            ``1/2500`` = ``1 / LORA_LR_DIVISOR``; see ``DEFAULT_LR_SCALE`` for what larger values did on mini-sd).
        prompts: training prompts (default: the shipped calibration prompts); ``batch_size`` per trajectory,
            cycled in order.
        num_inference_steps, guidance_scale: the trajectories' steps and CFG scale (the pipeline's default when
            ``None``; CFG runs when it is > 1).
        seed: seeds LoRA init, ``x_T`` (``seed·1000003 + trajectory``) and stochastic scheduler steps.
        checkpoint_dir, checkpoint_every: save every ``checkpoint_every`` updates (and at the end) into
            ``checkpoint_dir/step-XXXXXX`` (atomic; ``latest.json`` names the newest, and the one it named before
            is removed: only folders qalora wrote are ever removed); ``resume=True`` continues from the latest one
            exactly as an uninterrupted run would (the trajectory prefix is replayed by the teacher). A pointer
            leaving ``checkpoint_dir``, a missing or corrupt file, or other settings: a ``CheckpointError``.
        deterministic: ``torch.use_deterministic_algorithms`` while training.
        freeze: pack the trained layers (else fake-quant layers whose pending codes are the trained ones).
        progress: show a tqdm bar.
        calib_prompts: calibration prompts for the initial quantization.
        lr_weight_scale, lr_act_scale: learning rates of the weight scales and the activation step sizes.
        teacher: the float denoiser (required when ``pipe``'s denoiser is already quantized).
        loss_weighting: per-step weight of the MSE: ``"eps"`` (the paper: every step alike), ``"x0"`` (the error of
            the implied clean-image prediction, ``(1 - ᾱ_t) / ᾱ_t`` times the eps error) or ``"min_snr"``
            (``min(1, γ / SNR_t)``, γ = 5, Hang et al. 2023: low-noise steps down-weighted); weights are normalised
            to mean 1 over a trajectory, so learning rates keep their meaning.
        call_kwargs: extra keyword arguments of the pipeline's calls when ``config`` needs calibration runs
            (mini-pixart: ``{"use_resolution_binning": False, "clean_caption": False}``).

    Records ``pipe.vqsuite_qalora``: updates, wall_s, loss_first, loss_last, loss_curve (one loss per update),
    loss_per_trajectory (mean per trajectory: the comparable figure), config, rank, talsq, layers, lora_params,
    guidance_scale, num_inference_steps, resumed_from, frozen.
    """
    from vqsuite.config import resolve_config
    from vqsuite.pipelines.diffusers import default_calib_prompts, find_denoiser, quantize_pipeline

    if not isinstance(steps, int) or steps <= 0:
        raise UserError(f"steps={steps!r} must be a positive integer")
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"rank={rank!r} must be a positive integer")
    if batch_size <= 0 or num_inference_steps <= 0:
        raise UserError(f"batch_size={batch_size} and num_inference_steps={num_inference_steps} must be positive")
    if checkpoint_every < 0 or (checkpoint_every and checkpoint_dir is None):
        raise UserError(f"checkpoint_every={checkpoint_every} needs checkpoint_dir and must be >= 0")
    if resume and checkpoint_dir is None:
        raise UserError("resume=True needs checkpoint_dir")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise UserError(f"loss_weighting={loss_weighting!r} must be one of {', '.join(LOSS_WEIGHTINGS)}")
    try:
        den_name, den = find_denoiser(pipe)
    except ValueError as err:
        raise UserError(f"qalora needs a diffusers pipeline with a denoiser: {err}") from None
    prompts = list(prompts) if prompts is not None else default_calib_prompts()
    if not prompts:
        raise UserError("prompts is empty")

    if _has_quant_layers(den):
        if teacher is None:
            raise UserError(
                f"{den_name} is already quantized: pass teacher=<the float {type(den).__name__}> (the FP model)"
            )
        cfg_used = getattr(getattr(den, "vqsuite_config", None), "name", None) or "custom"
        if config != "w4a4":  # the default: not worth a line
            logger.info("qalora: %s is already quantized (%s); config=%r is not used", den_name, cfg_used, config)
    else:
        try:
            resolved = resolve_config(config)
        except ValueError as err:
            raise UserError(f"config: {err}") from None
        cfg_used = config if isinstance(config, str) else (resolved.name or "custom")
        if teacher is None:
            teacher = copy.deepcopy(den)
        quantize_pipeline(
            pipe, resolved, calib_prompts=calib_prompts, num_inference_steps=num_inference_steps, seed=seed,
            guidance_scale=guidance_scale, freeze=False, **(call_kwargs or {}),
        )  # fmt: skip
    teacher.eval().requires_grad_(False)
    dev = next(den.parameters()).device
    teacher.to(dev)
    guidance = _default_guidance(pipe) if guidance_scale is None else float(guidance_scale)

    was_training = den.training
    den.eval()  # dropout off: the student sees exactly the teacher's inputs
    tr = _Trajectories(
        pipe, teacher, den, prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    adapters = attach_adapters(den, rank, seed=seed, timesteps=tr.timesteps)
    if not adapters:
        raise UserError(f"{den_name} has no weight-quantizing vqsuite layer to fine-tune")
    talsq = any(a.act is not None for a in adapters.values())

    groups: list[dict[str, Any]] = []
    for name, a in adapters.items():
        lr = lr_scale * a.mean_scale
        groups.append({"params": [a.lora_A, a.lora_B], "lr": lr, "weight_decay": LORA_WEIGHT_DECAY, "name": name})
    w_scales = [a.w_scale for a in adapters.values() if a.w_scale is not None]
    acts = [a.act.step for a in adapters.values() if a.act is not None]
    if w_scales:
        groups.append({"params": w_scales, "lr": lr_weight_scale, "weight_decay": 0.0, "name": "weight_scales"})
    if acts:
        groups.append({"params": acts, "lr": lr_act_scale, "weight_decay": 0.0, "name": "act_steps"})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
        g["initial_lr"] = g["lr"]
    optim = torch.optim.AdamW(groups)
    trainable = {n: p for n, p in den.named_parameters() if p.requires_grad}

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=dev.type == "cpu", device_placement=False)
    if accelerator.num_processes > 1:
        raise UserError(f"qalora trains on one process; got {accelerator.num_processes}")
    student, optim = accelerator.prepare(den, optim)

    signature = {
        "config": str(cfg_used), "steps": steps, "rank": rank, "lr_scale": lr_scale, "seed": seed,
        "num_inference_steps": num_inference_steps, "guidance_scale": guidance, "batch_size": batch_size,
        "lr_weight_scale": lr_weight_scale, "lr_act_scale": lr_act_scale, "loss_weighting": loss_weighting,
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16], "trainable": len(trainable),
    }  # fmt: skip
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    u0, curve, wall = 0, [], 0.0
    if resume:
        loaded = _load_checkpoint(ckpt)
        if loaded is None:
            logger.warning("qalora: resume=True but no checkpoint in %s; starting from update 0", ckpt)
        else:
            u0, curve, wall, latents = _restore_checkpoint(ckpt, loaded, signature, trainable, optim, steps)
            j, i = divmod(u0, tr.steps_per_traj)
            tr.replay(j, i)
            if tr.x.shape != latents.shape:
                raise CheckpointError(f"checkpoint in {ckpt}: its latents do not fit the trajectories")
            if not torch.equal(tr.x.cpu(), latents.to(tr.x.dtype)):
                logger.warning("qalora: replayed latents differ from the checkpoint's; using the checkpoint's")
                tr.x = latents.to(tr.x.device, tr.x.dtype)
            logger.info("qalora: resumed from %s at update %d", ckpt, u0)
    if ckpt is not None:
        _check_planned(ckpt, u0, steps, checkpoint_every)
    resumed_from = u0
    step_weights = _step_weights(tr.scheduler, loss_weighting)

    from tqdm.auto import tqdm

    prev_det = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    bar = tqdm(total=steps, initial=u0, desc="qalora", disable=not progress)
    start = time.perf_counter()

    def save(u: int) -> None:
        state = {
            "signature": signature, "updates": u, "loss_curve": curve, "trajectory": u // tr.steps_per_traj,
            "step": u % tr.steps_per_traj, "wall_s": wall + time.perf_counter() - start,
        }  # fmt: skip
        _save_checkpoint(ckpt, u, trainable, optim, state, tr.x)

    try:
        with _own_step_publishing(pipe, den):
            if u0 == 0:
                tr.start(0)
            for u in range(u0, steps):
                if tr.i >= tr.steps_per_traj:
                    tr.start(tr.traj + 1)
                for g in optim.param_groups:
                    g["lr"] = g["initial_lr"] * (1.0 - u / steps)
                x, t = tr.model_input()
                with _steps.publish(tr.step_infos()):
                    with torch.no_grad():
                        e_t = tr.eps(teacher, x, t)
                    e_s = tr.eps(student, x, t)
                loss = F.mse_loss(e_s.float(), e_t.float())
                if step_weights is not None:
                    loss = loss * step_weights[tr.i]
                optim.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optim.step()
                tr.advance(e_t)
                curve.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{curve[-1]:.4g}")
                done = u + 1
                if ckpt is not None and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                    save(done)
    finally:
        bar.close()
        if deterministic:
            torch.use_deterministic_algorithms(prev_det)
    wall += time.perf_counter() - start

    merge_adapters(den, freeze=freeze)
    den.train(was_training)
    pipe.vqsuite_qalora = {
        "updates": steps, "wall_s": wall, "loss_first": curve[0] if curve else math.nan,
        "loss_last": curve[-1] if curve else math.nan, "loss_curve": curve, "config": cfg_used, "rank": rank,
        "talsq": talsq, "layers": len(adapters), "lora_params": sum(a.lora_A.numel() + a.lora_B.numel()
        for a in adapters.values()), "guidance_scale": guidance, "num_inference_steps": num_inference_steps,
        "resumed_from": resumed_from, "frozen": bool(freeze), "lr_scale": lr_scale, "loss_weighting": loss_weighting,
        # losses of different steps are not comparable (late, low-noise steps are larger): compare trajectories
        "loss_per_trajectory": [sum(c) / len(c) for c in (curve[k : k + tr.steps_per_traj]
                                for k in range(0, len(curve), tr.steps_per_traj))],
    }  # fmt: skip
    logger.info(
        "qalora: %d updates on %d layers in %.1f s, loss %.4g -> %.4g",
        steps, len(adapters), wall, pipe.vqsuite_qalora["loss_first"], pipe.vqsuite_qalora["loss_last"],
    )  # fmt: skip
    return pipe
