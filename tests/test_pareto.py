import numpy as np
import pytest

from frontier.results.crossover import crossover, crossover_sampled, eval_curve, fit_cost_curve
from frontier.results.fronts import pareto_front


def P(pid, cost, q, status="ok", reason=None):
    return {"point_id": pid, "cost": cost, "ppl": q, "status": status, "reason": reason}


def test_front_ties_dominated_failed():
    rows = [
        P("a", 1.0, 10.0),
        P("b", 2.0, 8.0),
        P("b2", 2.0, 8.0),  # identical to b: both on the front
        P("c", 3.0, 9.0),  # dominated by b (cheaper and better)
        P("d", 1.0, 11.0),  # same cost as a, worse quality: dominated by a
        P("e", 5.0, 7.0),
        P("f", 0.5, 20.0, status="failed", reason="OOM at L=4096"),
        P("g", None, 5.0),
    ]
    front, excl = pareto_front(rows, "cost", "ppl")
    assert front == ["a", "b", "b2", "e"]
    assert excl["c"] == "dominated by b"
    assert excl["d"] == "dominated by a"
    assert excl["f"] == "failed: OOM at L=4096"
    assert excl["g"] == "missing cost"
    assert set(front) | set(excl) == {r["point_id"] for r in rows}


def test_front_higher_is_better_cost_and_quality():
    # decode tok/s: higher is better; recall: higher is better
    rows = [P("a", 100.0, 0.9), P("b", 200.0, 0.5), P("c", 150.0, 0.4), P("d", 200.0, 0.5)]
    front, excl = pareto_front(rows, "cost", "ppl", cost_lower_is_better=False,
                               quality_lower_is_better=False)
    assert front == ["b", "d", "a"]
    assert excl == {"c": "dominated by b"}


def test_front_empty_and_single():
    assert pareto_front([], "cost", "ppl") == ([], {})
    assert pareto_front([P("x", 1, 1)], "cost", "ppl") == (["x"], {})


def test_fit_recovers_quadratic():
    ls = np.array([128, 256, 512, 1024, 2048, 4096, 131072], dtype=float)
    a, b, c = 3.0, 0.01, 2e-6
    fit = fit_cost_curve(ls, a + b * ls + c * ls**2)
    assert fit == pytest.approx((a, b, c), rel=1e-6, abs=1e-9)
    # degenerate sizes
    assert fit_cost_curve([4], [7.0]) == (7.0, 0.0, 0.0)
    f2 = fit_cost_curve([1, 3], [1.0, 5.0])
    assert f2 == pytest.approx((-1.0, 2.0, 0.0))


def test_crossover():
    quad = (0.0, 1.0, 0.01)  # softmax-like: grows quadratically
    lin = (50.0, 2.0, 0.0)  # linear-attention-like: overhead, then linear
    # lin < quad  <=>  50 + 2L < L + 0.01 L^2  <=>  0.01 L^2 - L - 50 > 0
    #            ->  L > (1 + sqrt(1 + 4 * 0.01 * 50)) / (2 * 0.01) = 50 * (1 + sqrt(3))
    L_star = 50.0 * (1.0 + np.sqrt(3.0))
    x = crossover(lin, quad, 1.0, 1000.0)
    assert x == pytest.approx(L_star)
    assert eval_curve(lin, x + 1) < eval_curve(quad, x + 1)
    # never cheaper inside the range
    assert crossover(lin, quad, 1.0, 100.0) is None
    # quad is cheaper from the start of the range: documented choice -> l_min
    assert crossover(quad, lin, 1.0, 100.0) == 1.0
    # identical curves never cross
    assert crossover(lin, lin, 1.0, 100.0) is None
    # tangent (touches but never strictly cheaper)
    assert crossover((1.0, -2.0, 1.0), (0.0, 0.0, 0.0), 0.0, 5.0) is None


def test_crossover_sampled():
    ls = [1, 2, 4, 8]
    # a - b = [4, 1, -1, -4]: the zero lies halfway between L=2 and L=4
    assert crossover_sampled(ls, [5, 5, 5, 5], [1, 4, 6, 9]) == pytest.approx(3.0)
    assert crossover_sampled(ls, [0, 5, 5, 5], [1, 4, 6, 9]) == 1.0
    assert crossover_sampled(ls, [10, 10, 10, 10], [1, 4, 6, 9]) is None
