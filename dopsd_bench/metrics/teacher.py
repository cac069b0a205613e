"""Teacher diagnostics: does the in-context teacher (the model + a reference image) know what the student should?

D-OPSD's premise is that the teacher, given the target image, predicts better than the text-only student on the
student's own states. `teacher_student_divergence` measures the gap on held-out student trajectories: roll the
student out from the fixed noise under text only, and at every state compare the teacher's x0 prediction (with
the reference) to the student's (text only), as the D-OPSD x0 loss does, without gradients.
"""

from __future__ import annotations

import torch

from dopsd_bench import flow


def references_for(train_images: torch.Tensor, n: int) -> torch.Tensor:
    """One reference per evaluation prompt: the training images in order, cycled (new-context references)."""
    if train_images.shape[0] == 0:
        raise ValueError("the task has no training images to use as references")
    idx = torch.arange(n) % train_images.shape[0]
    return train_images[idx]


@torch.no_grad()
def teacher_student_divergence(backbone, prompts: list[str], seeds: list[int], references: torch.Tensor, *,
                               student: str | None, teacher: str | None, steps: int | None = None) -> torch.Tensor:
    """(B,) mean over the K roll-out states of the mean squared distance between teacher and student x0.

    `student` / `teacher` name the backbone adapters (None = no adapter, the untuned model). The student rolls
    out on the backbone's schedule with its sampling steps (`Backbone.step`), exactly as `Backbone.sample_latents`
    does.
    """
    if not (len(prompts) == len(seeds) == references.shape[0]):
        raise ValueError(f"expected one seed and one reference per prompt, got {len(prompts)} prompts, "
                         f"{len(seeds)} seeds, {references.shape[0]} references")
    text = backbone.encode_prompts(prompts)
    ctx = backbone.encode_teacher(prompts, references.to(backbone.device))
    sig = backbone.sigmas(steps or backbone.native_steps).to(backbone.device)
    x = backbone.noise(seeds)
    total = torch.zeros(len(prompts), dtype=torch.float64)
    for i in range(len(sig) - 1):
        s = sig[i].expand(x.shape[0])
        backbone.set_adapter(student)
        v = backbone.predict_velocity(x, s, text)
        x0_student = flow.x0_from_velocity(x, v, s)
        backbone.set_adapter(teacher)
        x0_teacher = backbone.predict_x0(x, s, ctx)
        total += (x0_teacher.double() - x0_student.double()).square().flatten(1).mean(1).cpu()
        x = backbone.step(x, v, sig[i], sig[i + 1], seeds)
    backbone.set_adapter(student)
    return total / (len(sig) - 1)
