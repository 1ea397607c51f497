from __future__ import annotations

import random

import pytest

from vqsuite.errors import UserError
from vqsuite.evals.pareto import front_at, pareto_front


def _dominated(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """``p`` is dominated by ``q``."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


def test_front_of_a_known_set() -> None:
    pts = [(4.0, 60.0), (1.6, 51.0), (1.1, 43.5), (1.2, 29.7), (0.6, 22.5), (2.3, 30.0), (1.1, 40.0)]
    assert pareto_front(pts) == [4, 2, 1, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_front_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    pts = [(float(rng.randint(0, 20)), float(rng.randint(0, 20))) for _ in range(60)]
    front = pareto_front(pts)
    undominated = {i for i, p in enumerate(pts) if not any(_dominated(p, q) for q in pts)}
    # duplicates of a front point: exactly one of them is kept
    assert {pts[i] for i in front} == {pts[i] for i in undominated}
    assert len(front) == len({pts[i] for i in front})
    costs = [pts[i][0] for i in front]
    quals = [pts[i][1] for i in front]
    assert costs == sorted(costs) and quals == sorted(quals) and len(set(quals)) == len(quals)


def test_front_at_budget() -> None:
    pts = [(1.0, 20.0), (2.0, 30.0), (3.0, 25.0)]
    assert front_at(pts, 0.5) is None
    assert front_at(pts, 1.0) == 20.0
    assert front_at(pts, 3.5) == 30.0


def test_bad_point_names_it() -> None:
    with pytest.raises(UserError, match="point 1"):
        pareto_front([(1.0, 2.0), (float("nan"), 3.0)])
