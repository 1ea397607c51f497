"""Small-config builders of diffusers denoiser classes (see denoiser_cases.py)."""

from __future__ import annotations

from coverage_run import Builder

CASES: dict[str, Builder] = {}
