"""Pure loss functions of the methods: tensors in, scalar (or updated tensors) out; closed-form tests in
tests/test_losses.py, as TRL does for GKD. The suite's flow convention (dopsd_bench/flow.py) holds throughout:
x0 = x_sigma - sigma * v, so for one state x0_s - x0_t = -sigma * (v_s - v_t) and
||x0_s - x0_t||^2 = sigma^2 ||v_s - v_t||^2: the x0 loss is the velocity loss weighted by sigma^2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the first dimension, in float32: (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).mean(dim=1)


def flow_matching_loss(v_pred: torch.Tensor, v_target: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted flow-matching loss as diffusers' SD3/FLUX training scripts compute it:
    mean_i [ w_i * mean_elems (v_pred_i - v_target_i)^2 ]; weights (B,) default to 1."""
    per = per_sample_mse(v_pred, v_target)
    if weights is not None:
        per = per * weights.to(per).reshape(-1)
    return per.mean()


def x0_distillation_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """MSE between student and (detached) teacher clean-image predictions, averaged over every element
    (F.mse_loss(x0_student, x0_teacher) of the released train_dopsd.py)."""
    return per_sample_mse(x0_student, x0_teacher.detach()).mean()


def velocity_distillation_loss(v_student: torch.Tensor, v_teacher: torch.Tensor,
                               sigma: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between student and (detached) teacher velocities (the paper's equation). With `sigma` (B,), each
    sample is weighted by sigma^2, which equals `x0_distillation_loss` on the same predictions."""
    weights = None if sigma is None else sigma.float().reshape(-1) ** 2
    return flow_matching_loss(v_student, v_teacher.detach(), weights)


def prior_preservation_loss(instance_loss: torch.Tensor, prior_loss: torch.Tensor,
                            prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's objective: loss on the instance images plus the weighted loss on the class (prior) images."""
    return instance_loss + prior_loss_weight * prior_loss


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], decay: float) -> None:
    """In place: target <- decay * target + (1 - decay) * source (ema_update_lora_adapter of the released
    ema_utils.py). decay = 1 keeps the target, decay = 0 copies the source."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    target, source = list(target), list(source)
    if len(target) != len(source):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target)} targets and {len(source)} sources")
    # one fused call per op over all tensors (many small LoRA or DiT tensors: per-tensor calls are launch-bound)
    torch._foreach_mul_(target, decay)
    torch._foreach_add_(target, [s.to(t.dtype) for t, s in zip(target, source)], alpha=1.0 - decay)


def ema_source_weight(decay: float, steps: int) -> float:
    """How much of the EMA teacher comes from the student after `steps` updates: 1 - decay^steps (the rest is
    the initial weights). E.g. decay 0.9999 over 200 steps gives 0.02: the teacher is ~the initial model."""
    return 1.0 - decay**steps
