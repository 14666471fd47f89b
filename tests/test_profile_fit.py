"""alpha/beta fitting: exact on clean data, robust to the noise of a loaded machine."""

from __future__ import annotations

import pytest

from topocoll.topology.profile import ProfileError, fit_alpha_beta

SIZES = [1 << k for k in range(10, 25)]


@pytest.mark.parametrize("alpha,beta", [(5.0, 1e-3), (1000.0, 8e-3), (0.0, 2.5e-4)])
def test_recovers_a_clean_line(alpha: float, beta: float) -> None:
    fit = fit_alpha_beta([(b, alpha + beta * b) for b in SIZES])
    assert fit.beta_us_per_byte == pytest.approx(beta, rel=1e-9)
    assert fit.alpha_us == pytest.approx(alpha, rel=1e-6, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0)


def test_one_stalled_sample_does_not_tilt_the_slope() -> None:
    alpha, beta = 50.0, 1e-3
    points = [(b, alpha + beta * b) for b in SIZES]
    points[-3] = (points[-3][0], points[-3][1] * 3)  # a stall at a large size
    points[1] = (points[1][0], points[1][1] * 40)  # a millisecond hiccup at a small one
    fit = fit_alpha_beta(points)
    assert fit.beta_us_per_byte == pytest.approx(beta, rel=0.05)
    assert fit.alpha_us == pytest.approx(alpha, rel=0.5)


def test_latency_only_data_still_gives_a_link_that_costs_something() -> None:
    fit = fit_alpha_beta([(b, 900.0 - (b % 7)) for b in SIZES[:4]])
    assert fit.beta_us_per_byte > 0 and fit.alpha_us > 0


@pytest.mark.parametrize("points", [[], [(1024, 5.0)], [(1024, 5.0), (1024, 6.0)]])
def test_too_little_data_is_a_clear_error(points) -> None:
    with pytest.raises(ProfileError, match="alpha/beta"):
        fit_alpha_beta(points)
