"""The suite's single flow-matching convention; every backbone adapter translates to and from it.

sigma in [0, 1], 1 = pure noise;  x_sigma = (1 - sigma) * x0 + sigma * eps;  v = eps - x0;  x0 = x_sigma - sigma * v.
"""

import torch


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(like.shape[0])
    return sigma.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def x0_from_velocity(x_sigma: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_sigma - _expand(sigma, x_sigma) * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return x + (_expand(sigma_next, x) - _expand(sigma, x)) * v
