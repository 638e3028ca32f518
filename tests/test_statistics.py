"""Is the difference real? Intervals of seed means, paired comparisons, seed ranges (checked by hand)."""
import math

import pytest

from fvgpt_cache.grids import parse_seeds
from fvgpt_cache.statistics import mean_interval, overlap, paired_difference


def test_t_interval_of_a_known_sample():
    # 1..5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764451051977987 (tables), half = t·s/√5
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    lo, hi = mean_interval([1, 2, 3, 4, 5])
    assert lo == pytest.approx(3 - half, abs=1e-9) and hi == pytest.approx(3 + half, abs=1e-9)
    assert half == pytest.approx(1.9632, abs=1e-4)
    assert mean_interval([7.0]) is None, "one seed has no interval"


def test_bootstrap_interval_is_reproducible_and_inside_the_data():
    values = [70.1, 72.4, 69.8, 75.0, 71.3, 73.9]
    a, b = mean_interval(values, "bootstrap"), mean_interval(values, "bootstrap")
    assert a == b, "seeded resampling: the same report twice"
    assert min(values) < a[0] < sum(values) / len(values) < a[1] < max(values)
    with pytest.raises(ValueError, match="--ci 'z'"):
        mean_interval(values, "z")


def test_paired_difference_by_hand():
    # d = (1, 2, 0.5): mean 7/6, s = 0.7637626, se = s/√3, t = √7; df = 2 has a closed-form CDF:
    # F(t) = 1/2 + t / (2·√(2 + t²)), so p = 1 − t/√(2 + t²) = 1 − √7/3; t(0.975, 2) = 4.302652729911275
    setting, reference = {1: 10.0, 2: 12.0, 3: 11.0, 9: 50.0}, {1: 9.0, 2: 10.0, 3: 10.5}
    paired = paired_difference(setting, reference)
    se = 0.7637626158259734 / math.sqrt(3)
    assert paired.n == 3, "only common seeds are paired"
    assert paired.mean == pytest.approx(7 / 6)
    assert paired.p_value == pytest.approx(1 - math.sqrt(7) / 3, abs=1e-9)
    assert paired.interval[0] == pytest.approx(7 / 6 - 4.302652729911275 * se, abs=1e-9)
    assert paired.interval[1] == pytest.approx(7 / 6 + 4.302652729911275 * se, abs=1e-9)
    assert not paired.significant, "p = 0.118: not significant at 5 %"
    strong = paired_difference({s: 80 + s * 0.01 for s in range(1, 11)}, {s: 70 + s * 0.02 for s in range(1, 11)})
    assert strong.significant and strong.mean == pytest.approx(10 - 0.055)
    assert paired_difference({1: 5.0}, {2: 5.0}) is None, "no common seed, no comparison"


def test_overlap():
    assert overlap((1, 3), (2, 4)) and overlap((1, 2), (2, 3)) and not overlap((1, 2), (2.5, 3))
    assert not overlap(None, (1, 2))


def test_seed_ranges_and_lists():
    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("1-3,8,10-11") == [1, 2, 3, 8, 10, 11]
    assert parse_seeds("7") == [7]
    for bad, msg in (("5-1", "runs backwards"), ("1-3,2", "given twice"), ("1,,2", "empty entry"), ("a-3", "not a seed")):
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)
