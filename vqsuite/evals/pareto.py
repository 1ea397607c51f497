"""Pareto fronts of (cost, quality) points: which configurations no other one beats on both axes.

``pareto_front([(bytes, psnr), ...])`` returns the indices of the non-dominated points sorted by cost;
``front_at(points, budget)`` is the best quality any point reaches within a cost budget (the front read as a
step function), which is how two libraries' fronts are compared budget by budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vqsuite.errors import UserError

__all__ = ["front_at", "pareto_front"]


def _check(points: Sequence[tuple[float, float]]) -> None:
    for i, p in enumerate(points):
        if len(p) != 2 or any(not isinstance(v, (int, float)) or math.isnan(v) for v in p):
            raise UserError(f"point {i} = {p!r} must be a (cost, quality) pair of numbers, not NaN")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates, sorted by cost (then by quality, best first).

    Args:
        points: ``[(cost, quality), ...]``; lower cost and higher quality are better.

    A point is dominated when another has cost <= and quality >= with one of them strict; of exact duplicates
    the first listed is kept.
    """
    _check(points)
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def front_at(points: Sequence[tuple[float, float]], budget: float) -> float | None:
    """The highest quality of any point with cost <= ``budget`` (``None`` when no point fits)."""
    _check(points)
    fits = [q for c, q in points if c <= budget]
    return max(fits) if fits else None
