"""The method's semantics in bridge.py, checked against the paper's equations (bridge.py's docstring) on velocity
fields whose answers are known in closed form — not only the perfect-x0 velocity `(x_t - x0) / t`, which recovers x0 from ANY x_t and
so cannot tell a wrong path, a wrong T0 or a wrong noise from the right ones.

  bridge   X_t = (1 - t) * ((1 - lam) * X0 + lam * Y) + t * eps,  lam = t / T0;  naive: (1 - t) * Y + t * eps
  loss     mean((x_t - t * v(x_t, t) - X0)^2)
  sampler  X_T0 = (1 - T0) Y + T0 eps; at each t of the linear grid T0 -> t_min: x0_hat = x - t v(x, t),
           eps_hat = (x - (1 - t)(1 - lam) x0_hat - (1 - t) lam Y) / t, X_next = bridge(x0_hat, Y, eps_hat, t_next)
"""

import pytest
import torch

import bridge


def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def linear_x0_velocity(c: torch.Tensor, beta: float, seen: list):
    """The velocity whose clean estimate is x0_hat = c + beta * x (a fixed wrong answer c when beta = 0): it
    records every (x, t) it is called with. With beta != 0 the recovered noise differs from the starting one."""

    def velocity(x, t):
        seen.append((x.clone(), t.clone()))
        return (x - (c + beta * x)) / per_sample(t, x)

    return velocity


def test_sampler_states_match_a_hand_computation():
    """T0 = 0.5, t_min = 0.1, 3 steps (t = 0.5, 0.3, 0.1); Y = 1, eps = 2, x0_hat = x / 2. By hand:
      t=0.5: x = 0.5*1 + 0.5*2 = 1.5,  x0_hat = 0.75, eps_hat = (1.5 - 0.5*1) / 0.5 = 2
      t=0.3 (lam 0.6): x = 0.7*(0.4*0.75 + 0.6*1) + 0.3*2 = 1.23,  x0_hat = 0.615,
            eps_hat = (1.23 - 0.7*0.4*0.615 - 0.7*0.6*1) / 0.3 = 2.126
      t=0.1 (lam 0.2): x = 0.9*(0.8*0.615 + 0.2*1) + 0.1*2.126 = 0.8354,  x0_hat = 0.4177 (returned)
    Re-forming at the current t gives 1.5 again at the second step; keeping the starting eps (2) gives 0.8228 at
    the third; returning x instead of x0_hat gives 0.8354."""
    seen = []
    y, eps = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    out = bridge.sample(linear_x0_velocity(torch.zeros_like(y), 0.5, seen), y, eps, t0=0.5, t_min=0.1, steps=3)
    assert [x.item() for x, _ in seen] == pytest.approx([1.5, 1.23, 0.8354], abs=1e-6)
    assert [t.item() for _, t in seen] == pytest.approx([0.5, 0.3, 0.1], abs=1e-7)
    assert out.item() == pytest.approx(0.4177, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.35])
def test_sampler_state_sequence_matches_the_written_recurrence(beta):
    """Every state the model sees over 7 steps, on per-sample random latents (far outside [-1, 1], so a clamp would
    show), against the recurrence written out in float64."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 5)
    y, eps, c = (torch.randn(shape, generator=g, dtype=torch.float64) * s for s in (1.0, 1.0, 3.0))
    t0, t_min, steps = 0.45, 0.02, 7
    seen = []
    out = bridge.sample(linear_x0_velocity(c, beta, seen), y, eps, t0=t0, t_min=t_min, steps=steps)

    times = [t0 + (t_min - t0) * i / (steps - 1) for i in range(steps)]
    x, expected = (1 - t0) * y + t0 * eps, []
    for i, t in enumerate(times):
        expected.append(x)
        x0_hat = c + beta * x
        if i == steps - 1:
            break
        lam = t / t0
        eps_hat = (x - (1 - t) * (1 - lam) * x0_hat - (1 - t) * lam * y) / t
        t_next = times[i + 1]
        x = (1 - t_next) * ((1 - t_next / t0) * x0_hat + (t_next / t0) * y) + t_next * eps_hat
    assert len(seen) == steps
    for i, ((got, t), want) in enumerate(zip(seen, expected)):
        assert t.tolist() == pytest.approx([times[i]] * 2, abs=1e-7), f"step {i}: time"
        assert (got - want).abs().max() <= 1e-5, f"step {i}: state"
    assert (out - x0_hat).abs().max() <= 1e-5
    if beta == 0:  # a fixed x0_hat: every state lies on the bridge of (c, Y, the starting eps)
        for (got, t), want_t in zip(seen, times):
            on_bridge = (1 - want_t) * ((1 - want_t / t0) * c + (want_t / t0) * y) + want_t * eps
            assert (got - on_bridge).abs().max() <= 1e-5


@pytest.mark.parametrize("path", ["bridge", "naive"])
def test_loss_sees_the_configured_path_and_measures_x0_through_the_velocity(path):
    """The x_t handed to the model is the bridge interpolant at the drawn t for this T0 (0.3, not the default 0.4
    and not 1), or the naive path; the loss is mean((x_t - t v - X0)^2) for a velocity that is not perfect."""
    g = torch.Generator().manual_seed(1)
    x0, y, eps = (torch.randn(3, 2, 4, 6, generator=g) for _ in range(3))
    t = torch.tensor([0.02, 0.17, 0.29])
    t0 = 0.3
    seen = []

    def velocity(x_t, tt):
        seen.append((x_t.clone(), tt.clone()))
        return 0.3 * x_t + 0.1

    value = bridge.loss(velocity, x0, y, eps, t, t0, path=path)
    tt = per_sample(t, x0)
    if path == "bridge":
        expected_x = (1 - tt) * ((1 - tt / t0) * x0 + (tt / t0) * y) + tt * eps
    else:
        expected_x = (1 - tt) * y + tt * eps
    (x_t, t_seen), = seen
    assert torch.equal(t_seen, t)
    assert (x_t - expected_x).abs().max() <= 1e-6
    expected_loss = (expected_x - tt * (0.3 * expected_x + 0.1) - x0).square().mean()
    assert value.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    other = (1 - tt) * y + tt * eps if path == "bridge" else (1 - tt) * ((1 - tt / t0) * x0 + (tt / t0) * y) + tt * eps
    assert (expected_x - other).abs().max() > 0.1  # the two paths really differ here


def test_draw_times_is_t_min_plus_range_times_u_to_the_power():
    for power in (1.0, 2.5):
        t = bridge.draw_times(64, 0.01, 0.3, torch.Generator().manual_seed(4), power=power)
        u = torch.rand(64, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(t, 0.01 + (0.3 - 0.01) * u**power, atol=1e-7)


def test_recover_noise_is_the_bridge_solved_for_eps():
    g = torch.Generator().manual_seed(5)
    x_t, x0_hat, y = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    t, t0 = torch.tensor([0.1, 0.25]), 0.35
    tt, lam = per_sample(t, x_t), per_sample(t, x_t) / t0
    expected = (x_t - (1 - tt) * (1 - lam) * x0_hat - (1 - tt) * lam * y) / tt
    assert torch.allclose(bridge.recover_noise(x_t, x0_hat, y, t, t0), expected, atol=1e-6)
