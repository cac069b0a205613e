"""One cell of the benchmark: resolve -> train (shared loop) -> sample + score (metrics.evaluate) -> run dir.

    from dopsd_bench.runconfig import RunConfig
    from dopsd_bench.runner import run_cell
    run_cell(RunConfig(method="sft", task="style", steps=2))        # -> runs/flux2-klein/style-dotted/sft/seed0-...

The run dir holds config.json (written first), train_log.jsonl, adapter/ (diffusers LoRA format), samples.png,
teacher.png (the in-context teacher before and after tuning) and result.json. Every file is written atomically and
result.json last, so its presence means the cell is complete: such a cell is skipped unless `force`. Errors in
user input (names, task data, configs) are raised as dopsd_bench.errors.UserError before the model is loaded or any
run-dir file is written.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dopsd_bench import rundir
from dopsd_bench.errors import ConfigError, UserError
from dopsd_bench.method import Batch, Method, config_from_overrides
from dopsd_bench.result import COST_KEYS, TEACHER_SAMPLES_FILE, Result, no_budget
from dopsd_bench.runconfig import RunConfig, check_device, default_eval_batch_size, resolve_dtype, torch_dtype
from dopsd_bench.train import CHECKPOINT_DIR, DEFAULT_BUDGET, TrainConfig, checkpoint_dirs, make_accelerator, train

GRID_COLUMNS = 8
GENERIC_EVAL_NAMES = ("lora", "eval")  # `eval` labels that mean "name it after the LoRA"


# ---- resolving a RunConfig (cheap; raises UserError on bad input) --------------------------------------------
def build_method(name: str, overrides: dict[str, str]) -> Method:
    from dopsd_bench.registry import METHODS

    cls = METHODS.get(name)
    try:
        config = config_from_overrides(cls.Config, overrides)
    except ValueError as e:
        raise ConfigError(f"method {name!r}: {e}") from None
    return cls(config)


def train_config(cfg: RunConfig, method: Method) -> TrainConfig:
    """The resolved budget: the user's values, else the method's default lr, else DEFAULT_BUDGET."""
    lr = cfg.lr if cfg.lr is not None else (method.default_lr or DEFAULT_BUDGET["lr"])
    kwargs: dict[str, Any] = {"lr": lr, "seed": cfg.seed}
    for key in ("steps", "budget_flops", "budget_seconds", "batch_size", "rank", "grad_accum", "checkpoint_every"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.budget_flops is not None or cfg.budget_seconds is not None:
        kwargs["steps"] = None  # the length comes from the cost budget (config.json shows no step count it ignores)
    return TrainConfig(**kwargs)


def _task(cfg: RunConfig):
    """The task spec and instance name, with the instance's data checked (unreadable images fail here)."""
    from dopsd_bench.tasks import load_task

    spec = load_task(cfg.task)
    instance = spec.instance(cfg.instance).name
    spec.check(instance)
    return spec, instance


def _device(cfg: RunConfig, accelerator) -> torch.device:
    if cfg.device is not None and accelerator.num_processes == 1:
        return torch.device(cfg.device)
    return accelerator.device


def _load_backbone(cfg: RunConfig, device: torch.device):
    """The backbone with its frozen weights in the run's dtype; LoRA adapters stay fp32 (backbones.lora)."""
    from dopsd_bench.backbones import load_backbone

    dtype = torch_dtype(resolve_dtype(cfg.dtype, device))
    teacher = {} if cfg.teacher_model is None else {"vl_model": cfg.teacher_model}  # plan checked the backbone has one
    backbone = load_backbone(cfg.backbone, cfg.model, device=str(device), dtype=dtype, **teacher)
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    return backbone


def _preflight(cfg: RunConfig, method: Method | None) -> None:
    """`plan`'s checks (dopsd_bench/plan.py) before anything is loaded: what would fail after training fails here.
    A backbone the registry does not know is the caller's own (a loader passed in): it has no configs to read."""
    from dopsd_bench.plan import preflight
    from dopsd_bench.registry import BACKBONES

    if cfg.backbone not in BACKBONES.names():
        return
    name = cfg.method if method is not None else "base"  # an adapter to score trains nothing
    preflight(cfg.backbone, cfg.model, name, cfg.task, cfg.instance, cfg.dtype, cfg.device, cfg.overrides,
              scorer=cfg.scorer, dino=cfg.dino, clip=cfg.clip, teacher_model=cfg.teacher_model)


def _model_identity(cfg: RunConfig) -> str:
    """The model id this cell's run records (Backbone.identity), found without loading the weights."""
    from dopsd_bench.backbones import backbone_identity

    return backbone_identity(cfg.backbone, cfg.model)


def _features(cfg: RunConfig, data, resolution: int, device: torch.device):
    """The scorer's feature extractor for `data` on a backbone sampling at `resolution` (the cell's --scorer,
    --dino, --clip; metrics.features.choose_scorer)."""
    from dopsd_bench.metrics.evaluate import features_for_task

    return features_for_task(data, scorer=cfg.scorer, resolution=resolution, dino=cfg.dino, clip=cfg.clip,
                             extra_fd=cfg.extra_fd, device=device)


def _scorer_record(cfg: RunConfig, data, resolution: int) -> dict:
    """What scored the cell (metrics.features.scorer_record), as result.json records it."""
    from dopsd_bench.metrics.features import scorer_record

    return scorer_record(cfg.scorer, data.source, resolution, cfg.dino, cfg.clip)


def _evaluate(backbone, data, method, features, cache_dir: Path, timings: dict, **kwargs) -> dict:
    from dopsd_bench.metrics.evaluate import evaluate

    return evaluate(backbone, data, method, features=features, cache_dir=cache_dir, timings=timings, **kwargs)


# ---- sampling helpers ---------------------------------------------------------------------------------------
class _Recorder:
    """Wraps a method for evaluate(): keeps the text-only samples it draws, one per (prompt, seed, steps), so the
    grid needs no second sampling whatever batches evaluate drew them in."""

    def __init__(self, method: Method):
        self._method = method
        self.samples: dict[tuple, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def sample(self, prompts, seeds, steps=None, references=None) -> torch.Tensor:
        out = self._method.sample(prompts, seeds, steps, references)
        if references is None:
            for prompt, seed, image in zip(prompts, seeds, out.detach().cpu()):
                self.samples[(prompt, int(seed), steps)] = image
        return out

    def recorded(self, prompts, seeds, steps) -> torch.Tensor | None:
        """The samples of (prompts, seeds) at `steps`, if all were drawn."""
        keys = [(p, int(s), steps) for p, s in zip(prompts, seeds)]
        if not keys or any(k not in self.samples for k in keys):
            return None
        return torch.stack([self.samples[k] for k in keys])


class _CachedUntuned(Method):
    """The untuned model, sampled through evaluate()'s cache: scoring the `base` row re-uses the untuned samples
    that scoring the run has just cached, instead of sampling them again."""

    name = "base"
    trains = False
    adapter = None

    def __init__(self, backbone, cache_dir: Path, weights_changed: bool):
        super().__init__()
        from dopsd_bench.metrics.cache import SampleCache

        self.backbone, self.weights_changed = backbone, weights_changed
        self.cache = SampleCache(cache_dir, backbone)

    def sample(self, prompts, seeds, steps=None, references=None) -> torch.Tensor:
        steps = steps or self.backbone.native_steps

        def compute() -> torch.Tensor:
            if self.weights_changed:
                raise RuntimeError("the untuned samples were not cached before the full fine-tune changed the "
                                   "weights; this is a bug in the runner's pre-training cache fill")
            self.backbone.set_adapter(None)
            return self.backbone.sample(prompts, seeds, steps, references=references).detach().cpu()

        kind = "sample" if references is None else "teacher_sample"
        return self.cache.get_or_compute(kind, list(prompts), list(seeds), steps, references, compute)


def _prefill_untuned(backbone, data, cache_dir: Path, batch_size: int | None = None) -> None:
    """Before a full fine-tune: cache every untuned output scoring and the base row will ask for."""
    from dopsd_bench.metrics.evaluate import _in_batches, prepare_untuned

    prepare_untuned(backbone, data, cache_dir=cache_dir, batch_size=batch_size)
    # in the batches every reader samples them (the base row, the grid, a sequence's untuned fidelity): the same keys
    untuned = _CachedUntuned(backbone, cache_dir, weights_changed=False)
    _in_batches(lambda p, s, _: untuned.sample(p, s), data.eval_prompts, data.eval_seeds, None, batch_size)


def _tiles(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 tiles of a readable size (tiny 32 px renders are enlarged without blurring)."""
    size = images.shape[-1]
    if size < 128:
        images = F.interpolate(images.float(), scale_factor=max(1, 128 // size), mode="nearest")
    elif size > 256:
        images = F.interpolate(images.float(), size=(256, 256), mode="bilinear", antialias=True)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def samples_grid(rows: list[torch.Tensor], pad: int = 2) -> bytes:
    """PNG bytes of a grid: one row per image set (B, 3, H, W) in [-1, 1], at most GRID_COLUMNS per row."""
    from PIL import Image

    tiles = [_tiles(r[:GRID_COLUMNS].detach().cpu()) for r in rows if r.shape[0]]
    if not tiles:
        raise ValueError("samples_grid needs at least one non-empty row of images")
    h, w = tiles[0].shape[-2:]
    cols = max(t.shape[0] for t in tiles)
    grid = torch.full((3, len(tiles) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = img
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


# ---- the comparison table -----------------------------------------------------------------------------------
def _mean(metrics: dict, name: str) -> float | None:
    entry = metrics.get(name)
    return float(entry["mean"]) if isinstance(entry, dict) and isinstance(entry.get("mean"), (int, float)) else None


def comparison_table(result: dict, base: dict | None, base_source: str):
    """A rich Table of the headline metrics: this run vs. the untuned model, with the better direction marked."""
    from rich.table import Table

    metrics = result["metrics"]
    title = f"{result['method']} on {result['task']}/{result['instance']} ({result['backbone']}, seed {result['seed']})"
    table = Table(title=title, caption=f"base row: {base_source}")
    for col in ("metric", "better", "run", "base", "delta"):
        table.add_column(col, justify="left" if col in ("metric", "better") else "right")
    from dopsd_bench.metrics.info import headline_metrics  # the specs' `headline` positions

    for name in headline_metrics():
        run = _mean(metrics, name)
        if run is None:
            continue
        ref = _mean(base, name) if base is not None else None
        higher = bool(metrics[name].get("higher_is_better", True))
        delta = "" if ref is None else f"{run - ref:+.4f}"
        if ref is not None and abs(run - ref) > 1e-12:
            delta = f"[{'green' if (run > ref) == higher else 'red'}]{delta}[/]"
        table.add_row(name, "higher" if higher else "lower", f"{run:.4f}", "" if ref is None else f"{ref:.4f}",
                      delta)
    return table


def _base_row(cfg: RunConfig, method_name: str, metrics: dict, backbone, data, features, cache_dir: Path,
              weights_changed: bool, timings: dict, batch_size: int | None = None) -> tuple[dict, str]:
    """The untuned model's metrics for the table: this run (if it is base), the base cell if done, or scored now."""
    if method_name == "base":
        return metrics, "this run"
    # the base cell of the same budget (as a sweep names it), else of the default budget: base trains nothing
    same = dataclasses.replace(cfg, method="base", overrides={}, lora=None, force=False, resume=False)
    default = dataclasses.replace(same, steps=None, budget_flops=None, budget_seconds=None, batch_size=None, lr=None,
                                  rank=None)
    for base_cfg in (same, default):
        state, done = rundir.cell_state(base_cfg.run_dir(), backbone.model_id)
        if state == "done":
            return done["metrics"], str(base_cfg.run_dir())
    t = time.perf_counter()
    # the table shows no step curve: scoring the native step count alone saves most of the base row's time
    base = _evaluate(backbone, data, _CachedUntuned(backbone, cache_dir, weights_changed), features, cache_dir, {},
                     step_curve=(backbone.native_steps,), batch_size=batch_size)
    timings["base_s"] = time.perf_counter() - t
    return base, "untuned model, scored now from cached samples"


# ---- the cell -----------------------------------------------------------------------------------------------
def _prepare_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """An incomplete cell: drop a partial result first, so a failure below leaves no result.json. A forced cell runs in
    a fresh staging dir (`_staging_dir`) and replaces the finished one only once its own result is written."""
    if cfg.force:
        shutil.rmtree(run_dir, ignore_errors=True)  # a staging dir a failed forced run left behind
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rundir.RESULT_FILE).unlink(missing_ok=True)


def _staging_dir(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.forced")


def _config_record(cfg: RunConfig, method: Method | None, tcfg: TrainConfig | None, extra: dict) -> dict:
    return {"run": cfg.to_dict(),
            "method": None if method is None else {"name": method.name, "class": type(method).__qualname__,
                                                   "config": dataclasses.asdict(method.config)},
            "train": None if tcfg is None else dataclasses.asdict(tcfg), **extra}


def run_cell(cfg: RunConfig) -> Path:
    """Train `cfg.method` on one task instance, score it, and write the run dir. Returns the run dir."""
    if cfg.lora is not None:
        raise ConfigError("`run` trains a new adapter; to score an existing LoRA use `dopsd-bench eval --lora PATH`")
    spec, instance = _task(cfg)
    cfg = dataclasses.replace(cfg, instance=instance)
    if spec.family == "sequence":  # continual tuning: the rounds' loop lives in its own module
        from dopsd_bench import continual

        return continual.run_sequence(cfg, spec)
    method = build_method(cfg.method, cfg.overrides)
    tcfg = train_config(cfg, method)
    return _run(cfg, method, tcfg, spec, label=method.name or cfg.method)


def eval_cell(cfg: RunConfig) -> Path:
    """Score an adapter trained elsewhere (cfg.lora: a diffusers-format LoRA file or folder) with the same protocol.

    The name is cfg.method when the caller set a label (`dopsd-bench eval --name`), else the LoRA's file or folder
    name; the run dir is that of method `eval-<name>`, and result.json's method is `eval:<name>`.
    """
    if cfg.lora is None:
        raise ConfigError("eval needs --lora PATH: a LoRA in the diffusers format (a .safetensors file or its folder)")
    lora = Path(cfg.lora)
    if not lora.exists():
        raise UserError(f"LoRA {lora} does not exist: expected a diffusers-format .safetensors file or a folder "
                        "holding pytorch_lora_weights.safetensors")
    name = cfg.method
    if name in GENERIC_EVAL_NAMES:
        name = lora.stem if lora.is_file() else lora.resolve().name
    spec, instance = _task(cfg)
    if spec.family == "sequence":
        raise ConfigError(f"eval scores one adapter on one task instance; {cfg.task!r} is a sequence of rounds: "
                          "give one of its rounds' tasks (e.g. --task concept --instance zorb)")
    cfg = dataclasses.replace(cfg, method=f"eval-{name}", instance=instance)
    return _run(cfg, None, None, spec, label=f"eval:{name}", lora=lora)


class _LoadedLora(Method):
    """An adapter loaded from disk as `student`: nothing trains, it is sampled like a tuned method."""

    name = "eval"
    trains = True  # so that scoring treats `student` as the tuned adapter
    adapter = "student"


def _check_writable(out: Path) -> None:
    """UserError unless results can be written under `out` (created if missing)."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: results cannot be written there ({e.strerror or e}); give a writable "
                        "folder") from None


def _finished(run_dir: Path, model_id: str, force: bool, console, say_stale: bool = True) -> bool:
    """Whether the cell has its result on these weights already (and is not forced to run again); says so."""
    state, done = rundir.cell_state(run_dir, model_id)
    if state == "done" and not force:
        console.print(f"{run_dir}: already done (complete result.json); use --force to run it again")
        return True
    if state == "stale" and say_stale:
        console.print(f"{run_dir}: its result.json was made on {done['model']}, the weights are now {model_id}: "
                      "running it again")
    return False


def _resumable(run_dir: Path) -> bool:
    """Whether a failed cell left something to continue from: a checkpoint, or a sequence's finished rounds."""
    from dopsd_bench.continual import has_rounds

    return bool(checkpoint_dirs(run_dir)) or has_rounds(run_dir)


def _run(cfg: RunConfig, method: Method | None, tcfg: TrainConfig | None, spec, label: str,
         lora: Path | None = None, body=None) -> Path:
    """Run one cell under its lock (the main process holds it; a second writer gets CellBusy, exit 2). `body` does
    the work under the lock (default `_run_locked`; a sequence passes its rounds' loop)."""
    body = body or _run_locked
    from rich.console import Console

    console = Console()
    t0 = time.perf_counter()
    check_device(cfg.device)  # before anything is touched
    _check_writable(Path(cfg.out_dir))
    run_dir = cfg.run_dir()
    model_id = _model_identity(cfg)
    if _finished(run_dir, model_id, cfg.force, console):
        return run_dir
    if spec.family != "sequence":  # a sequence checks its rounds' cells as each one runs
        _preflight(cfg, method)
    accelerator = make_accelerator(cfg.device)
    if not accelerator.is_main_process:
        return body(cfg, method, tcfg, spec, label, lora, accelerator, console, t0)
    with rundir.cell_lock(run_dir, say=console.print):
        if _finished(run_dir, model_id, cfg.force, console, say_stale=False):  # finished by another process meanwhile
            return run_dir
        staging = _staging_dir(run_dir)
        existed = run_dir.exists()
        rundir.remove_dead_writers_temps(run_dir)  # ours under the lock: only a killed run can have left them
        try:
            return body(cfg, method, tcfg, spec, label, lora, accelerator, console, t0)
        except BaseException as e:
            if not existed and not _resumable(run_dir):  # nothing to resume from: leave no trace
                shutil.rmtree(run_dir, ignore_errors=True)
            # a full disk where no atomic write named its file (the training log, a LoRA save): name the file if
            # the error does, else the run dir
            full = rundir.no_space_error(e, getattr(e, "filename", None) or run_dir)
            if full is not None and full is not e:
                raise full from e
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a failed forced run: the finished cell stays as it was


def _run_locked(cfg: RunConfig, method: Method | None, tcfg: TrainConfig | None, spec, label: str,
                lora: Path | None, accelerator, console, t0: float) -> Path:
    final_dir = cfg.run_dir()
    run_dir = _staging_dir(final_dir) if cfg.force else final_dir
    main = accelerator.is_main_process
    device = _device(cfg, accelerator)
    if main:
        _prepare_run_dir(run_dir, cfg)
    timings: dict[str, float] = {}
    dtype = resolve_dtype(cfg.dtype, device)
    eval_batch_size = cfg.eval_batch_size or default_eval_batch_size(device)
    if tcfg is not None:
        tcfg = dataclasses.replace(tcfg, precision=dtype)  # autocast to the weights' dtype; LoRA state stays fp32
    backbone = _load_backbone(cfg, device)
    data = spec.build(cfg.instance, cfg.seed, resolution=backbone.resolution)
    features = _features(cfg, data, backbone.resolution, device)
    timings["load_s"] = time.perf_counter() - t0
    cache_dir = Path(cfg.out_dir) / ".cache"
    backbone_info = _backbone_info(cfg, backbone, lora, dtype, eval_batch_size)
    if main:
        rundir.atomic_write_json(run_dir / rundir.CONFIG_FILE, _config_record(cfg, method, tcfg, backbone_info))

    # ---- train (or load the adapter) ------------------------------------------------------------------------
    if lora is None:
        weights_changed = method.changes_base_weights
        if weights_changed and main:
            _prefill_untuned(backbone, data, cache_dir, eval_batch_size)
        batch = Batch(images=data.train_images, captions=list(data.train_captions), token=data.token)
        train_t = train(method, backbone, batch, tcfg, run_dir, resume=cfg.resume, accelerator=accelerator)
        adapter_saved = _save_adapter(backbone, method, run_dir) if main else False
    else:
        weights_changed, adapter_saved = False, False
        method = _load_adapter(cfg, backbone, lora)
        train_t = {"train_s": 0.0, "step_s": 0.0, "steps_run": 0}
    if not main:
        return final_dir
    timings.update({k: float(train_t[k]) for k in ("train_s", "setup_s", "step_s") if k in train_t})

    # ---- sample + score -------------------------------------------------------------------------------------
    recorder = _Recorder(method)
    metrics = _score(backbone, data, recorder, features, cache_dir, timings, eval_batch_size, console)
    base, base_source = _base_row(cfg, label, metrics, backbone, data, features, cache_dir, weights_changed, timings,
                                  batch_size=eval_batch_size)
    grid = _grid_rows(method, recorder, backbone, data, cache_dir, weights_changed, eval_batch_size)
    rundir.atomic_write_bytes(run_dir / rundir.SAMPLES_FILE, samples_grid(grid))
    if data.train_images.shape[0]:  # after scoring, so no metric can depend on it
        teacher = _teacher_rows(method, backbone, data, cache_dir, weights_changed)
        rundir.atomic_write_bytes(run_dir / TEACHER_SAMPLES_FILE, samples_grid(teacher))

    # ---- write ----------------------------------------------------------------------------------------------
    result = _result_record(cfg, label, method, tcfg, data, backbone_info, metrics, timings, train_t, device,
                            adapter_saved, t0).to_json()
    rundir.atomic_write_json(run_dir / rundir.RESULT_FILE, result)  # last: its presence means the cell is complete
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # the adapter is saved; resume state is not needed
    if run_dir != final_dir:  # a forced run: its complete dir replaces the finished one
        rundir.replace_dir(run_dir, final_dir)
    _say_done(console, result, base, base_source, final_dir)
    return final_dir


def _backbone_info(cfg: RunConfig, backbone, lora: Path | None, dtype: str, eval_batch_size: int | None) -> dict:
    """The model, adapter and precision a cell runs with, as config.json and result.json record them."""
    return {"backbone": {"name": backbone.name, "model": getattr(backbone, "model_id", cfg.model),
                         "native_steps": backbone.native_steps, "resolution": backbone.resolution},
            "lora": None if lora is None else str(lora.resolve()),
            "precision": {"dtype": dtype, "adapter_dtype": "fp32", "autocast": dtype != "fp32",
                          "gradient_checkpointing": cfg.gradient_checkpointing,
                          "eval_batch_size": eval_batch_size}}


def _save_adapter(backbone, method: Method, run_dir: Path) -> bool:
    """Save the trained adapter into the run dir; False when the method trained none."""
    if not (method.trains and method.adapter is not None):
        return False
    with rundir.atomic_dir(run_dir / rundir.ADAPTER_DIR) as tmp:
        backbone.save_lora(tmp, method.adapter)
    return True


def _load_adapter(cfg: RunConfig, backbone, lora: Path) -> Method:
    """The LoRA from disk as the backbone's `student` adapter, sampled as a tuned method is."""
    try:
        backbone.load_lora(lora, "student")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load LoRA {lora} onto {cfg.backbone} ({cfg.model or 'default model'}): {e}; "
                        "expected a diffusers-format LoRA trained for this model") from e
    method = _LoadedLora()
    method.backbone = backbone
    return method


def _score(backbone, data, recorder: _Recorder, features, cache_dir: Path, timings: dict,
           eval_batch_size: int | None, console) -> dict:
    """Sample and score the tuned model (saying each phase as it starts); its sampling and scoring seconds go into
    `timings`."""
    eval_t: dict[str, float] = {}
    started = time.perf_counter()

    def phase(name: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s  {name}[/dim]", highlight=False)

    metrics = _evaluate(backbone, data, recorder, features, cache_dir, eval_t, progress=phase,
                        batch_size=eval_batch_size)
    timings["sample_s"] = sum(eval_t.get(k, 0.0) for k in ("sample_tuned", "teacher_tuned", "untuned"))
    timings["score_s"] = eval_t.get("score", 0.0)
    return metrics


def _grid_rows(method: Method, recorder: _Recorder, backbone, data, cache_dir: Path, weights_changed: bool,
               batch_size: int | None = None) -> list[torch.Tensor]:
    """samples.png's rows: the tuned model and the untuned one on the evaluation prompts, and the training images."""
    from dopsd_bench.metrics.evaluate import _in_batches

    native = backbone.native_steps
    tuned = recorder.recorded(data.eval_prompts, data.eval_seeds, native)
    if tuned is None:  # evaluate sampled in pieces or at other steps: draw the grid's row directly
        tuned = method.sample(data.eval_prompts[:GRID_COLUMNS], data.eval_seeds[:GRID_COLUMNS], native)
    cached = _CachedUntuned(backbone, cache_dir, weights_changed)  # read in the batches the cache was filled in
    untuned = _in_batches(lambda p, s, _: cached.sample(p, s, native), data.eval_prompts, data.eval_seeds, None,
                          batch_size)
    return [tuned, untuned, data.train_images]


def _teacher_rows(method: Method, backbone, data, cache_dir: Path, weights_changed: bool) -> list[torch.Tensor]:
    """teacher.png's rows (result.TEACHER_SAMPLES_ROWS): the reference images, then the in-context teacher (prompt +
    reference) of the untuned model and of the tuned one, on the evaluation prompts and seeds with the references
    scoring gave them. The untuned row comes from the sample cache scoring filled; the tuned row is drawn for the
    grid's prompts only, through the adapter scoring used as the tuned teacher."""
    from dopsd_bench.metrics.evaluate import student_adapter, teacher_adapter, teacher_is_untuned
    from dopsd_bench.metrics.teacher import references_for

    native, n = backbone.native_steps, GRID_COLUMNS
    refs = references_for(data.train_images, len(data.eval_prompts))
    before = _CachedUntuned(backbone, cache_dir, weights_changed).sample(data.eval_prompts, data.eval_seeds, native,
                                                                         references=refs)
    if teacher_is_untuned(method, backbone, weights_changed):
        return [refs, before, before]
    backbone.set_adapter(teacher_adapter(method, backbone))
    after = backbone.sample(data.eval_prompts[:n], data.eval_seeds[:n], native, references=refs[:n])
    backbone.set_adapter(student_adapter(method))
    return [refs, before, after]


def _result_record(cfg: RunConfig, label: str, method: Method, tcfg: TrainConfig | None, data, backbone_info: dict,
                   metrics: dict, timings: dict, train_t: dict, device, adapter_saved: bool, t0: float) -> Result:
    """result.json's content (its total time is taken now)."""
    # a method that trains nothing (base, icl) has no budget, so its rows pair with every budget
    trained = tcfg is not None and getattr(method, "trains", False)
    timings["total_s"] = time.perf_counter() - t0
    return Result(
        method=label, task=data.task, instance=data.instance, family=data.family, backbone=cfg.backbone,
        model=backbone_info["backbone"]["model"], seed=cfg.seed, budget=tcfg.budget() if trained else no_budget(),
        # what the training spent, whatever unit its budget was in
        cost={k: train_t.get(k) for k in COST_KEYS} if trained else None,
        metrics=metrics, timings=timings,
        training={k: train_t.get(k) for k in ("steps_run", "start_step", "final_loss")},
        env=rundir.env_info(device), scorer=_scorer_record(cfg, data, backbone_info["backbone"]["resolution"]),
        samples_rows=["tuned (eval prompts, native steps)", "untuned (same prompts and seeds)", "training images"],
        adapter=rundir.ADAPTER_DIR if adapter_saved else None, precision=backbone_info["precision"])


def _say_done(console, result: dict, base: dict | None, base_source: str, final_dir: Path) -> None:
    """The closing comparison table, the training cost and where the run dir is."""
    console.print(comparison_table(result, base, base_source))
    cost, timings = result["cost"], result["timings"]
    if cost is not None:
        console.print(f"training cost: {cost['train_steps']} steps, {cost['train_flops']:.4g} FLOPs "
                      f"({cost['flops_per_step']:.4g} per step), {cost['train_seconds']:.1f} s")
    console.print(f"run dir: {final_dir}  (train {timings.get('train_s', 0):.1f}s, sample {timings['sample_s']:.1f}s, "
                  f"score {timings['score_s']:.1f}s, total {timings['total_s']:.1f}s)")
