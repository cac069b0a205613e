"""The scoring protocol: one tuned model on one task -> result.json `metrics` (see docs/metrics.md).

Every method is sampled on the task's fixed evaluation and retention seeds. The untuned model's outputs (samples
at every step count, the in-context teacher's samples, the untuned teacher-student divergence) are cached on disk
by `SampleCache` and shared by all methods and runs on the same backbone, prompts, seeds and steps.

    from dopsd_bench.metrics.evaluate import evaluate, features_for_task
    metrics = evaluate(backbone, task, method, features=features_for_task(task), cache_dir="runs/.cache")

evaluate() samples everything once (`sample_everything` -> `Sampled`: the image sets, their features on first use,
the prompts through the task), then computes each registered metric over it (`compute_metrics`; the metrics and
how to add one: dopsd_bench/metrics/info.py, docs/metrics.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from dopsd_bench.errors import require_finite
from dopsd_bench.metrics import scores
from dopsd_bench.metrics.cache import SampleCache
from dopsd_bench.metrics.features import FeatureExtractor, ImageFeatures, features_for_task
from dopsd_bench.metrics.frechet import frechet_distance, kernel_distance
from dopsd_bench.metrics.info import METRIC_INFO, MetricSpec, metric_specs
from dopsd_bench.metrics.teacher import references_for, teacher_student_divergence
from dopsd_bench.taskdata import TaskData

__all__ = ["METRIC_INFO", "MetricSpec", "Sampled", "compute_metrics", "evaluate", "features_for_task",
           "prepare_untuned", "sample_everything"]

STEP_CURVE = (1, 2, 4, 8)
RECONSTRUCTION_SEED = 50_000  # the teacher's reconstructions of the training images (reconstruction_prompts)
REFERENCE_SEED_OFFSET = 1_000_000  # folder tasks: FD reference = untuned samples on these shifted seeds


def _in_batches(fn: Callable, prompts: list[str], seeds: list[int], references: torch.Tensor | None,
                batch_size: int | None) -> torch.Tensor:
    n = len(prompts)
    if len(seeds) != n:
        raise ValueError(f"expected one seed per prompt, got {len(seeds)} seeds for {n} prompts")
    bs = batch_size or n
    outs = [fn(prompts[i:i + bs], seeds[i:i + bs], None if references is None else references[i:i + bs])
            for i in range(0, n, bs)]
    return torch.cat([o.detach().cpu() for o in outs])


def _strip_token(prompt: str, token: str) -> str:
    """DreamBench scores CLIP-T on the prompt without the identifier (the token means nothing to CLIP)."""
    return re.sub(r"\s+", " ", re.sub(rf"\b{re.escape(token)}\b", "", prompt)).strip() if token else prompt


def student_adapter(method) -> str | None:
    return method.adapter if method.trains else None


def teacher_adapter(method, backbone) -> str | None:
    """The adapter whose in-context predictions serve as the tuned teacher: `method.teacher_adapter` (D-OPSD's
    EMA teacher) if the method has one and it exists on the model (not with teacher="self"), else the tuned one."""
    name = getattr(method, "teacher_adapter", None)
    if name and name in (getattr(backbone.denoiser, "peft_config", None) or {}):
        return name
    return student_adapter(method)


def teacher_is_untuned(method, backbone, weights_changed: bool) -> bool:
    """Whether the tuned in-context teacher is the untuned model (no adapter serves as the teacher and the base
    weights are unchanged), so that its outputs come from the untuned model's cache."""
    return teacher_adapter(method, backbone) is None and not weights_changed


class _Untuned:
    """The untuned model's outputs, through the cache; refuses to recompute after a full fine-tune."""

    def __init__(self, backbone, cache: SampleCache, batch_size: int | None, weights_changed: bool):
        self.backbone, self.cache, self.batch_size, self.weights_changed = backbone, cache, batch_size, weights_changed

    def _guard(self, compute: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run():
            if self.weights_changed:
                raise RuntimeError("this method changes the base weights (full fine-tune), so the untuned model's "
                                   "outputs must be cached before training: call "
                                   "dopsd_bench.metrics.evaluate.prepare_untuned(backbone, task, cache_dir=...) first "
                                   "(and give the backbone a `model_id`: without one the cache key is a fingerprint "
                                   "of the weights, which the fine-tune changed)")
            self.backbone.set_adapter(None)
            return compute()
        return run

    def sample(self, prompts, seeds, steps, references=None) -> torch.Tensor:
        bb = self.backbone
        fn = lambda p, s, r: bb.sample(p, s, steps, references=r)
        compute = self._guard(lambda: _in_batches(fn, prompts, seeds, references, self.batch_size))
        kind = "sample" if references is None else "teacher_sample"
        return self.cache.get_or_compute(kind, prompts, seeds, steps, references, compute)

    def divergence(self, prompts, seeds, references, steps) -> torch.Tensor:
        bb = self.backbone
        fn = lambda p, s, r: teacher_student_divergence(bb, p, s, r, student=None, teacher=None, steps=steps)
        compute = self._guard(lambda: _in_batches(fn, prompts, seeds, references, self.batch_size))
        return self.cache.get_or_compute("divergence", prompts, seeds, steps, references, compute)


class _Scorer:
    """Scores of image sets for one task, from `FeatureExtractor.extract` (one feature pass per image set)."""

    def __init__(self, task: TaskData, features: FeatureExtractor):
        self.task, self.features = task, features
        self.refs = features.extract(task.train_images)
        self.world = task.source == "world" and self.refs.attributes is not None
        self.attr = {"concept": "shape", "style": "style"}[task.family] if self.world else None
        self.label = scores.label_index(self.attr, task.instance) if self.world else None
        self.primary = features.name

    def fidelity(self, f: ImageFeatures) -> torch.Tensor:
        if self.world:
            probs = f.attributes[self.attr]
            return scores.target_probability(probs, torch.full((probs.shape[0],), self.label))
        return scores.reference_similarity(f.similarity[self.primary], self.refs.similarity[self.primary])

    def alignment(self, images: torch.Tensor, f: ImageFeatures, prompts: list[str],
                  targets: list[dict[str, str]] | None, exclude: tuple[str, ...] = ()) -> torch.Tensor | None:
        """Judge attributes against the world's targets, else CLIP-T; None when the features have neither (the
        judge on an image folder, DINOv2 without CLIP): alignment is then not measured."""
        if self.world and targets is not None:
            return scores.attribute_alignment(f.attributes, targets, exclude)
        stripped = [_strip_token(p, self.task.token) for p in prompts]
        return self.features.text_scores(images, stripped, f)


def _check_task(task: TaskData, step_curve) -> None:
    if len(task.eval_prompts) != len(task.eval_seeds) or len(task.retention_prompts) != len(task.retention_seeds):
        raise ValueError(f"task {task.task!r}: expected one seed per prompt, got {len(task.eval_prompts)} eval "
                         f"prompts / {len(task.eval_seeds)} seeds, {len(task.retention_prompts)} retention prompts / "
                         f"{len(task.retention_seeds)} seeds")
    if len(task.retention_prompts) < 2 or len(task.eval_prompts) < 2:
        raise ValueError(f"task {task.task!r}: Fréchet distance and diversity need at least 2 retention and 2 eval "
                         f"prompts, got {len(task.retention_prompts)} and {len(task.eval_prompts)}")
    if not step_curve or any(int(k) < 1 for k in step_curve):
        raise ValueError(f"step_curve must be a non-empty list of step counts >= 1, got {step_curve}")


def _retention_reference(task: TaskData, untuned: _Untuned, native: int) -> torch.Tensor:
    if task.retention_real is not None:
        return task.retention_real
    seeds = [int(s) + REFERENCE_SEED_OFFSET for s in task.retention_seeds]
    return untuned.sample(task.retention_prompts, seeds, native)


def prepare_untuned(backbone, task: TaskData, *, cache_dir: str | Path | None,
                    step_curve=STEP_CURVE, batch_size: int | None = None) -> SampleCache:
    """Fill the cache with every untuned output `evaluate` needs. Required before a full fine-tune (it changes
    the base weights); optional otherwise (evaluate fills the cache on first use)."""
    _check_task(task, step_curve)
    cache = SampleCache(cache_dir, backbone)
    untuned = _Untuned(backbone, cache, batch_size, weights_changed=False)
    native = backbone.native_steps
    for k in sorted({int(k) for k in step_curve} | {native}):
        untuned.sample(task.retention_prompts, task.retention_seeds, k)
    _retention_reference(task, untuned, native)
    refs = references_for(task.train_images, len(task.eval_prompts))
    untuned.sample(task.eval_prompts, task.eval_seeds, native, refs)
    untuned.divergence(task.eval_prompts, task.eval_seeds, refs, native)
    untuned.sample(*reconstruction_prompts(task), native, task.train_images)
    return cache


def reconstruction_prompts(task: TaskData) -> tuple[list[str], list[int]]:
    """The teacher's reconstructions of the training images: their own captions, on seeds 50000, 50001, ..."""
    captions = list(task.train_captions)
    return captions, list(range(RECONSTRUCTION_SEED, RECONSTRUCTION_SEED + len(captions)))


@dataclass
class Sampled:
    """Everything evaluate() draws once, and what every registered metric computes from (`MetricSpec.compute`).

    Image sets are (N, 3, H, W) in [-1, 1] on the CPU, in the order of the task's prompts and seeds (evaluation
    prompts: `task.eval_prompts`; retention prompts: `task.retention_prompts`); `retention*` are keyed by step
    count. Features (`f_*`, `refs`) are extracted on first use, once per image set."""

    task: TaskData
    features: FeatureExtractor
    native: int  # the backbone's native step count
    steps: list[int]  # every step count sampled on the retention prompts (the step curve's and the native one)
    step_curve: tuple[int, ...]  # the step counts the step curve reports
    images: torch.Tensor  # the tuned model on the evaluation prompts, native steps
    retention: dict[int, torch.Tensor]  # the tuned model on the retention prompts
    retention_untuned: dict[int, torch.Tensor]  # the untuned model, same prompts and seeds
    real: torch.Tensor  # the retention FD reference: true renders (world) or untuned samples on other seeds
    teacher_before: torch.Tensor  # the untuned in-context teacher on the evaluation prompts (+ a training image)
    teacher_after: torch.Tensor  # the tuned in-context teacher, same prompts and references
    divergence: torch.Tensor  # teacher-student divergence per evaluation prompt, tuned
    divergence_untuned: torch.Tensor
    # the in-context teacher given each training image as reference and its own caption (what it should reproduce),
    # untuned and tuned: the geometry-drift figures compare them with the training images
    reconstruction_before: torch.Tensor
    reconstruction_after: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False)

    @cached_property
    def scorer(self) -> _Scorer:
        return _Scorer(self.task, self.features)

    @cached_property
    def f_images(self) -> ImageFeatures:
        return self.features.extract(self.images)

    @cached_property
    def f_retention(self) -> dict[int, ImageFeatures]:
        return {k: self.features.extract(images) for k, images in self.retention.items()}

    @cached_property
    def f_retention_untuned(self) -> dict[int, ImageFeatures]:
        return {k: self.features.extract(images) for k, images in self.retention_untuned.items()}

    @cached_property
    def f_teacher_before(self) -> ImageFeatures:
        return self.features.extract(self.teacher_before)

    @cached_property
    def f_teacher_after(self) -> ImageFeatures:
        return self.features.extract(self.teacher_after)

    @cached_property
    def real_embedding(self) -> torch.Tensor:
        return self.features.embed(self.real)

    # the task's scoring: world tasks read the judge's attribute heads, folder tasks similarities and CLIP-T
    refs = property(lambda self: self.scorer.refs, doc="features of the task's training (reference) images")
    world = property(lambda self: self.scorer.world, doc="a world task scored by the judge's attributes")
    attr = property(lambda self: self.scorer.attr, doc="world: the attribute the task teaches ('shape'/'style')")
    label = property(lambda self: self.scorer.label, doc="world: the index of the task's glyph/style in `attr`")

    def fidelity(self, f: ImageFeatures) -> torch.Tensor:
        """Per-sample fidelity of an image set's features to the task's concept/style."""
        return self.scorer.fidelity(f)

    def alignment(self, images, f: ImageFeatures, prompts, targets,
                  exclude: tuple[str, ...] = ()) -> torch.Tensor | None:
        """Per-sample prompt alignment: judge attributes (world, `targets`) or CLIP-T (real images); None if the
        scorer has neither."""
        return self.scorer.alignment(images, f, prompts, targets, exclude)

    def _once(self, key, compute: Callable):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def geometry_drift(self, when: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per training image, (log2 scale, centroid offset) of the teacher's reconstruction `when` ("before":
        untuned, "after": tuned) against the image (metrics.geometry.drift)."""
        from dopsd_bench.metrics.geometry import drift

        images = self.reconstruction_before if when == "before" else self.reconstruction_after
        return self._once(("drift", when), lambda: drift(images, self.task.train_images.cpu()))

    def fd(self, steps: int) -> tuple[float, float]:
        """Retention Fréchet distance to `real` at `steps`: (tuned, untuned)."""
        return self._once(("fd", steps), lambda: tuple(
            frechet_distance(self.real_embedding, f[steps].embedding)
            for f in (self.f_retention, self.f_retention_untuned)))

    def kid(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Retention KID at native steps, (mean, std) of (tuned, untuned)."""
        return self._once("kid", lambda: tuple(
            kernel_distance(self.real_embedding, f[self.native].embedding)
            for f in (self.f_retention, self.f_retention_untuned)))

    def retention_alignment(self, steps: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-sample alignment of the retention samples at `steps`: (tuned, untuned); Nones when not measured."""
        task = self.task
        return self._once(("alignment", steps), lambda: tuple(
            self.alignment(images[steps], f[steps], task.retention_prompts, task.retention_targets)
            for images, f in ((self.retention, self.f_retention), (self.retention_untuned, self.f_retention_untuned))))

    def extra_fd(self, space: str):
        """Retention FD (tuned, untuned) and KID ((mean, std) tuned, untuned) at native steps in a further feature
        space of `features.extra_fd` (e.g. an ImageNet network's)."""
        def compute():
            extractor = self.features.extra_fd[space]
            real, tuned, untuned = (extractor.embed(x) for x in (
                self.real, self.retention[self.native], self.retention_untuned[self.native]))
            return (frechet_distance(real, tuned), frechet_distance(real, untuned), kernel_distance(real, tuned),
                    kernel_distance(real, untuned))
        return self._once(("extra_fd", space), compute)


def _sample_tuned(method, task: TaskData, steps: list[int], native: int, batch_size: int | None):
    """The tuned model's samples through the method: evaluation prompts at native steps, retention at every count."""
    def tuned(prompts, seeds, k):
        return _in_batches(lambda p, s, _: method.sample(p, s, k), prompts, seeds, None, batch_size)

    images = tuned(task.eval_prompts, task.eval_seeds, native)
    retention = {k: tuned(task.retention_prompts, task.retention_seeds, k) for k in steps}
    for x in (images, *retention.values()):
        require_finite(x, "the tuned model's samples", "training diverged or the adapter holds NaN; try a lower "
                       "--lr, or check the adapter's weights")
    return images, retention


def _tuned_teacher_samples(backbone, method, untuned: _Untuned, prompts: list[str], seeds: list[int],
                           references: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """The tuned in-context teacher's samples of `prompts` with `references`, at native steps."""
    native, teacher = backbone.native_steps, teacher_adapter(method, backbone)
    if teacher_is_untuned(method, backbone, untuned.weights_changed):
        return untuned.sample(prompts, seeds, native, references)

    def teacher_sample(p, s, r):
        backbone.set_adapter(teacher)
        return backbone.sample(p, s, native, references=r)

    return _in_batches(teacher_sample, prompts, seeds, references, batch_size)


def _sample_teacher(backbone, method, task: TaskData, untuned: _Untuned, references: torch.Tensor,
                    batch_size: int | None):
    """The tuned in-context teacher's samples and the teacher-student divergence on the evaluation prompts."""
    native, prompts, seeds = backbone.native_steps, task.eval_prompts, task.eval_seeds
    student, teacher = student_adapter(method), teacher_adapter(method, backbone)
    samples = _tuned_teacher_samples(backbone, method, untuned, prompts, seeds, references, batch_size)
    if teacher_is_untuned(method, backbone, untuned.weights_changed):
        return samples, untuned.divergence(prompts, seeds, references, native)

    def diverge(p, s, r):
        return teacher_student_divergence(backbone, p, s, r, student=student, teacher=teacher, steps=native)

    return samples, _in_batches(diverge, prompts, seeds, references, batch_size)


def sample_everything(backbone, task: TaskData, method, *, features: FeatureExtractor, cache_dir: str | Path | None,
                      step_curve=STEP_CURVE, batch_size: int | None = None, timings: dict[str, float] | None = None,
                      progress: Callable[[str], None] | None = None) -> Sampled:
    """Sample every image set the metrics need, once: the tuned model through `method`, the untuned model through
    the cache. `timings` (if given) gets seconds per phase, `progress` (if given) each phase's name as it starts."""
    timings = timings if timings is not None else {}
    progress = progress or (lambda phase: None)
    native = backbone.native_steps
    steps = sorted({int(k) for k in step_curve} | {native})
    cache = SampleCache(cache_dir, backbone)
    untuned = _Untuned(backbone, cache, batch_size, method.changes_base_weights)
    references = references_for(task.train_images, len(task.eval_prompts))

    t = time.perf_counter()
    progress(f"sampling the tuned model: {len(task.eval_prompts)} evaluation prompts, {len(task.retention_prompts)} "
             f"retention prompts at {', '.join(map(str, steps))} steps")
    images, retention = _sample_tuned(method, task, steps, native, batch_size)
    timings["sample_tuned"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("sampling the in-context teacher")
    teacher_after, divergence = _sample_teacher(backbone, method, task, untuned, references, batch_size)
    recon_prompts, recon_seeds = reconstruction_prompts(task)
    reconstruction_after = _tuned_teacher_samples(backbone, method, untuned, recon_prompts, recon_seeds,
                                                  task.train_images, batch_size)
    timings["teacher_tuned"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("sampling the untuned model (cached after its first run)")
    prompts, seeds = task.eval_prompts, task.eval_seeds
    retention_untuned = {k: untuned.sample(task.retention_prompts, task.retention_seeds, k) for k in steps}
    teacher_before = untuned.sample(prompts, seeds, native, references)
    divergence_untuned = untuned.divergence(prompts, seeds, references, native)
    reconstruction_before = untuned.sample(recon_prompts, recon_seeds, native, task.train_images)
    real = _retention_reference(task, untuned, native)
    backbone.set_adapter(student_adapter(method))
    timings["untuned"] = time.perf_counter() - t
    timings["cache_hits"], timings["cache_misses"] = float(cache.hits), float(cache.misses)
    return Sampled(task, features, native, steps, tuple(step_curve), images, retention, retention_untuned, real,
                   teacher_before, teacher_after, divergence, divergence_untuned, reconstruction_before,
                   reconstruction_after)


def compute_metrics(sampled: Sampled, specs: list[MetricSpec] | None = None) -> dict[str, dict]:
    """result.json's `metrics`: each registered metric (or each of `specs`) over `sampled`, in registration order;
    a metric that is not scored on this run (its compute returned None) is left out."""
    out: dict[str, dict] = {}
    for spec in metric_specs() if specs is None else specs:
        scored = spec.score(sampled)
        if scored is not None:
            out[spec.name] = scored
    return out


def evaluate(backbone, task: TaskData, method, *, features: FeatureExtractor, cache_dir: str | Path | None,
             step_curve=STEP_CURVE, batch_size: int | None = None,
             timings: dict[str, float] | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Score `method` (already set up / trained on `backbone`) on `task`; returns result.json's `metrics`.

    Each entry is {"mean": float, "per_sample": list | None, "higher_is_better": bool}; `step_curve` is a dict
    of such entries keyed 'fd@K', 'fd_untuned@K', 'fd_ratio@K', 'alignment@K', 'alignment_untuned@K', and
    `retention_attributes` (world tasks) one keyed by attribute ('shape', ..., 'shape_untuned', ...).
    `few_step_gap_ratio` needs a step count above the native one in `step_curve`; without one it is left out.
    `batch_size` bounds how many images are sampled at once (None: all of a set). `timings`, if given, is
    filled with seconds per phase; `progress`, if given, is called with the name of each phase as it starts.
    """
    _check_task(task, step_curve)
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    sampled = sample_everything(backbone, task, method, features=features, cache_dir=cache_dir, step_curve=step_curve,
                                batch_size=batch_size, timings=timings, progress=progress)
    t = time.perf_counter()
    (progress or (lambda phase: None))("scoring")
    out = compute_metrics(sampled)
    timings["score"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return out
