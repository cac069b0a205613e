"""What each metric of the scoring protocol is (name, description, direction, per sample or not), registered in
METRICS. Free of torch, so `dopsd-bench list metrics` reads it without loading the scoring code (evaluate.py)."""

from __future__ import annotations

from dataclasses import dataclass

from dopsd_bench.registry import METRICS

__all__ = ["METRIC_INFO", "MetricInfo"]


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    higher_is_better: bool
    per_sample: bool


METRIC_INFO = {m.name: m for m in [
    MetricInfo("fidelity", "concept/style fidelity: judge probability of the target glyph/style (world) or DINO "
               "similarity to the references (real images)", True, True),
    MetricInfo("fidelity_oracle", "the same fidelity measured on the training images themselves (the real-image "
               "oracle; world: judge probability, real images: leave-one-out similarity)", True, True),
    *[MetricInfo(f"fidelity_{name}", f"mean cosine to the references in {what} features (DreamBench's "
                 f"{bench}, averaged over the generated x reference matrix)", True, True)
      for name, what, bench in [("judge", "the world judge's", "DINO analogue"), ("dino", "DINOv2", "DINO"),
                                ("clip_i", "CLIP image", "CLIP-I")]],
    *[MetricInfo(f"fidelity_{name}_oracle", f"fidelity_{name} of each reference against the other references "
                 "(the real-image oracle)", True, True) for name in ("judge", "dino", "clip_i")],
    MetricInfo("alignment", "prompt alignment: fraction of the prompt's other attributes the judge finds (world, "
               "GenEval analogue) or CLIP-T with the token removed (real images)", True, True),
    MetricInfo("retention_fd", "Fréchet distance of native-step samples on retention prompts to true renders "
               "(world) or to untuned samples on other seeds (real images)", False, False),
    MetricInfo("retention_fd_untuned", "retention_fd of the untuned model on the same prompts and seeds", False,
               False),
    MetricInfo("retention_fd_ratio", "retention_fd / retention_fd_untuned (1 = quality kept)", False, False),
    MetricInfo("retention_kid", "kernel inception distance (unbiased at small N) on the same sets as retention_fd",
               False, False),
    MetricInfo("retention_kid_untuned", "retention_kid of the untuned model", False, False),
    MetricInfo("retention_alignment", "alignment of native-step samples on retention prompts (all attributes)",
               True, True),
    MetricInfo("retention_alignment_untuned", "retention_alignment of the untuned model, same prompts and seeds",
               True, True),
    MetricInfo("retention_leakage", "how much more the new concept/fill appears on retention prompts that never "
               "ask for it, per sample tuned minus untuned (same prompt and seed; 0 = none, the untuned model is 0): "
               "judge probability of the task's held-out glyph/style (world; `rate`/`rate_untuned`: argmax share) "
               "or similarity to the training images (real images)", False, True),
    MetricInfo("retention_attributes", "per-attribute accuracy of native-step retention samples (world): entries "
               "'shape', 'colour', 'size', 'position', 'style', 'background' and their '<attr>_untuned' twins, 1 per "
               "sample where the judge finds the stated value", True, True),
    MetricInfo("few_step_gap_ratio", "few-step capacity: (FD at native steps / FD at the step curve's largest "
               "count) of the tuned model over the same of the untuned model; 1 = kept, > 1 = the native steps lost "
               "more than many steps (a change that scales every step count alike cancels)", False, False),
    MetricInfo("retention_sharpness", "high-frequency energy (mean squared Laplacian) of native-step retention "
               "samples over the untuned model's mean; 1 = as sharp, < 1 = blurrier (> 1 can be noise)", True, True),
    # an optional second feature space (DOPSD_BENCH_EXTRA_FD=effnet_lite0, metrics/imagenet.py): ImageNet
    # EfficientNet-Lite0 pooled features, which owe nothing to the world judge
    *[MetricInfo(f"{name}_effnet_lite0{suffix}", f"{name}{suffix} in ImageNet EfficientNet-Lite0 features (optional: "
                 "DOPSD_BENCH_EXTRA_FD=effnet_lite0)", False, False)
      for name in ("retention_fd", "retention_fd_ratio", "retention_kid") for suffix in ("", "_untuned")
      if name != "retention_fd_ratio" or not suffix],
    MetricInfo("step_curve", "retention FD, FD ratio and alignment at 1, 2, 4, 8 steps (entries 'fd@K', "
               "'fd_untuned@K', 'fd_ratio@K', 'alignment@K', 'alignment_untuned@K')", False, False),
    MetricInfo("diversity", "mean pairwise embedding distance (1 - cosine) among samples of the same prompt, or "
               "among all evaluation samples when prompts are not repeated", True, True),
    MetricInfo("copying", "cosine similarity of each sample to its nearest training image", False, True),
    MetricInfo("teacher_fidelity_before", "fidelity of the untuned in-context teacher (prompt + a training image "
               "as reference)", True, True),
    MetricInfo("teacher_fidelity_after", "fidelity of the tuned in-context teacher (the method's teacher adapter, "
               "else its tuned adapter)", True, True),
    MetricInfo("teacher_student_divergence", "mean squared distance between teacher (with reference) and student "
               "(text only) x0 predictions on the tuned student's own roll-outs of evaluation prompts", False, True),
    MetricInfo("teacher_student_divergence_untuned", "teacher_student_divergence of the untuned model", False, True),
]}


for _info in METRIC_INFO.values():
    METRICS.register(_info.name, description=_info.description)(_info)
