"""The interpolation kernel, its kink convention, schedule and initialisers."""

import math

import pytest
import torch

from delrec import delays


def kernel(d, w, length=12):
    return delays.triangle_kernel(torch.tensor([d], dtype=torch.float64), w, length)[0]


@pytest.mark.parametrize("d", [0.0, 0.3, 2.5, 4.0, 6.75])
def test_unit_width_kernel_splits_one_spike_between_two_lags(d):
    k = kernel(d, 1.0)
    assert k.sum().item() == pytest.approx(1.0)
    low = math.floor(1 + d)
    assert k[low].item() == pytest.approx(1 - (1 + d - low))
    assert torch.count_nonzero(k) <= 2


@pytest.mark.parametrize("d,w", [(3.0, 2.0), (4.2, 3.0), (5.5, 2.0)])
def test_integer_width_kernel_has_unit_mass_and_support_below_w(d, w):
    k = kernel(d, w, length=20)
    assert k.sum().item() == pytest.approx(1.0)
    lags = torch.arange(20, dtype=torch.float64)
    outside = (lags - (1 + d)).abs() >= w
    assert torch.all(k[outside] == 0) and torch.all(k[~outside] > 0)


def test_mass_falling_on_lag_zero_is_dropped_not_renormalised():
    # centre 1, half-width 2: lags 0, 1, 2 would get 1, 2, 1 (/4); lag 0 is dropped
    k = kernel(0.0, 2.0)
    assert k[:3].tolist() == pytest.approx([0.0, 0.5, 0.25])
    assert k.sum().item() == pytest.approx(0.75)


def test_sigma_zero_integer_delay_is_one_hot():
    for d in range(6):
        k = kernel(float(d), delays.spread_width(0.0))
        assert k.tolist() == [1.0 if lag == d + 1 else 0.0 for lag in range(12)]


def test_kink_convention_at_integer_centre():
    d = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    k = delays.triangle_kernel(d, 1.0, 4)[0]
    (g1,) = torch.autograd.grad(k[1], d, retain_graph=True)
    (g2,) = torch.autograd.grad(k[2], d)
    assert g1.item() == 0.0 and g2.item() == 1.0  # a delay clamped at 0 can still grow


def test_kernel_derivatives_match_finite_differences_away_from_kinks():
    d = torch.tensor([0.37, 3.61, 7.2], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([-0.4, 0.9, 0.1], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda d, p: delays.triangle_kernel(d, delays.spread_width(2.3, p), 16), (d, p)
    )


def test_kernel_length_covers_the_whole_support():
    assert delays.kernel_length(30.0, 11.0) == 43
    d = torch.tensor([3.4, 9.9], dtype=torch.float64)
    length = delays.kernel_length(9.9, 3.5)
    full = delays.triangle_kernel(d, 3.5, length + 10)
    assert torch.all(full[:, length:] == 0)


def test_spread_schedule_ends_near_006_whatever_the_epochs():
    for epochs in (10, 150):
        assert delays.spread_schedule(0, epochs) == 10.0
        assert delays.spread_schedule(epochs, epochs) == pytest.approx(10 * 0.95**100)
    assert 0.05 < delays.spread_schedule(1, 1) < 0.07
    for args, match in [
        ((0, 0), "epochs must be positive, got 0"),
        ((-1, 10), "epoch must be a number of epochs >= 0, got -1"),  # gave σ > σ0
        ((float("nan"), 10), "epoch must be .* got nan"),  # gave NaN
        ((0, 10, float("inf")), "sigma0 must be a finite spread >= 0, got inf"),
        ((0, 10, 10.0, 1.5), r"gamma must be in \(0, 1\], got 1.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            delays.spread_schedule(*args)


def test_initialisers():
    g = torch.Generator().manual_seed(0)
    u = delays.parse_init("uniform:10:30")((1000,), g)
    assert 10 <= u.min() and u.max() <= 30 and abs(u.mean().item() - 20) < 1
    h = delays.parse_init("half_normal:12")((10000,), g)
    assert h.min() >= 0 and abs(h.mean().item() - 12 * math.sqrt(2 / math.pi)) < 0.3
    assert torch.all(delays.parse_init(3)((5,), g) == 3)
    with pytest.raises(ValueError, match="uniform:LOW:HIGH"):
        delays.parse_init("gaussian:3")
    with pytest.raises(ValueError, match="arguments"):
        delays.parse_init("uniform:3")
    with pytest.raises(ValueError, match="low <= high"):
        delays.uniform(5, 1)


def test_integer_delays_round_and_clamp_without_gradient():
    d = torch.tensor([-0.3, 0.49, 2.5, 3.5, 7.51], requires_grad=True)
    r = delays.integer_delays(d)
    assert r.tolist() == [0.0, 0.0, 2.0, 4.0, 8.0] and not r.requires_grad
