"""The 95% Wilson score interval of the demo's and the evaluations' fractions."""
import math

import pytest

from avidfast.eval.confidence import fraction_interval, wilson_interval


def _wilson(k, n, z=1.959963984540054):
    """Written from the textbook formula: the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (1, 180), (97, 180), (3, 7)])
def test_wilson_interval_solves_the_score_equation(k, n):
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _wilson(k, n)
    assert low == pytest.approx(max(ref_low, 0.0), abs=1e-12) and high == pytest.approx(min(ref_high, 1.0), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_known_values_symmetry_and_width():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook example
    low, high = wilson_interval(3, 20)
    assert wilson_interval(17, 20) == pytest.approx((1 - high, 1 - low))
    wide, narrow = wilson_interval(5, 10), wilson_interval(50, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert fraction_interval(1 / 3, 180) == wilson_interval(60, 180)


@pytest.mark.parametrize("k, n, match", [(1, 0, "n must be"), (-1, 5, "successes"), (6, 5, "successes"),
                                         (1.5, 5, "successes")])
def test_bad_input(k, n, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(k, n)
