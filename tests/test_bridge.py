import pytest
import torch

import bridge


def latents(shape=(3, 4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def test_interpolant_end_points_are_exact():
    x0, y, eps = latents()
    t0 = 0.4
    at_t0 = bridge.interpolant(x0, y, eps, torch.full((3,), t0), t0)
    assert torch.equal(at_t0, (1 - t0) * y + t0 * eps)
    assert torch.equal(bridge.interpolant(x0, y, eps, torch.zeros(3), t0), x0)


def test_interpolant_is_linear_mix_of_paths_per_sample():
    x0, y, eps = latents()
    t = torch.tensor([0.05, 0.2, 0.35])
    x_t = bridge.interpolant(x0, y, eps, t, 0.4)
    for i, ti in enumerate(t.tolist()):
        lam = ti / 0.4
        expected = (1 - ti) * ((1 - lam) * x0[i] + lam * y[i]) + ti * eps[i]
        assert torch.allclose(x_t[i], expected, atol=1e-6)


def test_recover_noise_inverts_the_interpolant():
    x0, y, eps = latents()
    t = torch.tensor([0.01, 0.2, 0.4])
    x_t = bridge.interpolant(x0, y, eps, t, 0.4)
    assert torch.allclose(bridge.recover_noise(x_t, x0, y, t, 0.4), eps, atol=1e-4)


def perfect_velocity(x0):
    """The velocity that makes x0_hat = x_t - t v equal the true clean latent at every (x_t, t)."""
    return lambda x_t, t: (x_t - x0) / t.reshape(-1, *([1] * (x_t.ndim - 1)))


@pytest.mark.parametrize("path", ["bridge", "naive"])
def test_perfect_velocity_has_zero_loss(path):
    x0, y, eps = latents()
    t = bridge.draw_times(3, 1e-4, 0.4, torch.Generator().manual_seed(1))
    value = bridge.loss(perfect_velocity(x0), x0, y, eps, t, 0.4, path=path)
    assert value < 1e-10


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_sampler_with_perfect_velocity_returns_x0(steps):
    x0, y, eps = latents(shape=(2, 16, 3, 4, 6))  # a video-shaped latent: the bridge is shape-agnostic
    out = bridge.sample(perfect_velocity(x0), y, eps, t0=0.4, t_min=1e-4, steps=steps)
    assert (out - x0).abs().max() <= 1e-5


def test_sampler_walks_the_linear_grid_and_reports_progress():
    x0, y, eps = latents()
    seen_t, progress = [], []

    def velocity(x_t, t):
        seen_t.append(t[0].item())
        return torch.zeros_like(x_t)

    bridge.sample(velocity, y, eps, t0=0.4, t_min=1e-4, steps=5, on_step=lambda i, n: progress.append((i, n)))
    assert seen_t == pytest.approx(torch.linspace(0.4, 1e-4, 5).tolist(), abs=1e-7)
    assert progress == [(i, 5) for i in range(1, 6)]


def test_sampler_starts_from_noised_degraded_latent():
    _, y, eps = latents()
    first = []
    bridge.sample(lambda x, t: first.append(x.clone()) or torch.zeros_like(x), y, eps, t0=0.3, steps=1)
    assert torch.allclose(first[0], 0.7 * y + 0.3 * eps)


def test_average_of_identical_velocities_equals_one():
    x0, y, eps = latents()
    v = lambda x_t, t: torch.sin(x_t) * t.reshape(-1, 1, 1, 1)  # noqa: E731
    one = bridge.sample(v, y, eps, steps=6)
    averaged = bridge.sample(bridge.average_velocity([v, v, v]), y, eps, steps=6)
    assert torch.allclose(one, averaged, atol=1e-6)
    pair = bridge.sample(bridge.average_velocity([v, v]), y, eps, steps=6)
    assert torch.equal(one, pair)  # (v + v) / 2 is exact in floating point


def test_average_velocity_is_the_mean():
    x = torch.randn(2, 3)
    t = torch.ones(2)
    avg = bridge.average_velocity([lambda x, t: x, lambda x, t: 3 * x])
    assert torch.allclose(avg(x, t), 2 * x)


def test_draw_times_range_and_skew():
    g = torch.Generator().manual_seed(0)
    t = bridge.draw_times(10_000, 1e-4, 0.4, g)
    assert t.min() >= 1e-4 and t.max() <= 0.4
    assert abs(t.mean().item() - 0.2) < 0.01
    skewed = bridge.draw_times(10_000, 1e-4, 0.4, g, power=2.0)
    assert skewed.mean() < t.mean() - 0.05  # power > 1 moves mass toward t_min


def test_bad_arguments_are_refused():
    x0, y, eps = latents()
    with pytest.raises(ValueError, match="path must be"):
        bridge.loss(perfect_velocity(x0), x0, y, eps, torch.full((3,), 0.1), 0.4, path="straight")
    with pytest.raises(ValueError, match="t_min <= T0"):
        bridge.sample(perfect_velocity(x0), y, eps, t0=0.4, t_min=0.5)
