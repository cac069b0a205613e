"""Feature backbones for scoring: the world judge (embedded world) and DINOv2 + CLIP (real images).

A `FeatureExtractor` turns images (B, 3, H, W) in [-1, 1] into what the metrics need:
- `embed(images) -> (B, D)`: the feature used for Fréchet distance, diversity and copying;
- `similarity_embeddings(images) -> {name: (B, D)}`: the features fidelity is measured in, by name
  (the judge: {"judge"}; real images: {"dino", "clip_i"} as DreamBench reports DINO and CLIP-I);
- `attributes(images) -> {attr: (B, L) probabilities} | None`: the world judge's attribute heads;
- `text_scores(images, prompts) -> (B,) | None`: CLIP-T, 100 * max(cos, 0) as torchmetrics' CLIPScore defines it;
- `extract(images) -> ImageFeatures`: all of the above that the extractor has, from as few passes as it can.

Everything runs batched under no_grad, `batch_size` images at a time, and returns float32 tensors on the CPU.

    from dopsd_bench.metrics.features import features_for_task
    features = features_for_task(task, resolution=64)   # the judge for world tasks, DINOv2 + CLIP for folders
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dopsd_bench.runconfig import check_scorer
from dopsd_bench.taskdata import TaskData

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINO = "facebook/dinov2-small"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
JUDGE_RESOLUTION = 32  # the world judge's input size (dopsd_bench.world.render.RES)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")


def _batched(fn, images: torch.Tensor, batch_size: int):
    """Apply fn to chunks of images and concatenate (tensors or dicts of tensors)."""
    outs = [fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def _preprocess(images: torch.Tensor, size: int, mean, std, device, dtype) -> torch.Tensor:
    """[-1, 1] -> resized (bicubic, antialiased) and normalised pixels, as the HF image processors do."""
    x = (images.float() + 1) / 2
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(device=device, dtype=dtype)


@dataclass
class ImageFeatures:
    """Every view of one image set, computed once (`FeatureExtractor.extract`)."""

    embedding: torch.Tensor  # (B, D): Fréchet distance, diversity, copying
    similarity: dict[str, torch.Tensor]  # name -> (B, D'): fidelity; holds `embedding` under the extractor's name
    attributes: dict[str, torch.Tensor] | None  # attr -> (B, L) probabilities (world judge only)


class FeatureExtractor:
    """Base class: subclasses implement `embed`; the other views are optional."""

    name: str = "embedding"
    batch_size: int = 256
    # further feature spaces for retention FD/KID, by name (features_for_task fills it from $DOPSD_BENCH_EXTRA_FD;
    # metrics/imagenet.py); assigned per instance, never mutated
    extra_fd: dict[str, FeatureExtractor] = {}  # noqa: RUF012

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def similarity_embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.embed(images)}

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return None

    def text_scores(self, images: torch.Tensor, prompts: list[str],
                    features: ImageFeatures | None = None) -> torch.Tensor | None:
        """CLIP-T per image/prompt pair, or None; `features` (from `extract`) saves re-embedding the images."""
        return None

    def extract(self, images: torch.Tensor) -> ImageFeatures:
        sims = self.similarity_embeddings(images)
        emb = sims[self.name] if self.name in sims else self.embed(images)
        return ImageFeatures(emb, {**sims, self.name: emb}, self.attributes(images))


class JudgeFeatures(FeatureExtractor):
    """The embedded world's judge: attribute probabilities + its embedding (the world's DINO/CLIP)."""

    name = "judge"

    def __init__(self, judge: nn.Module, device: str | torch.device | None = None, batch_size: int = 512):
        self.judge = judge.eval()
        self.device = torch.device(device) if device is not None else next(judge.parameters()).device
        self.judge.to(self.device)
        self.batch_size = batch_size

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the judge reads them: the world's 32x32 (a backbone at another resolution is scaled to it)."""
        x = x.to(self.device, torch.float32)
        size = (JUDGE_RESOLUTION, JUDGE_RESOLUTION)
        if x.shape[-1] > JUDGE_RESOLUTION:  # averaging pixels: the world's renders at a backbone's size come back
            x = F.adaptive_avg_pool2d(x, size)
        elif x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        fn = lambda x: self.judge.embed(self._input(x)).float().cpu()
        return _batched(fn, images, self.batch_size)

    @torch.no_grad()
    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_images(images)

        def fn(x):
            return {k: v.float().softmax(-1).cpu() for k, v in self.judge(self._input(x)).items()}
        return _batched(fn, images, self.batch_size)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> ImageFeatures:
        if not hasattr(self.judge, "embed_and_logits"):
            return super().extract(images)
        _check_images(images)

        def fn(x):
            emb, logits = self.judge.embed_and_logits(self._input(x))
            return {"__embedding": emb.float().cpu(), **{k: v.float().softmax(-1).cpu() for k, v in logits.items()}}
        out = _batched(fn, images, self.batch_size)
        emb = out.pop("__embedding")
        return ImageFeatures(emb, {self.name: emb}, out)


class DinoFeatures(FeatureExtractor):
    """DINOv2 (transformers Dinov2Model) CLS features, as DreamBench's DINO score uses a ViT's CLS token."""

    name = "dino"

    def __init__(self, model: nn.Module, resolution: int = 224, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 64):
        self.model = model.eval().to(device=device, dtype=dtype)
        self.resolution, self.device, self.dtype, self.batch_size = resolution, torch.device(device), dtype, batch_size

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path = DEFAULT_DINO, **kwargs) -> DinoFeatures:
        from transformers import Dinov2Model

        return cls(_load(Dinov2Model, path_or_id, "DOPSD_BENCH_DINO"), **kwargs)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)

        def fn(x):
            x = _preprocess(x, self.resolution, IMAGENET_MEAN, IMAGENET_STD, self.device, self.dtype)
            return self.model(pixel_values=x).pooler_output.float().cpu()  # layer-normed CLS token
        return _batched(fn, images, self.batch_size)


class ClipFeatures(FeatureExtractor):
    """CLIP image and text features (transformers CLIPModel); `text_scores` is CLIP-T as CLIPScore computes it.

    Implemented here rather than through torchmetrics' CLIPScore, which reads a field transformers 5 moved.
    """

    name = "clip_i"

    def __init__(self, model: nn.Module, tokenizer, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 64):
        self.model = model.eval().to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.resolution = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path = DEFAULT_CLIP, **kwargs) -> ClipFeatures:
        from transformers import AutoTokenizer, CLIPModel

        var = "DOPSD_BENCH_CLIP"
        return cls(_load(CLIPModel, path_or_id, var), _load(AutoTokenizer, path_or_id, var), **kwargs)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)

        def fn(x):
            x = _preprocess(x, self.resolution, CLIP_MEAN, CLIP_STD, self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=x).pooler_output
            return self.model.visual_projection(pooled).float().cpu()
        return _batched(fn, images, self.batch_size)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(prompts[i:i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            text = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            pooled = text.pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)

    def text_scores(self, images: torch.Tensor, prompts: list[str],
                    features: ImageFeatures | None = None) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"expected one prompt per image, got {len(prompts)} prompts for {images.shape[0]} images")
        from dopsd_bench.metrics.scores import clip_text_score

        image_emb = features.similarity[self.name] if features is not None else self.embed(images)
        return clip_text_score(image_emb, self.embed_text(prompts))


class RealImageFeatures(FeatureExtractor):
    """DINOv2 for Fréchet distance, diversity, copying and fidelity (DreamBench DINO); CLIP for CLIP-I and CLIP-T."""

    name = "dino"

    def __init__(self, dino: DinoFeatures, clip: ClipFeatures | None = None):
        self.dino, self.clip = dino, clip

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.dino.embed(images)

    def similarity_embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"dino": self.dino.embed(images)}
        if self.clip is not None:
            out["clip_i"] = self.clip.embed(images)
        return out

    def text_scores(self, images: torch.Tensor, prompts: list[str],
                    features: ImageFeatures | None = None) -> torch.Tensor | None:
        return None if self.clip is None else self.clip.text_scores(images, prompts, features)


class FeatureModule(nn.Module):
    """An extractor's `embed` as an nn.Module with `num_features`, for torchmetrics' FID/KID `feature=` argument."""

    def __init__(self, extractor: FeatureExtractor, num_features: int):
        super().__init__()
        self.extractor = extractor
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.embed(images).double()


def _load(cls, path_or_id: str | Path, var: str):
    """`cls.from_pretrained(path_or_id)`, or a UserError saying how to point the suite at local weights (`var`)."""
    try:
        return cls.from_pretrained(str(path_or_id))
    except OSError as err:
        from dopsd_bench.errors import UserError

        flag = "--clip" if var == "DOPSD_BENCH_CLIP" else "--dino"
        skip = " (or --clip none to score without CLIP)" if var == "DOPSD_BENCH_CLIP" else ""
        cause = " ".join(str(err).split())[:300]
        raise UserError(f"cannot load the scorer {cls.__name__} from {str(path_or_id)!r}: expected a local folder or a "
                        f"hub id already in the Hugging Face cache (runs are offline). Pass {flag} PATH (or set {var}) "
                        f"to a saved model folder{skip}, or --scorer judge to score with the world judge. "
                        f"Cause: {cause}") from err


def load_judge(judge: nn.Module | str | Path | None = None) -> nn.Module:
    """The world judge: an instance, a path for `WorldJudge.load`, or None for the one shipped with the suite."""
    if isinstance(judge, nn.Module):
        return judge
    from dopsd_bench.world.judge import WorldJudge

    return WorldJudge.load(judge)  # None: the shipped judge (dopsd_bench.paths.assets_dir() / "judge")


def choose_scorer(scorer: str | None, source: str, resolution: int | None, weights_given: bool = False) -> str:
    """The scorer a task is scored by: `scorer` if given; dino-clip if its weights are (`weights_given`: --dino or
    --clip); else the world judge for world renders and for any task on a backbone that samples at the judge's
    resolution (the embedded world, where DINOv2 and CLIP would read 32 px images upsampled 7x, and which runs
    offline), else DINOv2 + CLIP."""
    check_scorer(scorer)
    if scorer is None and weights_given:
        scorer = "dino-clip"
    if scorer is not None:
        return scorer
    if source == "world" or (resolution is not None and resolution <= JUDGE_RESOLUTION):
        return "judge"
    return "dino-clip"


def scorer_weights(dino: str | None = None, clip: str | None = None) -> tuple[str, str | None]:
    """The DINOv2 and CLIP weights (local folder or hub id) a dino-clip scorer loads: the given ones, else
    DOPSD_BENCH_DINO / DOPSD_BENCH_CLIP, else DEFAULT_DINO / DEFAULT_CLIP. CLIP "none" is None (score without it)."""
    dino = dino or os.environ.get("DOPSD_BENCH_DINO") or DEFAULT_DINO
    clip = clip or os.environ.get("DOPSD_BENCH_CLIP") or DEFAULT_CLIP
    return dino, None if clip.lower() == "none" else clip


def scorer_record(scorer: str | None, source: str, resolution: int | None, dino: str | None = None,
                  clip: str | None = None) -> dict[str, str | None]:
    """What scores a task, as result.json records it: {"name": "judge"} (the shipped world judge) or
    {"name": "dino-clip", "dino": weights, "clip": weights or None}; `choose_scorer` and `scorer_weights` decide."""
    if choose_scorer(scorer, source, resolution, bool(dino or clip)) == "judge":
        return {"name": "judge"}
    dino, clip = scorer_weights(dino, clip)
    return {"name": "dino-clip", "dino": dino, "clip": clip}


def features_for_task(task: TaskData, *, scorer: str | None = None, resolution: int | None = None,
                      judge: nn.Module | str | Path | None = None, dino: str | None = None, clip: str | None = None,
                      extra_fd: str | None = None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature extractor of `scorer_record(scorer, task.source, resolution, dino, clip)`: the world judge (or
    `judge`), or DINOv2 (+ CLIP unless it is "none"). `extra_fd` (default: $DOPSD_BENCH_EXTRA_FD) names further
    feature spaces for the retention FD/KID (metrics/imagenet.py), loaded here so a missing one fails before any
    training."""
    chosen = scorer_record(scorer, task.source, resolution, dino, clip)
    if chosen["name"] == "judge":
        extractor: FeatureExtractor = JudgeFeatures(load_judge(judge), device=device)
    else:
        clip_features = None if chosen["clip"] is None else ClipFeatures.from_pretrained(chosen["clip"], device=device)
        extractor = RealImageFeatures(DinoFeatures.from_pretrained(chosen["dino"], device=device), clip_features)
    from dopsd_bench.metrics.imagenet import extra_fd_features

    extractor.extra_fd = extra_fd_features(extra_fd, device=device)
    return extractor
