"""The threshold's promise: a stated false-alarm rate that unseen healthy scores keep."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from models.calibration import (
    TailFit,
    fewest_photos,
    fit_tail,
    promise,
    promised_threshold,
    rate_interval,
    read_at,
    too_few_photos,
    unlike_the_rest,
)


def healthy_scores(count: int, seed: int) -> np.ndarray:
    """Scores shaped like image scores: the maximum of many patch distances (a Gumbel law)."""
    return np.random.default_rng(seed).gumbel(15.0, 0.8, count)


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_unseen_healthy_scores_exceed_the_threshold_at_the_promised_rate(rate):
    fit = fit_tail(healthy_scores(300, seed=1))
    unseen = healthy_scores(200_000, seed=2)
    observed = float((unseen > fit.threshold(rate)).mean())
    assert rate / 1.6 < observed < rate * 1.6


def test_a_normal_fit_would_break_the_promise_on_right_skewed_scores():
    """Why a tail law: median + 2.33 robust spreads leaves several times 1 % of maxima above it."""
    calibration, unseen = healthy_scores(300, seed=1), healthy_scores(200_000, seed=2)
    median = np.median(calibration)
    normal_threshold = median + NormalDist().inv_cdf(0.99) * 1.4826 * np.median(np.abs(calibration - median))
    assert (unseen > normal_threshold).mean() > 0.03
    assert fit_tail(calibration).threshold(0.01) > normal_threshold


def test_the_law_passes_through_the_lower_quartile_and_the_90th_percentile():
    scores = healthy_scores(101, seed=3)
    fit = fit_tail(scores)
    low, high = np.quantile(scores, [0.25, 0.9])
    assert fit.exceedance(high) == pytest.approx(0.1)
    assert fit.exceedance(low) == pytest.approx(0.75)
    assert fit.threshold(0.1) == pytest.approx(high)


def test_a_few_odd_photos_do_not_move_the_threshold():
    scores = healthy_scores(100, seed=4)
    odd = scores.copy()
    odd[np.argsort(odd)[-5:]] *= 3  # five defective parts among the healthy ones
    assert fit_tail(odd).threshold(0.01) == pytest.approx(fit_tail(scores).threshold(0.01))


def test_identical_scores_keep_a_scale_floor():
    fit = fit_tail(np.full(20, 7.0), scale_floor=0.1)
    assert fit.scale == 0.1 and fit.threshold(0.01) > 7.0


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="finite"):
        fit_tail(np.array([1.0, np.nan, 2.0]))


def test_the_interval_holds_the_rate_and_narrows_with_more_photos():
    few = rate_interval(healthy_scores(40, seed=5), 0.01)
    many = rate_interval(healthy_scores(1000, seed=5), 0.01)
    assert few[0] < 0.01 < few[1] and many[0] < 0.01 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 2


@pytest.mark.parametrize("count", [40, 320])
def test_the_95_percent_interval_holds_the_true_rate_about_95_times_in_100(count):
    """Over many healthy sets, the interval from each set holds the rate its threshold really has on
    the law the scores came from about as often as it claims (resampling the scores: 80-87 times)."""
    truth = TailFit(location=15.0, scale=0.8)  # healthy_scores' law
    held = 0
    for number in range(100):
        scores = healthy_scores(count, seed=100 + number)
        true_rate = truth.exceedance(promised_threshold(fit_tail(scores), count, 0.01))
        low, high = rate_interval(scores, 0.01, seed=number)
        held += low <= true_rate <= high
    assert held >= 89


@pytest.mark.parametrize(("count", "rate"), [(53, 0.01), (53, 0.05), (320, 0.01)])
def test_over_many_calibration_sets_the_threshold_flags_the_promised_rate_on_average(count, rate):
    """Read at the promised rate itself, a law fitted to 53 photos flags 1.5 % on average for a
    1 % promise; read where ``read_at`` says, it flags the promise."""
    truth = TailFit(location=15.0, scale=0.8)
    laws = [fit_tail(healthy_scores(count, seed=1000 + number)) for number in range(2000)]
    promised = np.mean([truth.exceedance(promised_threshold(law, count, rate)) for law in laws])
    assert rate * 0.93 < promised < rate * 1.07
    if count == 53:
        assert np.mean([truth.exceedance(law.threshold(rate)) for law in laws]) > rate * 1.15


def test_the_read_point_is_simulated_finely_enough_to_keep_the_promise_to_a_hundredth_of_itself():
    """Over 20,000 fresh calibration sets of 320 photos, thresholds read where ``read_at`` says flag 1 % of
    healthy parts to within 1 % of 1 % (read off ten times fewer simulated sets: 1.9 % over)."""
    truth = TailFit(location=0.0, scale=1.0)
    sets = np.random.default_rng(123).gumbel(0.0, 1.0, (20_000, 320))
    flagged = np.mean([truth.exceedance(promised_threshold(fit_tail(scores), 320, 0.01)) for scores in sets])
    assert 0.0099 < flagged < 0.0101


def test_a_set_too_small_for_the_rate_says_what_it_flags_on_average():
    exceedance, average = read_at(5, 0.01)
    assert exceedance == 0.001 and average > 0.02  # read at most 10 times further out, and honest about it
    assert read_at(320, 0.01)[1] == 0.01 and 0.009 < read_at(320, 0.01)[0] < 0.01


def test_the_interval_is_reproducible_with_its_seed():
    scores = healthy_scores(60, seed=6)
    assert rate_interval(scores, 0.05, seed=3) == rate_interval(scores, 0.05, seed=3)


@pytest.mark.parametrize(("count", "rate", "warned"), [(99, 0.01, True), (100, 0.01, False), (19, 0.05, True),
                                                       (20, 0.05, False)])
def test_too_few_photos_for_the_rate_are_said(count, rate, warned):
    warning = too_few_photos(count, rate)
    assert (warning is not None) == warned
    if warned:
        assert f"rests on {count} healthy photos" in warning


def test_a_planted_odd_photo_is_listed_and_a_healthy_set_lists_none():
    for seed in range(20):  # healthy sets list nothing (but for about 1 set in 500)
        scores = healthy_scores(200, seed=1000 + seed)
        assert unlike_the_rest(scores, fit_tail(scores)).size == 0, seed
    scores = healthy_scores(200, seed=7)
    scores[[17, 42]] = [scores.max() + 8, scores.max() + 12]  # two defective parts in the "healthy" folder
    assert unlike_the_rest(scores, fit_tail(scores)).tolist() == [42, 17]  # highest first


def test_the_promise_reads_in_the_lines_words():
    calibration = {"false_alarms_per_1000": 10.0, "interval_per_1000": [3.2, 21.0], "count": 120,
                   "method": "5-fold cross-fitting"}
    assert promise(calibration) == ("expect 10 false alarms per 1,000 healthy parts (95 % interval 3.2 to 21.0, "
                                    "from 120 healthy photos; 5-fold cross-fitting)")
    assert promise({"method": "held-out photos"}) == "calibrated by held-out photos"


def test_a_rate_is_promised_to_its_tenth():
    """A small set's average rate (say 14.6 per 1,000 for a 1 % promise) is said as it is, not rounded to 15."""
    calibration = {"false_alarms_per_1000": 14.6, "interval_per_1000": [0.8, 37.9], "count": 40,
                   "method": "5-fold cross-fitting"}
    said = promise(calibration)
    assert said.startswith("expect 14.6 false alarms per 1,000 healthy parts (95 % interval 0.8 to 37.9"), said


def test_the_interval_is_a_property_of_the_scores_not_of_its_seed():
    """Enough resamples that another seed moves the stated interval's ends by a fraction of themselves, not by
    half (40 photos: over ten seeds the low end spreads 23 % and the high end 17 % with 2,000 resamples)."""
    scores = healthy_scores(40, seed=5)
    ends = np.array([rate_interval(scores, 0.01, seed=seed) for seed in range(10)])
    spread = (ends.max(axis=0) - ends.min(axis=0)) / np.median(ends, axis=0)
    assert spread[0] < 0.35 and spread[1] < 0.25, spread


def test_a_photo_is_listed_exactly_when_a_healthy_set_of_its_size_shows_so_high_a_score_once_in_1000_sets():
    truth = TailFit(location=15.0, scale=0.8)  # healthy_scores' law
    scores = healthy_scores(200, seed=8)
    assert unlike_the_rest(scores, truth).size == 0
    # just rarer, just commoner than 1 set in 1000 (the cut of a set one photo larger lies at 200 / 201 = 0.995)
    for share, listed in [(0.997, True), (1.003, False)]:
        scores[0] = truth.threshold(share * 0.001 / scores.size)
        assert unlike_the_rest(scores, truth).tolist() == ([0] if listed else []), share


def test_too_few_photos_name_the_rate_and_the_whole_number_of_photos_it_needs():
    warning = too_few_photos(33, 0.03)  # 1 / 0.03 = 33.3 photos: 33 cannot see it once
    assert warning is not None and "fewer than the 34 a false-alarm rate of 0.03 needs" in warning
    assert too_few_photos(34, 0.03) is None


def test_the_interval_resamples_the_rule_as_it_is_applied_scale_floor_included():
    scores, floor = np.full(40, 7.0), 0.1  # identical healthy scores: the floor sets the spread
    reference = fit_tail(scores, floor)
    rng = np.random.default_rng(0)
    redrawn = [rng.gumbel(reference.location, reference.scale, 40) for _ in range(2000)]
    rates = [reference.exceedance(promised_threshold(fit_tail(sample, floor), 40, 0.01)) for sample in redrawn]
    low, high = rate_interval(scores, 0.01, floor)
    assert low == pytest.approx(np.quantile(rates, 0.025), rel=0.2)
    assert high == pytest.approx(np.quantile(rates, 0.975), rel=0.2)


def test_two_photos_already_give_an_interval_narrower_than_everything():
    low, high = rate_interval(np.array([14.0, 16.0]), 0.01)
    assert 0.0 < low < 0.01 < high < 1.0


@pytest.mark.parametrize("rate", [0.05, 0.01, 0.001])
def test_the_fewest_photos_are_the_first_count_whose_thresholds_keep_the_rate_on_average(rate):
    needed = fewest_photos(rate)
    assert read_at(needed, rate)[1] <= rate < read_at(needed - 1, rate)[1]
