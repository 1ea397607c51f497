"""Calibrators observe activations and weights and return plain state that quantized layers consume."""

from __future__ import annotations

from vqsuite.calibrators.allocation import allocate_bits, solve_allocation
from vqsuite.calibrators.data import run_calibration_data
from vqsuite.calibrators.minmax import collect_input_amax
from vqsuite.calibrators.ranges import RangeObserver, calibrate_weight_ranges, search_weight_qtensor
from vqsuite.calibrators.sensitivity import Sensitivity, layer_sensitivity
from vqsuite.calibrators.split_shortcut import SplitConv2d, split_shortcuts
from vqsuite.calibrators.temporal import temporal_layer_names, with_temporal_calibration
from vqsuite.calibrators.timestep import (
    StepTracker,
    all_steps,
    attach_step_tracker,
    calibrate_static_scales,
    normal_steps,
    uniform_steps,
)

__all__ = [
    "RangeObserver",
    "Sensitivity",
    "SplitConv2d",
    "StepTracker",
    "all_steps",
    "allocate_bits",
    "attach_step_tracker",
    "calibrate_static_scales",
    "calibrate_weight_ranges",
    "collect_input_amax",
    "layer_sensitivity",
    "normal_steps",
    "run_calibration_data",
    "search_weight_qtensor",
    "solve_allocation",
    "split_shortcuts",
    "temporal_layer_names",
    "uniform_steps",
    "with_temporal_calibration",
]
