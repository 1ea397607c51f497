"""EfficientDM QALoRA: merge/freeze exactness per layer kind, TALSQ per-step slots, distillation lowers the
FP-vs-quantized error, exact resume, frozen result that runs and round-trips, and input errors."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.config import QuantConfig, QuantSpec
from vqsuite.finetune import attach_adapters, merge_adapters, qalora, qalora_mse
from vqsuite.finetune.lsq import TimestepLSQActQuantizer
from vqsuite.nn import QConv2d, QConvTranspose2d, QLinear, QLinearLowRank, QuantLayer
from vqsuite.nn.steps import StepInfo, publish

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusers"))
import tiny_pipelines as tp  # noqa: E402

#: merged + frozen vs fake-quant-with-adapter outputs: bit-identical (same codes, same stored scales, same GEMM)
EXACT_ATOL = 0.0
#: a short distillation run must lower the held-out denoiser MSE by at least this fraction. Measured (W2A8, 16
#: updates, lr_scale 1/100, AMD EPYC AVX2): 0.4232 -> 0.2615, -38 %; -37 % with the non-SIMD code paths
#: (ATEN_CPU_CAPABILITY=default, MKL SSE4_2, oneDNN SSE41), -43 % / -46 % with training seeds 1 / 2. The old setting
#: (W4A4, 8 updates, lr_scale 1/50) dropped it by 0.09 % only, under the old 1 % bar: the outcome was CPU noise.
MIN_MSE_DROP = 0.10
#: the distillation setting: INT2 weights leave an error LoRA can absorb in a few updates (W4A4's error is mostly
#: its INT4 activations, out of LoRA's reach); lr_scale 1/100 trains smoothly (1/25 already overshoots)
DISTILL_PRESET, DISTILL_UPDATES, DISTILL_LR_SCALE = "w2a8", 16, 1 / 100
#: the few-update runs: trajectory length, prompts, batch
SHORT = {"num_inference_steps": 4, "batch_size": 1, "prompts": ["a red cat on the mat"], "progress": False}

INT4_G64 = QuantSpec(weight="int4", weight_group_size=64, scale_dtype="bfloat16", act="int4",
                     act_mode="dynamic_per_group", act_group_size=64)  # fmt: skip
INT8_CH = QuantSpec(weight="int8", act="int8", act_mode="dynamic_per_token")
INT8_STATIC = QuantSpec(weight="int8", act="int8", act_mode="static", act_granularity="per_step", n_buckets=3)
NVFP4 = QuantSpec(weight="nvfp4", act="nvfp4", act_mode="dynamic_per_group")
INT4_ASYM = QuantSpec(weight="int4_asym", weight_group_size=64, act=None)


def _layer(kind: str, spec: QuantSpec) -> QuantLayer:
    torch.manual_seed(0)
    if kind == "linear":
        return QLinear.from_float(nn.Linear(128, 96), spec)
    if kind == "lowrank":
        return QLinearLowRank.from_float(nn.Linear(128, 96), spec.replace(rank=8))
    if kind == "convt":
        return QConvTranspose2d.from_float(nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1), spec)
    return QConv2d.from_float(nn.Conv2d(64, 32, 3, padding=1), spec)


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn((2, 64, 6, 6) if kind.startswith("conv") else (5, 128), generator=g)


def _perturb(adapter) -> None:
    """Stand-in for training: non-zero LoRA, moved scales and activation steps."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        adapter.lora_B.copy_(0.02 * torch.randn(adapter.lora_B.shape, generator=g))
        if adapter.w_scale is not None:
            adapter.w_scale.mul_(1 + 0.1 * torch.rand(adapter.w_scale.shape, generator=g))
        if adapter.act is not None:
            adapter.act.step.mul_(torch.linspace(0.8, 1.2, adapter.act.num_slots))


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "fakequant"])
@pytest.mark.parametrize(
    "spec",
    [INT4_G64, INT8_CH, INT8_STATIC, NVFP4, INT4_ASYM],
    ids=["int4_g64", "int8_ch", "int8_static_per_step", "nvfp4", "int4_asym_g64"],
)
@pytest.mark.parametrize("kind", ["linear", "lowrank", "conv", "convt"])
def test_merge_is_exact(kind: str, spec: QuantSpec, freeze: bool) -> None:
    layer = _layer(kind, spec)
    layer.layer_name = kind
    x = _input(kind)
    timesteps = [900.0, 500.0, 100.0]
    if spec.act_mode == "static":
        layer.set_act_scale_table(torch.tensor([0.02, 0.03, 0.05]), torch.tensor(timesteps), torch.tensor(0.03))
    model = nn.Sequential(layer)
    adapters = attach_adapters(model, rank=8, timesteps=timesteps)
    (adapter,) = adapters.values()
    _perturb(adapter)
    steps = [StepInfo(i, t, 3) for i, t in enumerate(timesteps)] if spec.act_mode == "static" else [None]

    def run() -> list[torch.Tensor]:
        out = []
        for s in steps:
            with publish(s) if s is not None else contextlib.nullcontext():
                out.append(layer(x).detach())
        return out

    with torch.enable_grad():  # the gradient path must not change the forward value
        before = run()
    merge_adapters(model, freeze=freeze)
    assert layer.adapter is None and layer.frozen == freeze
    if freeze:
        assert "weight" not in layer._parameters and "qweight" in layer._buffers
    for a, b in zip(before, run(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=EXACT_ATOL), f"{kind}: max diff {(a - b).abs().max():.3g}"
    if spec.act_mode == "static":
        assert torch.equal(layer.act_scale_steps, adapter.act.step.detach())


def test_gradients_reach_lora_scales_and_steps() -> None:
    layer = _layer("linear", INT8_STATIC)
    layer.set_act_scale_table(torch.tensor([0.02, 0.03, 0.05]), torch.tensor([900.0, 500.0, 100.0]), torch.tensor(0.03))
    model = nn.Sequential(layer)
    (adapter,) = attach_adapters(model, rank=4, timesteps=[900.0, 500.0, 100.0]).values()
    with publish(StepInfo(1, 500.0, 3)):
        layer(_input("linear")).square().sum().backward()
    assert layer._parameters["weight"].grad is None  # W0 is frozen
    assert adapter.lora_B.grad.abs().sum() > 0 and adapter.w_scale.grad.abs().sum() > 0
    steps_grad = adapter.act.step.grad
    assert steps_grad[1] != 0 and steps_grad[0] == 0 and steps_grad[2] == 0  # only the running step's slot


def test_timestep_lsq_value_matches_static_fake_quant() -> None:
    from vqsuite.nn.quantizers import fake_quantize_static

    q = TimestepLSQActQuantizer(torch.tensor([0.01, 0.1]), "int4")
    x = torch.randn(4, 16, requires_grad=True)
    for slot in (0, 1):
        assert torch.equal(q(x, slot).detach(), fake_quantize_static(x.detach(), "int4", q.step[slot].detach()))
    with pytest.raises(ValueError, match="positive"):
        TimestepLSQActQuantizer(torch.tensor([0.0]), "int8")


# ------------------------------------------------------------------------------------------ pipelines
def _sd(seed: int = 0):
    pipe = tp.sd15(64, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_talsq_keeps_per_step_slots() -> None:
    cfg = QuantConfig(default=QuantSpec(weight="int8", act="int8", act_mode="static", act_granularity="per_step"))
    pipe = _sd()
    teacher = copy.deepcopy(pipe.unet)
    tp.quantize("sd15", "w8a8", pipe=pipe, config=cfg, num_inference_steps=4, freeze=False, num_calib_prompts=1)
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantLayer) and m.has_step_scales]
    assert layers
    before = {id(m): m.act_scale_steps.clone() for m in layers}
    qalora(pipe, steps=3, teacher=teacher, **SHORT)  # steps 0-2 of a 4-step trajectory run, step 3 never does
    assert pipe.vqsuite_qalora["talsq"]
    moved = 0
    for m in layers:
        after, b = m.act_scale_steps, before[id(m)]
        assert after.numel() == 4 and torch.unique(after).numel() == 4, f"{m.layer_name}: slots merged"
        assert torch.equal(after[3], b[3]), f"{m.layer_name}: slot of a step that never ran moved"
        moved += int(not torch.equal(after[:3], b[:3]))
    assert moved == len(layers)


def test_distillation_lowers_denoiser_mse() -> None:
    pipe = _sd()
    teacher = copy.deepcopy(pipe.unet)
    tp.quantize("sd15", DISTILL_PRESET, pipe=pipe, freeze=False)
    held_out = {k: v for k, v in SHORT.items() if k != "progress"}
    before = qalora_mse(pipe, teacher, seed=99, trajectories=2, **held_out)
    qalora(pipe, steps=DISTILL_UPDATES, teacher=teacher, lr_scale=DISTILL_LR_SCALE, **SHORT)
    after = qalora_mse(pipe, teacher, seed=99, trajectories=2, **held_out)
    rec = pipe.vqsuite_qalora
    assert rec["updates"] == DISTILL_UPDATES and len(rec["loss_curve"]) == DISTILL_UPDATES and rec["rank"] == 32
    assert after < before * (1 - MIN_MSE_DROP), f"held-out MSE {before:.5f} -> {after:.5f}"


class _Interrupt(Exception):
    pass


class _StopAfter(nn.Module):
    """A teacher that raises on its ``n+1``-th call (an interruption after ``n`` updates)."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.n:
            raise _Interrupt
        return self.inner(*args, **kwargs)


def _pixart():
    pipe = tp.pixart(128)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("build", [_sd, _pixart], ids=["sd15-ddim", "pixart-dpmsolver"])
def test_resume_continues_identically(tmp_path: Path, build, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file

    kw = dict(SHORT, steps=6, rank=4, lr_scale=1 / 50, checkpoint_every=3)  # 6 updates cross a trajectory end
    straight = qalora(build(), "w4a4", checkpoint_dir=tmp_path / "a", **kw)
    pipe = build()
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    with pytest.raises(_Interrupt):
        qalora(pipe, "w4a4", checkpoint_dir=tmp_path / "b", teacher=_StopAfter(copy.deepcopy(den), 3), **kw)
    assert (tmp_path / "b" / "step-000003").is_dir()
    resumed = qalora(build(), "w4a4", checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.vqsuite_qalora["resumed_from"] == 3
    assert "differ" not in caplog.text  # the teacher's replay of the trajectory prefix met the saved latents
    a = load_file(str(tmp_path / "a" / "step-000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-000006" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.vqsuite_qalora["loss_curve"] == resumed.vqsuite_qalora["loss_curve"]
    sa, sb = straight.components, resumed.components
    name = "unet" if hasattr(straight, "unet") else "transformer"
    da, db = sa[name].state_dict(), sb[name].state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_result_is_frozen_runs_and_round_trips(tmp_path: Path) -> None:
    pipe = qalora(_sd(), "w4a4", steps=2, rank=4, deterministic=True, **SHORT)
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.frozen and m.adapter is None for m in layers)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training
    assert all("weight" not in m._parameters and "qweight" in m._buffers for m in layers if m.quantizes_weight)
    images = tp.generate(pipe, "sd15")
    out = pipe("a red cat", num_inference_steps=2, output_type="pt", height=32, width=32)
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    vqsuite.save_quantized(pipe, tmp_path / "q")
    loaded = vqsuite.load_quantized(tmp_path / "q")
    assert torch.equal(tp.generate(loaded, "sd15"), images)


def test_pixart_runs() -> None:
    pipe = _pixart()
    qalora(pipe, "w4a4", steps=2, rank=4, guidance_scale=2.0, **SHORT)
    assert all(m.frozen for m in pipe.transformer.modules() if isinstance(m, QuantLayer))
    assert len(pipe.vqsuite_qalora["loss_curve"]) == 2


def test_frozen_pipeline_needs_teacher_and_unfreezes() -> None:
    pipe = _sd()
    teacher = copy.deepcopy(pipe.unet)
    tp.quantize("sd15", "w4a4", pipe=pipe)  # frozen
    with pytest.raises(ValueError, match="teacher"):
        qalora(pipe, steps=1, **SHORT)
    before = tp.generate(pipe, "sd15")
    qalora(pipe, steps=1, rank=4, teacher=teacher, lr_scale=0.0, lr_weight_scale=0.0, **SHORT)
    # no learning: W0 = the dequantized stored weight, the learned scales = the stored ones, codes unchanged
    assert torch.equal(tp.generate(pipe, "sd15"), before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"rank": 0}, "rank"),
        ({"config": "w3a3-nonsense"}, "unknown preset"),
        ({"checkpoint_every": 2}, "checkpoint_dir"),
        ({"resume": True}, "checkpoint_dir"),
        ({"loss_weighting": "snr"}, "loss_weighting"),
    ],
    ids=["steps", "rank", "config", "ckpt-every", "resume", "weighting"],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        qalora(_sd(), **{"steps": 1, **kwargs})


def test_not_a_pipeline() -> None:
    with pytest.raises(ValueError, match="denoiser"):
        qalora(object(), steps=1)


def test_step_weights_follow_the_noise_schedule() -> None:
    """``x0`` weights fall from the noisiest step to the cleanest ((1 - ᾱ)/ᾱ), ``min_snr`` caps them at the
    low-noise end only; both have mean 1; ``eps`` is no weighting; a weighted run trains and records it."""
    qmod = sys.modules["vqsuite.finetune.qalora"]
    sched = copy.deepcopy(_sd().scheduler)
    sched.set_timesteps(10)
    assert qmod._step_weights(sched, "eps") is None
    x0 = torch.tensor(qmod._step_weights(sched, "x0"), dtype=torch.float64)
    snr = torch.tensor(qmod._step_weights(sched, "min_snr"), dtype=torch.float64)
    for w in (x0, snr):
        assert abs(float(w.mean()) - 1.0) < 1e-9
        assert bool((w[1:] <= w[:-1]).all()), "weights must not grow as the noise falls"
    assert float(x0[0] / x0[-1]) > float(snr[0] / snr[-1]) > 1.0
    a = sched.alphas_cumprod[[int(t) for t in sched.timesteps]].double()
    ref = (1 - a) / a
    torch.testing.assert_close(x0, ref / ref.mean(), rtol=1e-12, atol=0.0)
    pipe = _sd()
    teacher = copy.deepcopy(pipe.unet)
    tp.quantize("sd15", "w4a4", pipe=pipe, freeze=False)
    qalora(pipe, steps=2, rank=4, teacher=teacher, loss_weighting="x0", **SHORT)
    assert pipe.vqsuite_qalora["loss_weighting"] == "x0" and len(pipe.vqsuite_qalora["loss_curve"]) == 2
