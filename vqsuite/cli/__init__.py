"""Command-line interface (``vqsuite ...``)."""

from __future__ import annotations
