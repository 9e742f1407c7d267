"""The degraded-to-clean diffusion bridge: training samples, the loss, and the restoration sampler.

The paper's observation: a pre-trained flow model already maps noisy latents to clean ones. Restoration needs a
path that starts from the *degraded* latent instead of pure noise. With

    X0  the clean latent,  Y  the degraded latent,  eps ~ N(0, I),  T0 in (0, 1],  lam = t / T0,

the bridge (the authors call it EBR) interpolates clean -> degraded while the usual flow noise grows:

    X_t = (1 - t) * ((1 - lam) * X0 + lam * Y) + t * eps,        t in [0, T0]

    t = 0  : X0                          (clean)
    t = T0 : (1 - T0) * Y + T0 * eps     (the degraded latent, noised to level T0)

The frozen model keeps its own parameterisation: it predicts a velocity v at (x_t, t), and the clean estimate is
x0_hat = x_t - t * v (exact for the plain flow x_t = (1 - t) x0 + t eps with v = eps - x0). Only prompt
parameters are trained, by matching x0_hat to X0 on bridge samples. The sampler walks the bridge from T0 down to
t_min, re-forming X_t from its current clean estimate and the noise that estimate implies (DDIM-style,
deterministic once the starting noise is drawn).

Everything here is pure tensor code. A model enters only as a velocity function `velocity(x_t, t) -> v` with
x_t [B, ...] (any latent shape: [B, C, H, W] images, [B, C, F, H, W] videos) and t [B].
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import defaults

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """t [B] -> [B, 1, ..., 1] so that it broadcasts against a latent batch `like` [B, ...]."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------- paths


def interpolant(x0: Tensor, y: Tensor, eps: Tensor, t: Tensor, t0: float) -> Tensor:
    """The bridge sample X_t = (1 - t) * ((1 - t/T0) * X0 + (t/T0) * Y) + t * eps. t [B]; x0, y, eps [B, ...]."""
    t = _per_sample(t, x0)
    lam = t / t0
    return (1 - t) * ((1 - lam) * x0 + lam * y) + t * eps


def naive_interpolant(y: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The "naive" path for comparison: the model's own forward process run from the DEGRADED latent,
    x_t = (1 - t) * Y + t * eps, still trained to recover X0. Its inputs never resemble clean-image inputs."""
    t = _per_sample(t, y)
    return (1 - t) * y + t * eps


def predict_x0(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Clean estimate through the flow model's parameterisation: x0_hat = x_t - t * v."""
    return x_t - _per_sample(t, x_t) * v


def recover_noise(x_t: Tensor, x0_hat: Tensor, y: Tensor, t: Tensor, t0: float) -> Tensor:
    """The noise that makes `interpolant(x0_hat, y, eps, t, t0)` equal x_t (the bridge equation solved for eps)."""
    t = _per_sample(t, x_t)
    lam = t / t0
    return (x_t - (1 - t) * (1 - lam) * x0_hat - (1 - t) * lam * y) / t


# ---------------------------------------------------------------------------------------------- training


def draw_times(
    batch: int, t_min: float, t0: float, generator: torch.Generator | None = None, power: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times t = t_min + (T0 - t_min) * u**power, u ~ U[0, 1): [B].

    power = 1 is uniform on [t_min, T0]; power > 1 puts more samples near t_min (fine detail), power < 1 near T0.
    """
    u = torch.rand(batch, generator=generator, device=device)
    return t_min + (t0 - t_min) * u**power


def loss(
    velocity: VelocityFn, x0: Tensor, y: Tensor, eps: Tensor, t: Tensor, t0: float, path: str = "bridge"
) -> Tensor:
    """x0-matching loss mean((x_t - t * v(x_t, t) - X0)^2) on bridge samples (or naive-path samples).

    x0, y, eps: [B, ...] clean latent, degraded latent, noise; t [B] from `draw_times`. The randomness is passed
    in rather than drawn here, so the same step can be replayed exactly (compiled vs eager, one vs many ranks).
    """
    if path == "bridge":
        x_t = interpolant(x0, y, eps, t, t0)
    elif path == "naive":
        x_t = naive_interpolant(y, eps, t)
    else:
        raise ValueError(f"path must be 'bridge' or 'naive', got {path!r}")
    x0_hat = predict_x0(x_t, t, velocity(x_t, t))
    return (x0_hat - x0).square().mean()


# ---------------------------------------------------------------------------------------------- sampling


def time_grid(t0: float, t_min: float, steps: int) -> Tensor:
    """The sampler's times: `steps` values spaced linearly from T0 down to t_min (one model call each)."""
    if steps < 1 or not 0 < t_min <= t0 <= 1:
        raise ValueError(f"need steps >= 1 and 0 < t_min <= T0 <= 1, got steps={steps}, t_min={t_min}, T0={t0}")
    return torch.linspace(t0, t_min, steps, dtype=torch.float64)


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    y: Tensor,
    eps: Tensor,
    t0: float = defaults.T0,
    t_min: float = defaults.T_MIN,
    steps: int = defaults.STEPS,
    clamp: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Restore the degraded latent y [B, ...] by walking the bridge from T0 to t_min. Returns x0_hat [B, ...].

    eps [B, ...] is the starting noise: X_T0 = (1 - T0) * Y + T0 * eps. At every time t of `time_grid`:
    x0_hat = x - t * v(x, t); then, unless t is the last time, the noise implied by (x, x0_hat) is recovered and
    X_t is re-formed at the next time from (x0_hat, Y, eps_hat). The final clean estimate (at t_min) is returned.
    `clamp` optionally clips x0_hat to [-clamp, clamp] at each step (off by default: the authors' released
    inference does not clip latents). `on_step(i, steps)` is called after each model evaluation (progress).
    """
    times = time_grid(t0, t_min, steps).tolist()
    x = (1 - t0) * y + t0 * eps  # X_T0
    for i, t in enumerate(times):
        t_batch = torch.full((y.shape[0],), t, device=y.device, dtype=torch.float32)
        x0_hat = predict_x0(x, t_batch, velocity(x, t_batch))
        if clamp is not None:
            x0_hat = x0_hat.clamp(-clamp, clamp)
        if on_step is not None:
            on_step(i + 1, steps)
        if i == steps - 1:
            return x0_hat
        eps_hat = recover_noise(x, x0_hat, y, t_batch, t0)
        x = interpolant(x0_hat, y, eps_hat, torch.full_like(t_batch, times[i + 1]), t0)
    raise AssertionError("unreachable: time_grid has at least one time")


def average_velocity(velocities: Sequence[VelocityFn]) -> VelocityFn:
    """Mixed or unseen degradations: one velocity function averaging several prompts' velocities at every step."""
    if not velocities:
        raise ValueError("need at least one velocity function to average")

    def averaged(x_t: Tensor, t: Tensor) -> Tensor:
        return torch.stack([velocity(x_t, t) for velocity in velocities]).mean(dim=0)

    return averaged
