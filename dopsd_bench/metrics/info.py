"""The metrics of the scoring protocol, one registered `MetricSpec` each: name, direction, per sample or not,
description, and the function that computes it from what evaluate() sampled (`dopsd_bench.metrics.evaluate.Sampled`).

A third-party metric registers the same way (a file named by --metrics-path / DOPSD_BENCH_METRICS_PATH, or an entry
point in the group `dopsd_bench.metrics`), is computed by evaluate() and lands in result.json and the leaderboard:

    from dopsd_bench.metrics.info import register_metric

    @register_metric("brightness", higher_is_better=True, description="mean pixel value of each evaluation sample")
    def brightness(s):                      # s: evaluate.Sampled
        return s.images.mean(dim=(1, 2, 3))  # one value per sample (per_sample=False: one number)

Free of torch (the compute functions import the scoring code when they run), so `dopsd-bench list metrics`, the
leaderboard's column order and the run's closing table read the specs without loading the scoring code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dopsd_bench.errors import ConfigError, UserError
from dopsd_bench.registry import METRICS

__all__ = ["METRIC_INFO", "MetricSpec", "Score", "entry", "headline_metrics", "key_metrics", "metric_specs",
           "register_metric"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric. `compute(sampled)` returns its values (per_sample: one per sample; else one number), a `Score`
    (values plus extra result.json fields), a dict of entries made with `entry` (a group, e.g. `step_curve`), or
    None (not scored on this run, e.g. a feature space the run does not have)."""

    name: str
    description: str
    higher_is_better: bool
    per_sample: bool
    compute: Callable[[Any], Any]
    key: int | None = None  # position among the leaderboard's first columns (None: after them, by name)
    headline: int | None = None  # position in the closing table of `dopsd-bench run` (None: not shown there)

    def __post_init__(self):  # a user's spec: one clear line, not a traceback
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"metric name must be a non-empty string without spaces, got {self.name!r}")
        for attr in ("higher_is_better", "per_sample"):
            if not isinstance(getattr(self, attr), bool):
                raise ConfigError(f"metric {self.name!r}: {attr} must be True or False, got {getattr(self, attr)!r}")
        if not callable(self.compute):
            raise ConfigError(f"metric {self.name!r}: compute must be a function of the sampled sets")
        for attr in ("key", "headline"):
            if getattr(self, attr) is not None and not isinstance(getattr(self, attr), int):
                raise ConfigError(f"metric {self.name!r}: {attr} must be an int position or None")

    def score(self, sampled) -> dict | None:
        """This metric's result.json entry (or group of entries) for `sampled`; None if it is not scored."""
        value = self.compute(sampled)
        if value is None or isinstance(value, dict):
            return value
        fields = value.fields if isinstance(value, Score) else {}
        values = value.values if isinstance(value, Score) else value
        try:
            return entry(values, self.higher_is_better, self.per_sample, **fields)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            want = "one value per sample" if self.per_sample else "one number"
            raise UserError(f"metric {self.name!r} returned {type(values).__name__}, expected {want} ({e})") from None


@dataclass(frozen=True)
class Score:
    """A compute function's values with extra fields for the result.json entry (e.g. the step count)."""

    values: Any
    fields: dict[str, Any] = field(default_factory=dict)


def entry(values, higher_is_better: bool, per_sample: bool = True, **fields) -> dict:
    """A result.json entry: {"mean", "per_sample" (list or None), "higher_is_better", **fields}."""
    if per_sample:
        if hasattr(values, "detach"):  # a tensor: its values in float64
            values = values.detach().double().flatten().tolist()
        return {"mean": float(sum(values) / len(values)), "per_sample": [float(v) for v in values],
                "higher_is_better": higher_is_better, **fields}
    return {"mean": float(values), "per_sample": None, "higher_is_better": higher_is_better, **fields}


def register_metric(name: str, *, higher_is_better: bool, per_sample: bool = True, description: str = "",
                    key: int | None = None, headline: int | None = None) -> Callable:
    """Decorator: register the decorated compute function as metric `name` (see the module docstring)."""

    def decorator(compute: Callable) -> Callable:
        text = description or (compute.__doc__ or "").strip().split("\n")[0]
        METRICS.add(name, MetricSpec(name, text, higher_is_better, per_sample, compute, key, headline), text)
        return compute

    return decorator


def metric_specs() -> list[MetricSpec]:
    """Every registered metric, built-in first, in registration order (the order of result.json's entries)."""
    registered = METRICS.objects()
    for name, spec in registered.items():
        if not isinstance(spec, MetricSpec):
            raise UserError(f"metric {name!r} is registered as a {type(spec).__name__}, not a MetricSpec: register "
                            "it with dopsd_bench.metrics.info.register_metric (see docs/metrics.md)")
    return list(registered.values())


def _ordered(position: str) -> tuple[str, ...]:
    specs = [s for s in metric_specs() if getattr(s, position) is not None]
    return tuple(s.name for s in sorted(specs, key=lambda s: getattr(s, position)))


def key_metrics() -> tuple[str, ...]:
    """The leaderboard's first columns, in order."""
    return _ordered("key")


def headline_metrics() -> tuple[str, ...]:
    """The rows of `dopsd-bench run`'s closing comparison table, in order."""
    return _ordered("headline")


# ---- the built-in metrics: compute functions over evaluate.Sampled `s` ---------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b > 1e-12 else (1.0 if a <= 1e-12 else float("inf"))


def _fidelity_in(space: str, oracle: bool) -> Callable:
    def compute(s):
        from dopsd_bench.metrics import scores

        if space not in s.f_images.similarity or (oracle and s.task.train_images.shape[0] < 2):
            return None
        refs = s.refs.similarity[space]
        if oracle:
            return scores.leave_one_out_similarity(refs)
        return scores.reference_similarity(s.f_images.similarity[space], refs)
    return compute


def _fidelity_oracle(s):
    from dopsd_bench.metrics import scores

    if s.task.train_images.shape[0] < 2:
        return None
    return s.fidelity(s.refs) if s.world else scores.leave_one_out_similarity(s.refs.similarity[s.features.name])


def _leakage(s):
    from dopsd_bench.metrics import retention

    f, f_untuned = s.f_retention[s.native], s.f_retention_untuned[s.native]
    fields = {}
    if s.world:  # how often the judge's argmax is the new glyph/fill, for reading the probabilities
        fields = {"rate": float(retention.label_rate(f.attributes[s.attr], s.label).mean()),
                  "rate_untuned": float(retention.label_rate(f_untuned.attributes[s.attr], s.label).mean())}
    return Score(retention.paired_shift(s.fidelity(f), s.fidelity(f_untuned)), fields)


def _sharpness(s):
    from dopsd_bench.metrics import retention

    energy_untuned = retention.laplacian_energy(s.retention_untuned[s.native])
    if float(energy_untuned.mean()) <= 0:
        return None
    return Score(retention.relative_to_reference(retention.laplacian_energy(s.retention[s.native]), energy_untuned),
                 {"untuned_energy": float(energy_untuned.mean())})


def _attributes(s):
    from dopsd_bench.metrics import retention

    if not s.world or s.task.retention_targets is None:
        return None
    targets = s.task.retention_targets
    hits = retention.attribute_retention(s.f_retention[s.native].attributes, targets)
    hits_untuned = retention.attribute_retention(s.f_retention_untuned[s.native].attributes, targets)
    return {**{attr: entry(hit, True) for attr, hit in hits.items()},
            **{f"{attr}_untuned": entry(hit, True) for attr, hit in hits_untuned.items()}}


def _extra_fd(space: str, part: str) -> Callable:
    def compute(s):
        if space not in s.features.extra_fd:
            return None
        fd_t, fd_u, (kid_t, kid_t_std), (kid_u, kid_u_std) = s.extra_fd(space)
        return {"fd": fd_t, "fd_untuned": fd_u, "fd_ratio": _ratio(fd_t, fd_u), "kid": Score(kid_t, {"std": kid_t_std}),
                "kid_untuned": Score(kid_u, {"std": kid_u_std})}[part]
    return compute


def _step_curve(s):
    curve: dict[str, dict] = {}
    for k in s.steps:
        if k in s.step_curve:
            (fd_t, fd_u), (al_t, al_u) = s.fd(k), s.retention_alignment(k)
            curve[f"fd@{k}"] = entry(fd_t, False, per_sample=False)
            curve[f"fd_untuned@{k}"] = entry(fd_u, False, per_sample=False)
            curve[f"fd_ratio@{k}"] = entry(_ratio(fd_t, fd_u), False, per_sample=False)
            if al_t is not None:  # None: the scorer measures no alignment (the judge on an image folder)
                curve[f"alignment@{k}"] = entry(al_t, True)
                curve[f"alignment_untuned@{k}"] = entry(al_u, True)
    return curve


def _few_step_gap(s):
    from dopsd_bench.metrics import retention

    many = max(s.steps)  # the few-step gap: native steps against the most steps the curve sampled
    if many <= s.native or min(*s.fd(s.native), *s.fd(many)) <= 1e-12:
        return None
    (native_t, native_u), (many_t, many_u) = s.fd(s.native), s.fd(many)
    return Score(retention.few_step_gap_ratio(native_t, many_t, native_u, many_u),
                 {"steps": s.native, "reference_steps": many})


def _diversity(s):
    from dopsd_bench.metrics import scores

    return scores.pairwise_diversity(s.f_images.embedding, scores.diversity_groups(s.task.eval_prompts))


def _copying(s):
    from dopsd_bench.metrics import scores

    return scores.nearest_similarity(s.f_images.embedding, s.refs.embedding)


SIMILARITY_SPACES = [("judge", "the world judge's", "DINO analogue"), ("dino", "DINOv2", "DINO"),
                     ("clip_i", "CLIP image", "CLIP-I")]
EFFNET_LITE0 = "effnet_lite0"
# the optional further feature spaces (metrics/imagenet.py builds them, DOPSD_BENCH_EXTRA_FD names them): each has
# its retention FD/KID specs below, so a space is offered only where it is scored
EXTRA_FD_SPACES = (EFFNET_LITE0,)

# in the order of result.json's entries
METRIC_INFO = {m.name: m for m in [
    MetricSpec("fidelity", "concept/style fidelity: judge probability of the target glyph/style (world) or DINO "
               "similarity to the references (real images)", True, True, lambda s: s.fidelity(s.f_images),
               key=1, headline=1),
    *[MetricSpec(f"fidelity_{name}", f"mean cosine to the references in {what} features (DreamBench's "
                 f"{bench}, averaged over the generated x reference matrix)", True, True, _fidelity_in(name, False))
      for name, what, bench in SIMILARITY_SPACES],
    MetricSpec("fidelity_oracle", "the same fidelity measured on the training images themselves (the real-image "
               "oracle; world: judge probability, real images: leave-one-out similarity)", True, True,
               _fidelity_oracle),
    *[MetricSpec(f"fidelity_{name}_oracle", f"fidelity_{name} of each reference against the other references "
                 "(the real-image oracle)", True, True, _fidelity_in(name, True)) for name, _, _ in SIMILARITY_SPACES],
    MetricSpec("alignment", "prompt alignment: fraction of the prompt's other attributes the judge finds (world, "
               "GenEval analogue) or CLIP-T with the token removed (real images)", True, True,
               lambda s: s.alignment(s.images, s.f_images, s.task.eval_prompts, s.task.eval_targets,
                                     (s.attr,) if s.world else ()), key=2, headline=2),
    MetricSpec("retention_fd", "Fréchet distance of native-step samples on retention prompts to true renders "
               "(world) or to untuned samples on other seeds (real images)", False, False,
               lambda s: Score(s.fd(s.native)[0], {"steps": s.native}), key=8, headline=3),
    MetricSpec("retention_fd_untuned", "retention_fd of the untuned model on the same prompts and seeds", False,
               False, lambda s: Score(s.fd(s.native)[1], {"steps": s.native})),
    MetricSpec("retention_fd_ratio", "retention_fd / retention_fd_untuned (1 = quality kept)", False, False,
               lambda s: Score(_ratio(*s.fd(s.native)), {"steps": s.native}), key=3, headline=4),
    MetricSpec("retention_kid", "kernel inception distance (unbiased at small N) on the same sets as retention_fd",
               False, False, lambda s: Score(s.kid()[0][0], {"std": s.kid()[0][1]})),
    MetricSpec("retention_kid_untuned", "retention_kid of the untuned model", False, False,
               lambda s: Score(s.kid()[1][0], {"std": s.kid()[1][1]})),
    MetricSpec("retention_alignment", "alignment of native-step samples on retention prompts (all attributes)",
               True, True, lambda s: s.retention_alignment(s.native)[0], key=4, headline=5),
    MetricSpec("retention_alignment_untuned", "retention_alignment of the untuned model, same prompts and seeds",
               True, True, lambda s: s.retention_alignment(s.native)[1]),
    MetricSpec("retention_leakage", "how much more the new concept/fill appears on retention prompts that never "
               "ask for it, per sample tuned minus untuned (same prompt and seed; 0 = none, the untuned model is 0): "
               "judge probability of the task's held-out glyph/style (world; `rate`/`rate_untuned`: argmax share) "
               "or similarity to the training images (real images)", False, True, _leakage, key=5, headline=6),
    MetricSpec("retention_sharpness", "high-frequency energy (mean squared Laplacian) of native-step retention "
               "samples over the untuned model's mean; 1 = as sharp, < 1 = blurrier (> 1 can be noise)", True, True,
               _sharpness, key=7, headline=8),
    MetricSpec("retention_attributes", "per-attribute accuracy of native-step retention samples (world): entries "
               "'shape', 'colour', 'size', 'position', 'style', 'background' and their '<attr>_untuned' twins, 1 per "
               "sample where the judge finds the stated value", True, True, _attributes),
    # an optional second feature space (DOPSD_BENCH_EXTRA_FD=effnet_lite0, metrics/imagenet.py): ImageNet
    # EfficientNet-Lite0 pooled features, which owe nothing to the world judge
    *[MetricSpec(f"retention_{part}_{space}{suffix}", f"retention_{part}{suffix} in ImageNet EfficientNet-Lite0 "
                 f"features (optional: --extra-fd {space})", False, False, _extra_fd(space, part + suffix))
      for space in EXTRA_FD_SPACES
      for part, suffix in (("fd", ""), ("fd", "_untuned"), ("fd_ratio", ""), ("kid", ""), ("kid", "_untuned"))],
    MetricSpec("step_curve", "retention FD, FD ratio and alignment at 1, 2, 4, 8 steps (entries 'fd@K', "
               "'fd_untuned@K', 'fd_ratio@K', 'alignment@K', 'alignment_untuned@K')", False, False, _step_curve),
    MetricSpec("few_step_gap_ratio", "few-step capacity: (FD at native steps / FD at the step curve's largest "
               "count) of the tuned model over the same of the untuned model; 1 = kept, > 1 = the native steps lost "
               "more than many steps (a change that scales every step count alike cancels)", False, False,
               _few_step_gap, key=6, headline=7),
    MetricSpec("diversity", "mean pairwise embedding distance (1 - cosine) among samples of the same prompt, or "
               "among all evaluation samples when prompts are not repeated", True, True, _diversity, key=9,
               headline=9),
    MetricSpec("copying", "cosine similarity of each sample to its nearest training image", False, True, _copying,
               key=10, headline=10),
    MetricSpec("teacher_fidelity_before", "fidelity of the untuned in-context teacher (prompt + a training image "
               "as reference)", True, True, lambda s: s.fidelity(s.f_teacher_before)),
    MetricSpec("teacher_fidelity_after", "fidelity of the tuned in-context teacher (the method's teacher adapter, "
               "else its tuned adapter)", True, True, lambda s: s.fidelity(s.f_teacher_after), headline=11),
    MetricSpec("teacher_student_divergence", "mean squared distance between teacher (with reference) and student "
               "(text only) x0 predictions on the tuned student's own roll-outs of evaluation prompts", False, True,
               lambda s: s.divergence),
    MetricSpec("teacher_student_divergence_untuned", "teacher_student_divergence of the untuned model", False, True,
               lambda s: s.divergence_untuned),
    *(spec for when, who in (("before", "the untuned"), ("after", "the tuned")) for spec in (
        MetricSpec(f"teacher_scale_drift_{when}", f"|log2| of the object's size in {who} in-context teacher's "
                   "reconstruction of each training image (its caption + itself as reference) over the image's "
                   "(image moments, metrics/geometry.py); signed_mean > 0: drawn larger (zoom-in)", False, True,
                   lambda s, when=when: _scale_drift(s, when)),
        MetricSpec(f"teacher_offset_drift_{when}", f"distance between the object's centre in {who} in-context "
                   "teacher's reconstruction of each training image and in the image, in fractions of its width",
                   False, True, lambda s, when=when: s.geometry_drift(when)[1]),
    )),
]}


def _scale_drift(s, when: str) -> Score:
    scale = s.geometry_drift(when)[0]
    return Score(scale.abs(), {"signed_mean": float(scale.mean())})


for _spec in METRIC_INFO.values():
    METRICS.add(_spec.name, _spec, _spec.description)
