"""`dopsd-bench plan`: what a run will cost, and whether it can finish, before any weight is loaded.

The backbone's pipeline is built on the meta device from its configs (model_index.json and each component's
config: no weights are read), wrapped in its adapter, and given the method's LoRA. From it:

- parameters per component, and the weights' memory at the run's dtype (every component stays on the device);
- trainable parameters and their state (fp32 weight, gradient and AdamW's two moments: 16 bytes each);
- activations of the training step: the tensors one denoiser forward saves for backward, counted on the meta
  device at the method's graph rows (`Method.graph_rows`), the backbone's resolution and the task's longest caption
  as the model reads it (Z-Image: its real length; FLUX.2: padded to the maximum), with
  attention counted as a fused kernel keeps it (q, k, v, output and the log-sum-exp; no score matrix);
- whether the task can be scored on this backbone, and every check that would otherwise fail after training.

`run` makes the same checks first (`preflight`): a problem is a UserError (one line, exit 2) before any training.

    dopsd-bench plan --method sft --task style                              # the embedded model, CPU
    dopsd-bench plan --backbone flux2-klein --model PATH --method dopsd --task style --dtype bf16
"""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dopsd_bench import options
from dopsd_bench.errors import UserError

COMPONENTS = ("transformer", "text_encoder", "vae")  # the modules a run keeps on its device
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TRAINABLE_STATE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW's exp_avg and exp_avg_sq
JUDGE_RESOLUTION = 32  # the world judge's input size (metrics.features.JUDGE_RESOLUTION)


@dataclass
class Plan:
    backbone: str
    model: str
    method: str
    task: str
    instance: str
    dtype: str
    device: str
    resolution: int = 0
    tokens: int = 0  # image tokens + text tokens of one training forward row
    text_tokens: int = 0  # of those, the text: the task's longest training caption as the model reads it
    params: dict[str, int] = field(default_factory=dict)  # component -> parameters
    trainable: int = 0
    graph_rows: int = 0
    activation_bytes: int | None = None
    teacher_rows: int = 0  # rows of the step's no-grad teacher forward (0: the method runs none)
    teacher_bytes: int | None = None  # that forward's transient peak, while no graph is alive
    gradient_checkpointing: bool = False
    scoring: str = ""
    problems: list[str] = field(default_factory=list)  # each would stop the run (after training, without plan)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(self.params.values()) * BYTES[self.dtype]

    @property
    def trainable_bytes(self) -> int:
        return self.trainable * TRAINABLE_STATE_BYTES

    @property
    def peak_bytes(self) -> int | None:
        if self.activation_bytes is None:
            return None
        # the teacher's forward runs before the student's graph exists: the larger of the two is the step's peak
        return self.weight_bytes + self.trainable_bytes + max(self.activation_bytes, self.teacher_bytes or 0)

    def lines(self) -> list[str]:
        out = [(f"{self.method} on {self.task}:{self.instance}, {self.backbone} ({self.model}), {self.dtype} on "
                f"{self.device}")]
        for name, n in self.params.items():
            out.append(f"  {name:<14} {n:>15,} parameters  {_gib(n * BYTES[self.dtype])}")
        out.append(f"  {'weights':<14} {sum(self.params.values()):>15,} parameters  {_gib(self.weight_bytes)}")
        out.append(f"  {'trainable':<14} {self.trainable:>15,} parameters  {_gib(self.trainable_bytes)} "
                   "(fp32 weight, gradient, AdamW moments)")
        if self.activation_bytes is not None:
            how = ", gradient checkpointing" if self.gradient_checkpointing else ""
            out.append(f"  {'activations':<14} {self.graph_rows} rows x {self.tokens} tokens ({self.text_tokens} "
                       f"of text) at {self.resolution} px"
                       f"{how}: {_gib(self.activation_bytes)}")
            if self.teacher_bytes is not None:
                out.append(f"  {'teacher pass':<14} {self.teacher_rows} rows, no gradient, with the reference: "
                           f"{_gib(self.teacher_bytes)} at its peak")
            out.append(f"  {'peak (est.)':<14} {_gib(self.peak_bytes)} for one training step (estimate: weights + "
                       "trainable state + the larger of saved activations and the teacher pass; allocator slack not "
                       "included)")
        out.append(f"  scoring: {self.scoring}")
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  problem: {p}" for p in self.problems]
        return out


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- the model on the meta device ------------------------------------------------------------------------------
def _meta_module(path: str, name: str, library: str, class_name: str, dtype: torch.dtype):
    import importlib

    from accelerate import init_empty_weights
    from diffusers.utils import logging as diffusers_logging

    cls = getattr(importlib.import_module(library), class_name)
    if library == "diffusers":
        config = cls.load_config(path, subfolder=name)
        with init_empty_weights():
            module = cls.from_config(config)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, subfolder=name)
        with init_empty_weights():
            module = cls._from_config(config)
        module.tie_weights()  # as from_pretrained does: a tied output layer is the embedding, counted once
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns of modules kept in fp32 by from_pretrained only
    try:
        return module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def meta_pipeline(path: str, dtype: torch.dtype):
    """The diffusers pipeline at `path` (a local folder or hub id) with its models on the meta device (configs only,
    no weights) and its tokenizer (small files: it sizes the prompts; None where it cannot be read)."""
    import diffusers

    index_file = Path(path) / "model_index.json"
    index = (json.loads(index_file.read_text()) if index_file.exists()
             else diffusers.DiffusionPipeline.load_config(path))
    pipe_cls = getattr(diffusers, index["_class_name"])
    parts = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        if name in COMPONENTS:
            parts[name] = _meta_module(path, name, library, class_name, dtype)
        elif name == "scheduler":
            parts[name] = getattr(diffusers, class_name).from_pretrained(path, subfolder=name)
        elif name == "tokenizer":
            parts[name] = _tokenizer(path, library, class_name)
        else:
            parts[name] = None  # processors: not needed for shapes
    return pipe_cls(**parts)


def _tokenizer(path: str, library: str, class_name: str):
    import importlib

    try:
        return getattr(importlib.import_module(library), class_name).from_pretrained(path, subfolder="tokenizer")
    except (OSError, ValueError, AttributeError, ImportError):  # not local nor cached: prompts count at their maximum
        return None


def meta_backbone(name: str, model: str | None, dtype: str, teacher_model: str | None = None):
    """The backbone adapter `name` over `model`'s pipeline on the meta device; (backbone, settings). `teacher_model`
    replaces the in-context teacher's VL model of a backbone that has one (z-image); UserError for one without."""
    from dopsd_bench.registry import BACKBONES
    from dopsd_bench.runconfig import torch_dtype

    cls = BACKBONES.get(name)
    model = model or cls.default_model
    path, settings = cls.resolve(model)
    if teacher_model is not None:
        if "vl_model" not in settings:
            raise UserError(f"--teacher-model names an in-context teacher's vision-language model, which {name} does "
                            "not have (its teacher is its own transformer given reference tokens); drop it, or use "
                            "--backbone z-image")
        settings["vl_model"] = teacher_model
    try:
        pipe = meta_pipeline(path, torch_dtype(dtype))
    except (OSError, KeyError, ValueError, AttributeError) as e:
        raise UserError(f"cannot read the pipeline configs of {model!r} for {name}: {' '.join(str(e).split())[:300]}; "
                        "expected a diffusers pipeline folder (model_index.json) or a hub id") from None
    return cls(pipe, settings, model_id=model, device="meta"), settings


# ---- activations of one training forward ------------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: saves what a fused (flash) kernel saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count needs the forward only
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _all_true_masks():
    """On the meta device, a boolean mask selects all its entries (`blank_cond` masks are all True): without this,
    torch cannot tell a selection's size without data."""
    from torch.fx.experimental import _config

    before = _config.meta_nonzero_assume_all_nonzero
    _config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        _config.meta_nonzero_assume_all_nonzero = before


def saved_activation_bytes(backbone, rows: int, checkpointing: bool = False, text_tokens: int | None = None) -> int:
    """Bytes of the tensors one `predict_velocity` of `rows` rows (prompts of `text_tokens` tokens; default: the
    longest the model reads) saves for backward, each tensor once (the weights and the inputs it is given are not
    counted); they are in the weights' dtype where the weights compute.

    With `checkpointing`, what a step holds under diffusers' gradient checkpointing: what the forward saves outside the
    checkpointed blocks, plus each block's inputs (kept for the recomputation), plus the largest block's own saved
    tensors (alive while that block is recomputed and differentiated)."""
    seen: dict[int, int] = {}
    keep = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in seen and not isinstance(base, torch.nn.Parameter):
            seen[id(base)] = base.numel() * base.element_size()
            keep.append(base)  # ids stay unique while the tensors live
        return t

    blocks: list[tuple[int, int]] = []  # per checkpointed block: (its inputs' bytes, the bytes it saves)
    denoiser = backbone.denoiser
    original = (denoiser.gradient_checkpointing, getattr(denoiser, "_gradient_checkpointing_func", None))

    def run_block(block, *args, **kwargs):  # diffusers' checkpoint call, run plainly and measured
        before = sum(seen.values())
        out = block(*args, **kwargs)
        inputs = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        blocks.append((inputs, sum(seen.values()) - before))
        return out

    device = backbone.device
    x = torch.zeros((rows, *backbone.latent_shape()), device=device)
    sigma = torch.full((rows,), 0.5, device=device)
    cond = backbone.blank_cond(rows, text_tokens)
    denoiser.gradient_checkpointing, denoiser._gradient_checkpointing_func = True, run_block
    try:
        with torch.enable_grad(), _fused_attention(), _all_true_masks(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backbone.predict_velocity(x, sigma, cond)
    finally:
        denoiser.gradient_checkpointing, denoiser._gradient_checkpointing_func = original
    total = sum(seen.values())
    if not checkpointing or not blocks:
        return total
    inside = sum(saved for _, saved in blocks)
    return total - inside + sum(inputs for inputs, _ in blocks) + max(saved for _, saved in blocks)


def teacher_forward_bytes(backbone, rows: int, text_tokens: int | None = None) -> int:
    """Peak bytes of the tensors alive during one no-grad `predict_velocity` of `rows` rows with the teacher's
    conditioning (`blank_teacher_cond`), above its inputs: a forward that keeps no graph still holds its largest
    block's intermediates (fused projections, attention output, MLP) at once. Each storage an op creates counts from
    then until the last tensor on it is dropped; views and in-place results are not new memory; attention counts as
    a fused kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        """Bytes of the storages that tensors made inside the mode hold, each storage once (views share theirs)."""

        def __init__(self):
            super().__init__()
            self.refs: dict[int, int] = {}  # storage -> tensors made here that hold it
            self.live = self.peak = 0

        def _drop(self, key: int, n: int) -> None:
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key, n = storage._cdata, storage.nbytes()
                if key in given and key not in self.refs:
                    continue  # an input's memory (in place, or a view of it)
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += n
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key, n)
            return out

    device = backbone.device
    x = torch.zeros((rows, *backbone.latent_shape()), device=device)
    sigma = torch.full((rows,), 0.5, device=device)
    cond = backbone.blank_teacher_cond(rows, text_tokens)
    tracker = LiveBytes()
    with torch.no_grad(), _fused_attention(), _all_true_masks(), tracker:
        backbone.predict_velocity(x, sigma, cond)
    return tracker.peak


# ---- checks --------------------------------------------------------------------------------------------------
def _local_or_cached(path_or_id: str) -> bool:
    """A local folder, or a hub id whose config is in the Hugging Face cache (runs are offline)."""
    if Path(path_or_id).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(path_or_id, "config.json"), str)
    except (ValueError, OSError):  # not a valid repo id
        return False


def _transformer_shape(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _check_scoring(plan: Plan, sources: set[str], scorer: str | None = None, dino: str | None = None,
                   clip: str | None = None) -> None:
    """How the task's data (`world` renders, image `folder`s, or both in a sequence's rounds) is scored: the
    scorer `metrics.features.choose_scorer` picks for each source, and whether its weights are at hand."""
    from dopsd_bench.metrics.features import choose_scorer

    chosen = {source: choose_scorer(scorer, source, plan.resolution, bool(dino or clip)) for source in sorted(sources)}
    parts = []
    if "judge" in chosen.values():
        parts.append(_judge_scoring(plan))
        if chosen.get("folder") == "judge":
            plan.notes.append("image folders scored by the world judge: fidelity is the cosine to the references in "
                              "its features; prompt alignment is not measured (the judge reads world attributes, "
                              "which a folder's captions do not state)")
    if "dino-clip" in chosen.values():
        parts.append(_dino_clip_scoring(plan, dino, clip))
    plan.scoring = "; ".join(parts)


def _judge_scoring(plan: Plan) -> str:
    r = plan.resolution
    if r < JUDGE_RESOLUTION:
        plan.notes.append(f"the backbone samples {r} px images, smaller than the judge's {JUDGE_RESOLUTION} px: "
                          "scores read upsampled images")
    if r == JUDGE_RESOLUTION:
        return f"world judge at {JUDGE_RESOLUTION} px, the backbone's own size"
    how = "average-pooled" if r > JUDGE_RESOLUTION else "upsampled"
    return (f"world judge at {JUDGE_RESOLUTION} px (samples at {r} px are {how} to it); the world's "
            f"{JUDGE_RESOLUTION} px renders are resized to {r} px for training and as references")


def _dino_clip_scoring(plan: Plan, dino: str | None, clip: str | None) -> str:
    from dopsd_bench.metrics.features import scorer_weights

    dino, clip = scorer_weights(dino, clip)
    for what, ref, flag in (("DINOv2", dino, "--dino"), ("CLIP", clip, "--clip")):
        if ref is not None and not _local_or_cached(ref):
            plan.problems.append(f"scoring with DINOv2 + CLIP needs {what} ({ref!r}), which is neither a local folder "
                                 f"nor in the Hugging Face cache; pass {flag} PATH to a saved model folder"
                                 + (" or --clip none" if flag == "--clip" else "") + ", or --scorer judge")
    return f"DINOv2 ({dino})" + ("" if clip is None else f" and CLIP ({clip})")


def _check_teacher(plan: Plan, settings: dict) -> None:
    vl = settings.get("vl_model")
    if vl is None:
        return
    if not _local_or_cached(str(vl)):
        plan.problems.append(f"the in-context teacher's VL model {vl!r} is neither a local folder nor in the Hugging "
                             "Face cache: scoring needs it after training (teacher fidelity); give a local folder "
                             "(dopsd_bench.json's vl_model)")
        return
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, Qwen3VLForConditionalGeneration

        config = AutoConfig.from_pretrained(vl)
        with init_empty_weights():
            vl_model = Qwen3VLForConditionalGeneration._from_config(config)
        plan.params["teacher_vision"] = sum(p.numel() for p in vl_model.model.visual.parameters())
        plan.notes.append("the teacher's VL model is loaded at its first use; its language model is replaced by the "
                          "text encoder's weights, so only its vision tower adds to the weights")
    except (OSError, ValueError, AttributeError) as e:
        plan.notes.append(f"the teacher's VL model size is unknown ({type(e).__name__})")


def _check_base_model(plan: Plan, method, backbone_name: str, transformer_config) -> None:
    """A method that trains on another model of the same architecture (base-transfer's `base_model`): its LoRA
    is applied to this one after training, so the two denoisers must have the same shapes."""
    other = getattr(method.config, "base_model", None)
    if not other:
        return
    try:
        base, _ = meta_backbone(backbone_name, other, plan.dtype)
    except UserError as e:
        plan.problems.append(f"method {plan.method}'s base_model {other!r} cannot be read: {e}; set it with "
                             "--set base_model=PATH to a multi-step model of this architecture")
        return
    if _transformer_shape(base.denoiser.config) != _transformer_shape(transformer_config):
        plan.problems.append(f"method {plan.method}'s base_model {other!r} has another denoiser shape than "
                             f"{plan.model!r}: its LoRA would not fit this model after training; set --set "
                             "base_model=PATH to the multi-step model of this one")


# ---- the plan ------------------------------------------------------------------------------------------------
def make_plan(backbone: str, model: str | None, method: str, task: str, instance: str | None = None,
              dtype: str | None = None, device: str | None = None, batch_size: int | None = None,
              rank: int | None = None, overrides: dict[str, str] | None = None, activations: bool = True,
              gradient_checkpointing: bool = False, scorer: str | None = None, dino: str | None = None,
              clip: str | None = None, teacher_model: str | None = None) -> Plan:
    from dopsd_bench.registry import BACKBONES
    from dopsd_bench.runconfig import resolve_dtype
    from dopsd_bench.runner import build_method
    from dopsd_bench.tasks import load_task
    from dopsd_bench.train import DEFAULT_BUDGET

    spec = load_task(task)
    instance = spec.instance(instance).name
    the_method = build_method(method, overrides or {})
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, target)
    model = model or BACKBONES.get(backbone).default_model
    plan = Plan(backbone=backbone, model=model, method=method, task=spec.name, instance=instance, dtype=dtype,
                device=str(target))
    bb, settings = meta_backbone(backbone, model, dtype, teacher_model)
    pipe = bb.pipe
    plan.resolution = bb.resolution
    plan.params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}
    step = pipe.vae_scale_factor * 2
    if bb.resolution % step:
        plan.problems.append(f"resolution {bb.resolution} is not a multiple of {step} (the VAE's "
                             f"{pipe.vae_scale_factor}x down-sampling times the 2x2 patches): its samples would not "
                             "have the task's size; set dopsd_bench.json's resolution to a multiple of it")
    rounds = spec.rounds(instance) if spec.family == "sequence" else []
    _check_scoring(plan, {r.spec().source for r in rounds} if rounds else {spec.source}, scorer, dino, clip)
    _check_teacher(plan, settings)
    _check_base_model(plan, the_method, backbone, bb.denoiser.config)

    if the_method.trains:
        activations = activations and not plan.problems
        text_tokens = bb.text_tokens(_training_captions(spec, instance, rounds)) if activations else 0
        _count_training(plan, bb, the_method, text_tokens,
                        batch_size or int(DEFAULT_BUDGET["batch_size"]), rank or int(DEFAULT_BUDGET["rank"]),
                        activations, gradient_checkpointing)
    if target.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(target).total_memory
        if plan.weight_bytes > total:
            plan.problems.append(f"the weights alone take {_gib(plan.weight_bytes)} at {dtype}, more than "
                                 f"{_gib(total)} on {target}; use a smaller dtype or a larger GPU")
        elif plan.peak_bytes is not None and plan.peak_bytes > total:
            plan.notes.append(f"the estimated peak {_gib(plan.peak_bytes)} exceeds {_gib(total)} on {target}: try "
                              "--gradient-checkpointing or a smaller --batch-size")
    if plan.activation_bytes is not None and not gradient_checkpointing:
        plan.notes.append("with --gradient-checkpointing: `dopsd-bench plan ... --gradient-checkpointing`")
    return plan


def _training_captions(spec, instance: str, rounds: list) -> list[str]:
    """Every caption the run trains on: the instance's, or each round's of a sequence."""
    if rounds:
        return [c for r in rounds for c in r.spec().training_captions(r.instance)]
    return spec.training_captions(instance)


def _count_training(plan: Plan, bb, method, text_tokens: int, batch_size: int, rank: int, activations: bool,
                    gradient_checkpointing: bool) -> None:
    """The trainable state of `method` on the meta backbone `bb` and, with `activations`, one step's saved
    activations and its teacher pass, into `plan`."""
    plan.graph_rows = method.graph_rows(batch_size, bb.native_steps)
    lora = method.adapter is not None
    if lora:
        bb.add_lora("plan", rank=rank)
        plan.trainable = sum(p.numel() for p in bb.lora_parameters("plan"))
    else:  # a full fine-tune trains the denoiser itself
        plan.trainable = sum(p.numel() for p in bb.denoiser.parameters())
        plan.notes.append("a full fine-tune: the denoiser's own weights train, in the run's dtype")
    if getattr(method, "teacher_adapter", None):
        plan.notes.append("the method keeps a second adapter (its teacher): its weights count once more, "
                          "without gradient or optimiser state")
    if not activations:
        return
    h, w = bb.latent_shape()[1:]
    plan.text_tokens = text_tokens
    plan.tokens = int(h * w // (4 if plan.backbone == "z-image" else 1)) + text_tokens
    plan.activation_bytes = saved_activation_bytes(bb, plan.graph_rows, gradient_checkpointing, text_tokens)
    plan.gradient_checkpointing = gradient_checkpointing
    plan.teacher_rows = method.teacher_rows(batch_size, bb.native_steps)
    if plan.teacher_rows:
        if lora and method.teacher_pass_folded():
            bb.set_adapter(None)  # folded into the weights: no LoRA branch in that forward
        plan.teacher_bytes = teacher_forward_bytes(bb, plan.teacher_rows, text_tokens)
        if lora:
            bb.set_adapter("plan")


def preflight(backbone: str, model: str | None, method: str, task: str, instance: str | None, dtype: str | None,
              device: str | None, overrides: dict[str, str] | None = None, scorer: str | None = None,
              dino: str | None = None, clip: str | None = None, teacher_model: str | None = None) -> Plan:
    """The checks of `plan` without the activation count; UserError naming the first problem."""
    plan = make_plan(backbone, model, method, task, instance, dtype=dtype, device=device, overrides=overrides,
                     activations=False, scorer=scorer, dino=dino, clip=clip, teacher_model=teacher_model)
    if plan.problems:
        raise UserError(f"{plan.method} on {plan.task}:{plan.instance} with {plan.backbone} ({plan.model}) cannot "
                        f"finish: {plan.problems[0]}")
    return plan


def plan_command(
    method: options.Method = "dopsd",
    task: options.Task = "style",
    instance: options.Instance = None,
    backbone: options.Backbone = "flux2-klein",
    model: options.Model = None,
    dtype: options.Dtype = None,
    batch_size: options.BatchSize = None,
    rank: options.Rank = None,
    device: options.Device = None,
    gradient_checkpointing: options.GradientCheckpointing = False,
    scorer: options.Scorer = None,
    dino: options.Dino = None,
    clip: options.Clip = None,
    teacher_model: options.TeacherModel = None,
) -> None:
    """Say what a run will cost (parameters, memory) and whether it can finish, without loading weights."""
    from dopsd_bench.registry import BACKBONES, METHODS
    from dopsd_bench.runconfig import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    METHODS.get(method)
    BACKBONES.get(backbone)
    plan = make_plan(backbone, model, method, task, instance, dtype=dtype, device=device, batch_size=batch_size,
                     rank=rank, gradient_checkpointing=gradient_checkpointing, scorer=scorer, dino=dino,
                     clip=clip, teacher_model=teacher_model)
    print("\n".join(plan.lines()))
    if plan.problems:
        raise UserError(f"this run cannot finish: {plan.problems[0]}")
