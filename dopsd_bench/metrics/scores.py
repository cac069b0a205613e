"""Per-sample scores as pure functions on features, and torchmetrics `Metric`s that accumulate them.

Every function maps precomputed features/probabilities to one value per generated sample, so statistics can be
paired across methods (same prompts, same seeds). The `Metric` classes keep those values in a "cat" state (they
sync across processes like any torchmetrics metric); `compute()` is the mean and `per_sample()` the values.

    m = ReferenceSimilarity(ref_emb); m.update(gen_emb); m.compute(), m.per_sample()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dopsd_bench.world.render import ATTRIBUTES, OTHER

# ---- pure functions ---------------------------------------------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def reference_similarity(gen: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each generated embedding to all references: DreamBench's DINO / CLIP-I, whose score is the
    mean over the generated x reference matrix (the mean of these per-sample values)."""
    return cosine_matrix(gen, refs).mean(dim=1)


def leave_one_out_similarity(refs: torch.Tensor) -> torch.Tensor:
    """Each reference's mean cosine to the other references: the real-image oracle of `reference_similarity`."""
    n = refs.shape[0]
    if n < 2:
        raise ValueError(f"the real-image oracle needs at least 2 references, got {n}")
    sim = cosine_matrix(refs, refs)
    return (sim.sum(dim=1) - sim.diagonal()) / (n - 1)


def nearest_similarity(gen: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Copying: each sample's cosine to its nearest training image (1 = an exact copy of one)."""
    return cosine_matrix(gen, train).max(dim=1).values


def label_index(attr: str, value: str) -> int:
    """The judge's label index of an attribute value; family glyphs/styles and unknown values map to 'other'."""
    labels = ATTRIBUTES[attr]
    if value in labels:
        return labels.index(value)
    if OTHER in labels:
        return labels.index(OTHER)
    raise ValueError(f"unknown {attr} value {value!r}: expected one of {labels}")


def target_probability(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L) probabilities, (B,) label indices -> (B,) probability the judge gives the target label."""
    return probs.double().gather(1, targets.long().view(-1, 1)).squeeze(1)


def attribute_hits(probs: dict[str, torch.Tensor], targets: list[dict[str, str]],
                   exclude: tuple[str, ...] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per attribute, (rows of the prompts that state it, whether the judge's argmax finds it there)."""
    out = {}
    for attr in ATTRIBUTES:
        rows = [i for i, t in enumerate(targets) if attr in t]
        if attr in exclude or not rows:
            continue
        want = torch.tensor([label_index(attr, targets[i][attr]) for i in rows])
        out[attr] = (torch.tensor(rows), probs[attr][rows].argmax(dim=1) == want)
    return out


def attribute_alignment(probs: dict[str, torch.Tensor], targets: list[dict[str, str]],
                        exclude: tuple[str, ...] = ()) -> torch.Tensor:
    """A GenEval analogue: the fraction of each prompt's stated attributes that the judge's argmax finds.

    `targets[i]` holds the attributes prompt i states; attributes in `exclude` are not counted (e.g. the one the
    new token names, which fidelity measures).
    """
    n = len(targets)
    found = torch.zeros(n, dtype=torch.float64)
    counted = torch.zeros(n, dtype=torch.float64)
    for rows, hit in attribute_hits(probs, targets, exclude).values():
        found[rows] += hit.double()
        counted[rows] += 1
    if (counted == 0).any():
        bad = int((counted == 0).nonzero()[0])
        raise ValueError(f"prompt {bad} states no attribute the judge knows (targets {targets[bad]}, "
                         f"excluded {exclude}): expected keys among {list(ATTRIBUTES)}")
    return found / counted


def attribute_accuracy(probs: dict[str, torch.Tensor], targets: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute, the fraction of the prompts stating it whose sample the judge finds it in: which attributes
    `attribute_alignment` loses."""
    return {attr: float(hit.double().mean()) for attr, (_, hit) in attribute_hits(probs, targets).items()}


def clip_text_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """CLIP-T per pair: 100 * max(cos(image, text), 0), as torchmetrics' CLIPScore."""
    cos = F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return 100 * cos.clamp(min=0)


def pairwise_diversity(emb: torch.Tensor, groups: list | None = None) -> torch.Tensor:
    """Each sample's mean embedding distance (1 - cosine, in [0, 2]) to the other samples of its group.

    `groups[i]` is sample i's group (e.g. its prompt); None puts all samples in one group. Every group needs at
    least 2 samples.
    """
    n = emb.shape[0]
    groups = [0] * n if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"expected one group per sample, got {len(groups)} groups for {n} samples")
    dist = 1 - cosine_matrix(emb, emb)
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    gid = torch.tensor([ids[g] for g in groups])
    same = (gid[:, None] == gid[None, :]) & ~torch.eye(n, dtype=torch.bool)
    partners = same.sum(dim=1)
    if (partners == 0).any():
        raise ValueError("diversity needs at least 2 samples in every group; "
                         f"group {groups[int((partners == 0).nonzero()[0])]!r} has one")
    return (dist * same).sum(dim=1) / partners


def diversity_groups(prompts: list[str]) -> list[str] | None:
    """Group samples by prompt when every prompt has several seeds; otherwise None (all samples one group)."""
    counts = {p: prompts.count(p) for p in set(prompts)}
    return list(prompts) if min(counts.values()) >= 2 else None


# ---- torchmetrics wrappers --------------------------------------------------------------------------------


class PerSampleMetric(Metric):
    """Accumulates one value per sample; compute() is their mean."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _append(self, values: torch.Tensor) -> None:
        self.values.append(values.detach().double().flatten())

    def per_sample(self) -> torch.Tensor:
        if not self.values:
            raise RuntimeError(f"{type(self).__name__} has no samples: call update() first")
        return dim_zero_cat(self.values)

    def compute(self) -> torch.Tensor:
        return self.per_sample().mean()


class ReferenceSimilarity(PerSampleMetric):
    """Fidelity as DreamBench's DINO / CLIP-I: mean cosine of each sample's embedding to the references'."""

    higher_is_better = True

    def __init__(self, references: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("references", references.detach().double(), persistent=False)

    def update(self, embeddings: torch.Tensor) -> None:
        self._append(reference_similarity(embeddings, self.references))


class Copying(PerSampleMetric):
    """Cosine similarity of each sample to its nearest training image (lower = less copying)."""

    higher_is_better = False

    def __init__(self, train: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("train_embeddings", train.detach().double(), persistent=False)

    def update(self, embeddings: torch.Tensor) -> None:
        self._append(nearest_similarity(embeddings, self.train_embeddings))


class TargetProbability(PerSampleMetric):
    """Fidelity in the world: the judge's probability of the target glyph/style label."""

    higher_is_better = True

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        self._append(target_probability(probs, targets))


class AttributeAlignment(PerSampleMetric):
    """Prompt alignment in the world: fraction of the prompt's attributes the judge finds (GenEval analogue)."""

    higher_is_better = True

    def __init__(self, exclude: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.exclude = tuple(exclude)

    def update(self, probs: dict[str, torch.Tensor], targets: list[dict[str, str]]) -> None:
        self._append(attribute_alignment(probs, targets, self.exclude))


class ClipTextScore(PerSampleMetric):
    """Prompt alignment for real images: CLIP-T = 100 * max(cos(image, text), 0) per sample."""

    higher_is_better = True

    def update(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
        self._append(clip_text_score(image_emb, text_emb))


class Diversity(PerSampleMetric):
    """Mean pairwise embedding distance (1 - cosine) within groups; needs every sample before compute()."""

    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.groups: list = []

    def update(self, embeddings: torch.Tensor, groups: list | None = None) -> None:
        self.embeddings.append(embeddings.detach().double())
        self.groups += list(groups) if groups is not None else [None] * embeddings.shape[0]

    def reset(self) -> None:
        super().reset()
        self.groups = []  # a plain attribute (group keys need not be tensors), so single-process only

    def per_sample(self) -> torch.Tensor:
        emb = dim_zero_cat(self.embeddings)
        return pairwise_diversity(emb, None if all(g is None for g in self.groups) else self.groups)

    def compute(self) -> torch.Tensor:
        return self.per_sample().mean()
