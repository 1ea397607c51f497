"""Search strategies over SVDQuant's smoothing grid (:func:`vqsuite.calibrators.smoothing.smoothing_grid`).

The grid of ``num_grids = n`` is two lines that meet at ``(0, 0)``::

    line "beta0": (0, 0), (1/n, 0), ..., ((n-1)/n, 0)                  grid indices 0, 1, ..., n-1
    line "tied":  (0, 0), (1/n, 1-1/n), ..., ((n-1)/n, 1/n)            grid indices 0, n, ..., 2n-2

A search calls ``evaluate(alpha, beta) -> error`` (``inf`` for an unusable λ) on some of the ``2n - 1`` candidates
and returns the error of every candidate in grid order, ``nan`` for one it skipped:

* ``"exhaustive"``: every candidate (deepcompressor; 39 evaluations for ``n = 20``).
* ``"fast"``: coarse-to-fine. Every :data:`COARSE_DIVISIONS`-th position on both lines plus each line's last
  point (9 evaluations for ``n = 20``), then around the best one positions ``±h`` on its line (on both when it
  is ``(0, 0)``) for halving ``h`` down to 1 (at most 4 more, 8 from ``(0, 0)``). On the layers measured
  (BENCHMARKS.md) the error along each line is smooth, unimodal and flat near its minimum, so the local
  refinement lands on, or within hundredths of a dB of, the exhaustive pick.

:func:`pick_best` applies the exhaustive search's rule to either result: the smallest finite error, the later
candidate among ties. Extend :data:`SEARCHES` to add a strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vqsuite.calibrators.smoothing import smoothing_grid
from vqsuite.errors import ConfigError

Evaluate = Callable[[float, float], float]
Search = Callable[[int, Evaluate], list[float]]

#: the fast search's coarse stage visits positions 0, n/D, 2n/D, ... (and n-1) of each line: 5 steps of 4 for n=20
COARSE_DIVISIONS = 4


def grid_lines(num_grids: int) -> tuple[list[int], list[int]]:
    """Grid indices of the two lines, ordered by α: ``(beta0, tied)``, each of ``num_grids`` indices from 0."""
    n = num_grids
    return list(range(n)), [0, *range(n, 2 * n - 1)]


def exhaustive_search(num_grids: int, evaluate: Evaluate) -> list[float]:
    """Evaluate every candidate of :func:`smoothing_grid` in grid order."""
    return [evaluate(alpha, beta) for alpha, beta in smoothing_grid(num_grids)]


def coarse_to_fine_search(num_grids: int, evaluate: Evaluate) -> list[float]:
    """Coarse positions on both lines, then a halving local search on the best one's line (see module doc)."""
    grid = smoothing_grid(num_grids)
    errors = [math.nan] * len(grid)

    def at(index: int) -> float:
        if math.isnan(errors[index]):
            errors[index] = evaluate(*grid[index])
        return errors[index]

    lines = grid_lines(num_grids)
    n = num_grids
    step = max(1, n // COARSE_DIVISIONS)
    coarse = sorted(set(range(0, n, step)) | {n - 1})
    for line in lines:
        for pos in coarse:
            at(line[pos])
    best = pick_best(errors)
    for line in (ln for ln in lines if best in ln):  # both lines when the best is their common point (0, 0)
        pos = line.index(best)
        h = step // 2
        while h >= 1:
            for p in (pos - h, pos + h):
                if 0 <= p < n:
                    at(line[p])
            pos = line.index(pick_best(errors, among=line))
            h //= 2
    return errors


def pick_best(errors: list[float], among: list[int] | None = None) -> int:
    """Grid index of the smallest finite error (``nan`` = not evaluated); the later index wins a tie.

    ``among``: restrict to these grid indices. Raises ``RuntimeError`` when no candidate is finite.
    """
    indices = range(len(errors)) if among is None else among
    finite = [i for i in indices if math.isfinite(errors[i])]
    if not finite:
        raise RuntimeError("no smoothing candidate gave a usable λ (all overflow the layer dtype)")
    low = min(errors[i] for i in finite)
    return max(i for i in finite if errors[i] == low)


#: search strategies by name (``SVDQuantOptions.search``)
SEARCHES: dict[str, Search] = {"exhaustive": exhaustive_search, "fast": coarse_to_fine_search}


def get_search(name: str) -> Search:
    """The search strategy called ``name``; ``ConfigError`` naming the known ones otherwise."""
    if name not in SEARCHES:
        raise ConfigError(f"search={name!r} must be one of {', '.join(SEARCHES)}")
    return SEARCHES[name]


__all__ = [
    "COARSE_DIVISIONS",
    "SEARCHES",
    "coarse_to_fine_search",
    "exhaustive_search",
    "get_search",
    "grid_lines",
    "pick_best",
]
