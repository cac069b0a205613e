"""The scoring protocol: one tuned model on one task -> result.json `metrics` (see docs/metrics.md).

Every method is sampled on the task's fixed evaluation and retention seeds. The untuned model's outputs (samples
at every step count, the in-context teacher's samples, the untuned teacher-student divergence) are cached on disk
by `SampleCache` and shared by all methods and runs on the same backbone, prompts, seeds and steps.

    from dopsd_bench.metrics.evaluate import evaluate, features_for_task
    metrics = evaluate(backbone, task, method, features=features_for_task(task), cache_dir="runs/.cache")
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dopsd_bench.errors import require_finite
from dopsd_bench.metrics import retention as RT
from dopsd_bench.metrics import scores as S
from dopsd_bench.metrics.cache import SampleCache
from dopsd_bench.metrics.features import FeatureExtractor, ImageFeatures, features_for_task
from dopsd_bench.metrics.frechet import frechet_distance, kernel_distance
from dopsd_bench.metrics.info import METRIC_INFO, MetricInfo
from dopsd_bench.metrics.teacher import references_for, teacher_student_divergence
from dopsd_bench.taskdata import TaskData

__all__ = ["METRIC_INFO", "MetricInfo", "evaluate", "features_for_task", "prepare_untuned"]

STEP_CURVE = (1, 2, 4, 8)
REFERENCE_SEED_OFFSET = 1_000_000  # folder tasks: FD reference = untuned samples on these shifted seeds


def _entry(values, higher_is_better: bool, per_sample: bool = True, **extra) -> dict:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().flatten().tolist()
    if per_sample:
        return {"mean": float(sum(values) / len(values)), "per_sample": [float(v) for v in values],
                "higher_is_better": higher_is_better, **extra}
    return {"mean": float(values), "per_sample": None, "higher_is_better": higher_is_better, **extra}


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


def _ratio(a: float, b: float) -> float:
    return a / b if b > 1e-12 else (1.0 if a <= 1e-12 else float("inf"))


def student_adapter(method) -> str | None:
    return method.adapter if method.trains else None


def teacher_adapter(method, backbone) -> str | None:
    """The adapter whose in-context predictions serve as the tuned teacher: `method.teacher_adapter` (D-OPSD's
    EMA teacher) if the method has one and it exists on the model (not with teacher="self"), else the tuned one."""
    name = getattr(method, "teacher_adapter", None)
    if name and name in (getattr(backbone.denoiser, "peft_config", None) or {}):
        return name
    return student_adapter(method)


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
        self.label = S.label_index(self.attr, task.instance) if self.world else None
        self.primary = features.name

    def fidelity(self, f: ImageFeatures) -> torch.Tensor:
        if self.world:
            probs = f.attributes[self.attr]
            return S.target_probability(probs, torch.full((probs.shape[0],), self.label))
        return S.reference_similarity(f.similarity[self.primary], self.refs.similarity[self.primary])

    def alignment(self, images: torch.Tensor, f: ImageFeatures, prompts: list[str],
                  targets: list[dict[str, str]] | None, exclude: tuple[str, ...] = ()) -> torch.Tensor:
        if self.world and targets is not None:
            return S.attribute_alignment(f.attributes, targets, exclude)
        stripped = [_strip_token(p, self.task.token) for p in prompts]
        scores = self.features.text_scores(images, stripped, f)
        if scores is None:
            raise ValueError(f"features {self.features.name!r} give neither judge attributes nor CLIP text scores: "
                             "prompt alignment needs one (use features_for_task, or RealImageFeatures with clip)")
        return scores


def _retention_parts(sc: _Scorer, images: torch.Tensor, images_untuned: torch.Tensor, f: ImageFeatures,
                     f_untuned: ImageFeatures, targets: list[dict[str, str]] | None) -> dict[str, dict]:
    """Native-step retention samples, tuned and untuned: leakage, sharpness and (world) attribute retention."""
    out: dict[str, dict] = {}
    extra = {}
    if sc.world:  # how often the judge's argmax is the new glyph/fill, for reading the probabilities
        probs, probs_untuned = f.attributes[sc.attr], f_untuned.attributes[sc.attr]
        extra = {"rate": float(RT.label_rate(probs, sc.label).mean()),
                 "rate_untuned": float(RT.label_rate(probs_untuned, sc.label).mean())}
    out["retention_leakage"] = _entry(RT.paired_shift(sc.fidelity(f), sc.fidelity(f_untuned)), False, **extra)
    energy_untuned = RT.laplacian_energy(images_untuned)
    if float(energy_untuned.mean()) > 0:
        out["retention_sharpness"] = _entry(RT.relative_to_reference(RT.laplacian_energy(images), energy_untuned),
                                            True, untuned_energy=float(energy_untuned.mean()))
    if sc.world and targets is not None:
        hits, hits_untuned = RT.attribute_retention(f.attributes, targets), RT.attribute_retention(
            f_untuned.attributes, targets)
        out["retention_attributes"] = {
            **{attr: _entry(hit, True) for attr, hit in hits.items()},
            **{f"{attr}_untuned": _entry(hit, True) for attr, hit in hits_untuned.items()}}
    return out


def _extra_fd(spaces: dict[str, FeatureExtractor], real: torch.Tensor, images: torch.Tensor,
              images_untuned: torch.Tensor) -> dict[str, dict]:
    """Retention FD, its ratio and KID in each further feature space (e.g. an ImageNet network's), named by it."""
    out: dict[str, dict] = {}
    for name, space in spaces.items():
        r, t, u = space.embed(real), space.embed(images), space.embed(images_untuned)
        fd_t, fd_u = frechet_distance(r, t), frechet_distance(r, u)
        (kid_t, kid_t_std), (kid_u, kid_u_std) = kernel_distance(r, t), kernel_distance(r, u)
        out[f"retention_fd_{name}"] = _entry(fd_t, False, per_sample=False)
        out[f"retention_fd_{name}_untuned"] = _entry(fd_u, False, per_sample=False)
        out[f"retention_fd_ratio_{name}"] = _entry(_ratio(fd_t, fd_u), False, per_sample=False)
        out[f"retention_kid_{name}"] = _entry(kid_t, False, per_sample=False, std=kid_t_std)
        out[f"retention_kid_{name}_untuned"] = _entry(kid_u, False, per_sample=False, std=kid_u_std)
    return out


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
    return cache


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
    progress = progress or (lambda phase: None)
    t0 = time.perf_counter()
    native = backbone.native_steps
    steps_list = sorted({int(k) for k in step_curve} | {native})
    cache = SampleCache(cache_dir, backbone)
    weights_changed = method.changes_base_weights
    untuned = _Untuned(backbone, cache, batch_size, weights_changed)
    student, teacher = student_adapter(method), teacher_adapter(method, backbone)
    eval_refs = references_for(task.train_images, len(task.eval_prompts))
    P, Ps, R, Rs = task.eval_prompts, task.eval_seeds, task.retention_prompts, task.retention_seeds

    # ---- sampling: tuned model through the method, untuned model through the cache --------------------------
    def tuned(prompts, seeds, steps):
        return _in_batches(lambda p, s, _: method.sample(p, s, steps), prompts, seeds, None, batch_size)

    steps_text = ", ".join(map(str, steps_list))
    progress(f"sampling the tuned model: {len(P)} evaluation prompts, {len(R)} retention prompts at {steps_text} "
             "steps")
    gen = tuned(P, Ps, native)
    ret = {k: tuned(R, Rs, k) for k in steps_list}
    for images in (gen, *ret.values()):
        require_finite(images, "the tuned model's samples", "training diverged or the adapter holds NaN; try a lower "
                       "--lr, or check the adapter's weights")
    timings["sample_tuned"] = time.perf_counter() - t0

    t = time.perf_counter()
    progress("sampling the in-context teacher")
    if teacher is None and not weights_changed:  # the tuned teacher is the untuned one: reuse the cache
        teacher_after = untuned.sample(P, Ps, native, eval_refs)
        divergence = untuned.divergence(P, Ps, eval_refs, native)
    else:
        def teacher_sample(p, s, r):
            backbone.set_adapter(teacher)
            return backbone.sample(p, s, native, references=r)
        teacher_after = _in_batches(teacher_sample, P, Ps, eval_refs, batch_size)
        diverge = lambda p, s, r: teacher_student_divergence(
            backbone, p, s, r, student=student, teacher=teacher, steps=native)
        divergence = _in_batches(diverge, P, Ps, eval_refs, batch_size)
    timings["teacher_tuned"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("sampling the untuned model (cached after its first run)")
    ret_untuned = {k: untuned.sample(R, Rs, k) for k in steps_list}
    teacher_before = untuned.sample(P, Ps, native, eval_refs)
    divergence_untuned = untuned.divergence(P, Ps, eval_refs, native)
    real = _retention_reference(task, untuned, native)
    backbone.set_adapter(student)
    timings["untuned"] = time.perf_counter() - t
    timings["cache_hits"], timings["cache_misses"] = float(cache.hits), float(cache.misses)

    # ---- scoring --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    progress("scoring")
    sc = _Scorer(task, features)
    f_gen = features.extract(gen)
    out: dict[str, dict] = {}
    out["fidelity"] = _entry(sc.fidelity(f_gen), True)
    for name, emb in f_gen.similarity.items():
        out[f"fidelity_{name}"] = _entry(S.reference_similarity(emb, sc.refs.similarity[name]), True)
    if task.train_images.shape[0] >= 2:
        ref_oracle = sc.fidelity(sc.refs) if sc.world else S.leave_one_out_similarity(sc.refs.similarity[sc.primary])
        out["fidelity_oracle"] = _entry(ref_oracle, True)
        for name, emb in sc.refs.similarity.items():
            out[f"fidelity_{name}_oracle"] = _entry(S.leave_one_out_similarity(emb), True)
    exclude = (sc.attr,) if sc.world else ()
    out["alignment"] = _entry(sc.alignment(gen, f_gen, P, task.eval_targets, exclude), True)

    real_emb = features.embed(real)
    curve: dict[str, dict] = {}
    fds: dict[int, tuple[float, float]] = {}
    for k in steps_list:
        f_t, f_u = features.extract(ret[k]), features.extract(ret_untuned[k])
        fd_t, fd_u = frechet_distance(real_emb, f_t.embedding), frechet_distance(real_emb, f_u.embedding)
        fds[k] = (fd_t, fd_u)
        al_t = sc.alignment(ret[k], f_t, R, task.retention_targets)
        al_u = sc.alignment(ret_untuned[k], f_u, R, task.retention_targets)
        if k == native:
            out["retention_fd"] = _entry(fd_t, False, per_sample=False, steps=k)
            out["retention_fd_untuned"] = _entry(fd_u, False, per_sample=False, steps=k)
            out["retention_fd_ratio"] = _entry(_ratio(fd_t, fd_u), False, per_sample=False, steps=k)
            kid_t, kid_t_std = kernel_distance(real_emb, f_t.embedding)
            kid_u, kid_u_std = kernel_distance(real_emb, f_u.embedding)
            out["retention_kid"] = _entry(kid_t, False, per_sample=False, std=kid_t_std)
            out["retention_kid_untuned"] = _entry(kid_u, False, per_sample=False, std=kid_u_std)
            out["retention_alignment"] = _entry(al_t, True)
            out["retention_alignment_untuned"] = _entry(al_u, True)
            out.update(_retention_parts(sc, ret[k], ret_untuned[k], f_t, f_u, task.retention_targets))
            out.update(_extra_fd(features.extra_fd, real, ret[k], ret_untuned[k]))
        if k in step_curve:
            curve[f"fd@{k}"] = _entry(fd_t, False, per_sample=False)
            curve[f"fd_untuned@{k}"] = _entry(fd_u, False, per_sample=False)
            curve[f"fd_ratio@{k}"] = _entry(_ratio(fd_t, fd_u), False, per_sample=False)
            curve[f"alignment@{k}"] = _entry(al_t, True)
            curve[f"alignment_untuned@{k}"] = _entry(al_u, True)
    out["step_curve"] = curve
    many = max(steps_list)  # the few-step gap: native steps against the most steps the curve sampled
    if many > native and min(*fds[native], *fds[many]) > 1e-12:
        gap = RT.few_step_gap_ratio(fds[native][0], fds[many][0], fds[native][1], fds[many][1])
        out["few_step_gap_ratio"] = _entry(gap, False, per_sample=False, steps=native, reference_steps=many)

    out["diversity"] = _entry(S.pairwise_diversity(f_gen.embedding, S.diversity_groups(P)), True)
    out["copying"] = _entry(S.nearest_similarity(f_gen.embedding, sc.refs.embedding), False)
    out["teacher_fidelity_before"] = _entry(sc.fidelity(features.extract(teacher_before)), True)
    out["teacher_fidelity_after"] = _entry(sc.fidelity(features.extract(teacher_after)), True)
    out["teacher_student_divergence"] = _entry(divergence, False)
    out["teacher_student_divergence_untuned"] = _entry(divergence_untuned, False)
    timings["score"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return out
