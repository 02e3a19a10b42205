"""From held-out healthy scores to a threshold that keeps a stated false-alarm rate.

An image score is the highest point of a map over hundreds of patches, so healthy scores follow an
extreme-value law: right-skewed, with a longer upper tail than a normal curve. The healthy scores
are fitted with a Gumbel distribution (the law of maxima) through two robust points, their lower
quartile and their 90th percentile. Both points lie in the body of the data, so the fit is stable
with a few dozen photos, extrapolates the tail as maxima do, and odd photos (up to a tenth of the
set) cannot move it.

The threshold is read off that law a little beyond the promised rate (``read_at``): a law fitted to
n photos misplaces its tail both ways, and a threshold placed too low lets through more than one
placed as much too high holds back, so read at the rate itself the threshold would flag 1.5 % of
healthy parts on average for a 1 % promise from 53 photos (1.08 % from 320). Read where it flags
the promised rate on average over calibration sets of that size, as a conformal threshold does.
``docs/calibration.md`` compares this rule with others on held-out training photos
(``scripts/check_calibration.py``).

This module needs NumPy alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

FIT_QUANTILES = (0.25, 0.9)  # the two healthy-score quantiles the Gumbel fit passes through
SCREEN_FALSE_LISTING = 0.001  # chance that a set of healthy photos has any photo listed as unlike the rest
BOOTSTRAP_RESAMPLES = 2000
SETS_AT_ONCE = 250  # simulated sets drawn at a time: a model grown by years of updates stays within memory
INTERVAL_CONFIDENCE = 0.95
CORRECTION_SETS = 4000  # simulated calibration sets behind read_at (its average rate to about 0.5 %)
MOST_CORRECTION = 10  # read_at never reads beyond false_alarm_rate / 10: a tiny set gets a warning instead


def _gumbel_reduced(probability: float) -> float:
    """The standard Gumbel quantile: -ln(-ln p)."""
    return -math.log(-math.log(probability))


@dataclass(frozen=True)
class TailFit:
    """A Gumbel law of healthy scores: P(score <= s) = exp(-exp(-(s - location) / scale))."""

    location: float
    scale: float

    def threshold(self, false_alarm_rate: float) -> float:
        """The score a healthy photo exceeds with probability ``false_alarm_rate``."""
        return self.location + self.scale * _gumbel_reduced(1.0 - false_alarm_rate)

    def exceedance(self, score: float | np.ndarray) -> float | np.ndarray:
        """The share of healthy photos that score above ``score`` under this law."""
        return -np.expm1(-np.exp(-(np.asarray(score, dtype=np.float64) - self.location) / self.scale))


def _law_through(at_low: Any, at_high: Any, scale_floor: float) -> TailFit:
    """The Gumbel law whose FIT_QUANTILES are ``at_low`` and ``at_high`` (numbers, or arrays of them for
    many resamples at once), its scale at least ``scale_floor``."""
    low_z, high_z = (_gumbel_reduced(p) for p in FIT_QUANTILES)
    scale = np.maximum((at_high - at_low) / (high_z - low_z), max(scale_floor, 1e-12))
    return TailFit(location=at_low - scale * low_z, scale=scale)


def fit_tail(scores: np.ndarray, scale_floor: float = 0.0) -> TailFit:
    """The Gumbel law through the scores' lower quartile and 90th percentile, its scale at least ``scale_floor``."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("calibration needs at least one finite healthy score")
    law = _law_through(*np.quantile(values, FIT_QUANTILES), scale_floor)
    return TailFit(location=float(law.location), scale=float(law.scale))


def _standard_quantiles(count: int, sets: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The FIT_QUANTILES of ``sets`` simulated sets of ``count`` standard Gumbel scores (an array
    each), ``SETS_AT_ONCE`` sets at a time so memory stays bounded.

    The rule is location-scale equivariant: a set drawn from any Gumbel law is a standard set moved
    and stretched, and so are its quantiles, so standard sets serve every law."""
    generator = np.random.default_rng(seed)
    for start in range(0, sets, SETS_AT_ONCE):
        sample = generator.gumbel(0.0, 1.0, (min(SETS_AT_ONCE, sets - start), count))
        at_low, at_high = np.quantile(sample, FIT_QUANTILES, axis=1)
        yield at_low, at_high


_STANDARD = TailFit(location=0.0, scale=1.0)


@functools.lru_cache(maxsize=256)
def read_at(count: int, false_alarm_rate: float) -> tuple[float, float]:
    """Where to read the law fitted to ``count`` healthy scores, and the rate that gives on average.

    Returns (the law's exceedance to place the threshold at, the false-alarm rate such thresholds
    have on average over calibration sets of ``count`` photos). The second is ``false_alarm_rate``
    unless the set is too small to keep it reading at most ``MOST_CORRECTION`` times further out.
    Depends on the count and the rate alone (``_standard_quantiles``), so it is worked out once.
    """
    at_low, at_high = (np.concatenate(points) for points in zip(*_standard_quantiles(count, CORRECTION_SETS, 0)))
    laws = _law_through(at_low, at_high, 0.0)

    def average_rate(exceedance: float) -> float:
        return float(np.mean(_STANDARD.exceedance(laws.threshold(exceedance))))

    low, high = false_alarm_rate / MOST_CORRECTION, false_alarm_rate
    if (farthest := average_rate(low)) >= false_alarm_rate:
        return low, farthest
    for _ in range(40):  # the average rate rises with the exceedance: bisect (on a log scale)
        middle = math.sqrt(low * high)
        low, high = (middle, high) if average_rate(middle) <= false_alarm_rate else (low, middle)
    return low, false_alarm_rate


@functools.lru_cache(maxsize=64)
def fewest_photos(false_alarm_rate: float) -> int:
    """The fewest healthy photos whose threshold flags ``false_alarm_rate`` on average (``read_at``): from
    fewer, no reading of the fitted law keeps the rate, and a threshold set from them flags far more."""
    enough = 2
    while read_at(enough, false_alarm_rate)[1] > false_alarm_rate:
        enough *= 2
    short = enough // 2  # too few, or 1
    while enough - short > 1:  # the average rate falls as photos are added: bisect
        middle = (short + enough) // 2
        short, enough = (short, middle) if read_at(middle, false_alarm_rate)[1] <= false_alarm_rate else (middle, enough)
    return enough


def promised_threshold(law: TailFit, count: int, false_alarm_rate: float) -> float:
    """The threshold a law fitted to ``count`` healthy scores gives ``false_alarm_rate`` (``read_at``)."""
    return law.threshold(read_at(count, false_alarm_rate)[0])


def rate_interval(
    scores: np.ndarray, false_alarm_rate: float, scale_floor: float = 0.0, seed: int = 0
) -> tuple[float, float]:
    """A 95 % interval for the false-alarm rate the threshold really has, from how many photos set it.

    A parametric bootstrap: ``BOOTSTRAP_RESAMPLES`` healthy sets of the same size are drawn from
    the fitted law, each set's threshold is placed by the same rule, and its false-alarm rate is read
    off the fitted law. Resampling the scores themselves instead holds the true rate only 80-87 % of
    the time on Gumbel scores (40-320 photos): a quantile of a resample can take only the few values
    near it. Few photos move the fit's two quantiles a lot, so the interval is wide.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size < 2:
        return 0.0, 1.0
    reference = fit_tail(values, scale_floor)
    exceedance = read_at(values.size, false_alarm_rate)[0]
    rates = []
    for at_low, at_high in _standard_quantiles(values.size, BOOTSTRAP_RESAMPLES, seed):
        refitted = _law_through(
            reference.location + reference.scale * at_low, reference.location + reference.scale * at_high, scale_floor
        )
        rates.append(reference.exceedance(refitted.threshold(exceedance)))
    tail = (1 - INTERVAL_CONFIDENCE) / 2
    low, high = np.quantile(np.concatenate(rates), [tail, 1 - tail])
    return float(low), float(high)


def unlike_the_rest(scores: np.ndarray, fit: TailFit) -> np.ndarray:
    """Indices of scores so high that a set of this many healthy photos would show one only
    ``SCREEN_FALSE_LISTING`` of the time: photos to look at before trusting the set, highest first."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return np.empty(0, dtype=int)
    cut = fit.threshold(SCREEN_FALSE_LISTING / values.size)
    listed = np.flatnonzero(values > cut)
    return listed[np.argsort(-values[listed])]


def too_few_photos(count: int, false_alarm_rate: float) -> str | None:
    """Why ``count`` calibration photos cannot pin a rate this small, or None when they can."""
    needed = math.ceil(1.0 / false_alarm_rate)
    if count >= needed:
        return None
    return (
        f"the threshold rests on {count} healthy photos, fewer than the {needed} a false-alarm rate of "
        f"{false_alarm_rate:g} needs to be seen once: it is extrapolated beyond the highest healthy score, "
        "so the rate on the line may differ; fit on more photos (or set a larger false_alarm_rate)"
    )


def promise(calibration: dict[str, Any]) -> str:
    """The threshold's promise in the line's words, from a model's calibration record; models
    calibrated without a stated rate say only where their healthy scores came from."""
    if "false_alarms_per_1000" not in calibration:
        return f"calibrated by {calibration.get('method', 'an unknown method')}"
    low, high = calibration["interval_per_1000"]
    return (
        f"expect {calibration['false_alarms_per_1000']:g} false alarms per 1,000 healthy parts "
        f"(95 % interval {low:.1f} to {high:.1f}, from {calibration['count']} healthy photos; "
        f"{calibration['method']})"
    )
