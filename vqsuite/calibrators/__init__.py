"""Calibrators observe activations and weights and return plain state that quantized layers consume."""

from __future__ import annotations

from vqsuite.calibrators.data import run_calibration_data
from vqsuite.calibrators.minmax import collect_input_amax

__all__ = ["collect_input_amax", "run_calibration_data"]
