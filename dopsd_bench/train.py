"""The one training loop every method goes through: same optimiser, budget, clipping, logging and checkpoints.

A method supplies `setup`, `trainable_parameters`, `loss(batch, generator)` (through `loss_and_backward`, which
may split the backward to free memory early), `after_step(step)` and `finish()`; everything else is here,
which is what makes a comparison between methods a comparison of objectives (DESIGN.md, "Methods").

Randomness: minibatches come from a seeded CPU `torch.Generator`, and `method.loss` gets its own seeded CPU
generator (draw on the CPU, then move to the device, as `Backbone.noise` does). Both, the global torch RNG, the
trainable state (all LoRA weights of the denoiser, so an EMA teacher adapter is included), the optimiser and the
lr schedule are checkpointed, so `resume=True` continues bit-exactly. A method with more state than its
parameters may define `state_dict()` / `load_state_dict(state)`; they are checkpointed too.

Multi-GPU: run under `accelerate launch` (on CPUs, `torchrun --nproc_per_node N`: gloo); each process draws its own
minibatches, gradients are averaged across processes before clipping, and only the main process writes files.
Gradient accumulation (`grad_accum` = A) runs A minibatches per process before each optimiser step, the j-th of
process p drawn from the random streams of virtual process p * A + j: P processes with A = 1 and one process with
A = P therefore train on the same examples and noise, and end at the same weights up to float rounding.

    python -c "from dopsd_bench.train import TrainConfig; print(TrainConfig(steps=2))"
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import pickle
import random
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dopsd_bench.backbones.base import Backbone
from dopsd_bench.cost import step_flops, steps_for_flops
from dopsd_bench.errors import ConfigError
from dopsd_bench.method import Batch, Method
from dopsd_bench.rundir import atomic_torch_save, atomic_write_bytes, atomic_write_text

# The suite's default budget, shared by every method so comparisons are matched. One place to tune it.
DEFAULT_BUDGET: dict[str, float | int] = {"steps": 600, "batch_size": 8, "lr": 5e-4, "rank": 8}

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_FILE = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"
DIGEST_FILE = "digests.json"  # sha256 of each file of a checkpoint, checked when it is read
clock = time.perf_counter  # the loop's time source for its seconds and a seconds budget (tests put a fake clock here)
# fields that must match between a checkpoint and the config resuming from it (steps may grow)
_RESUME_MUST_MATCH = ("batch_size", "lr", "rank", "grad_clip", "weight_decay", "warmup", "seed", "grad_accum")


@dataclass
class TrainConfig:
    steps: int | None = int(DEFAULT_BUDGET["steps"])  # None with a budget in FLOPs or seconds: the loop sets it
    batch_size: int = int(DEFAULT_BUDGET["batch_size"])
    lr: float = float(DEFAULT_BUDGET["lr"])
    rank: int = int(DEFAULT_BUDGET["rank"])
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    weight_decay: float = 0.0
    warmup: int = 0  # linear lr warm-up steps
    checkpoint_every: int = 50  # 0 turns checkpoints off; the last step is always checkpointed when on
    seed: int = 0
    # the forward pass's compute dtype under autocast ("fp32": no autocast); trainable weights and optimiser state
    # stay fp32 whatever it is (mixed precision), and "fp16" adds a gradient scaler
    precision: str = "fp32"
    # the budget in cost instead of steps (at most one): training FLOPs become a step count before the first step;
    # wall seconds of the loop are checked after every step (steps is then not used)
    budget_flops: float | None = None
    budget_seconds: float | None = None
    grad_accum: int = 1  # minibatches per optimiser step and process (the global batch: batch x processes x this)

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 0 if self.steps is not None else self.budget_flops or self.budget_seconds,
             "an integer >= 0 (None only with budget_flops or budget_seconds)"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("grad_accum", self.grad_accum >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a number > 0"),
            ("rank", self.rank >= 1, "an integer >= 1"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 = no clipping)"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("warmup", self.warmup >= 0, "an integer >= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "an integer >= 0 (0 = no checkpoints)"),
            *((name, value is None or (math.isfinite(value) and value > 0), "a finite number > 0")
              for name, value in (("budget_flops", self.budget_flops), ("budget_seconds", self.budget_seconds))),
        ]
        checks.append(("precision", self.precision in AUTOCAST_DTYPES, f"one of {', '.join(AUTOCAST_DTYPES)}"))
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"training budget: {name} must be {expected}, got {getattr(self, name)!r}; "
                                 f"fix the --{name.replace('_', '-')} value")
        if self.budget_flops is not None and self.budget_seconds is not None:
            raise ConfigError("training budget: give budget_flops or budget_seconds, not both")

    def budget(self) -> dict:
        """The budget as result.json records it: steps, or the FLOPs / seconds asked for (steps then None)."""
        cost = {k: v for k, v in (("budget_flops", self.budget_flops), ("budget_seconds", self.budget_seconds))
                if v is not None}
        accum = {"grad_accum": self.grad_accum} if self.grad_accum != 1 else {}  # labels without it stay as they were
        return {"steps": None if cost else self.steps, **cost, "batch_size": self.batch_size, "lr": self.lr,
                "rank": self.rank, **accum}


class MixedPrecision:
    """Autocast of the training forward pass to `precision` (bf16/fp16) on `device`, with a gradient scaler for
    fp16; "fp32" turns both off. Hand-rolled rather than accelerate's `mixed_precision`, which is fixed once per
    process (its AcceleratorState), while one process may run cells of several precisions (a sweep, the tests)."""

    def __init__(self, precision: str, device: torch.device):
        self.device_type = torch.device(device).type
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, backward):
        """`backward` (loss -> None) run outside autocast, on the scaled loss under fp16."""
        def run(loss: torch.Tensor) -> None:
            with torch.autocast(self.device_type, enabled=False):
                backward(self.scaler.scale(loss) if self.scaler is not None else loss)
        return run

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        """The optimiser step (skipped by the fp16 scaler when a gradient overflowed)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def make_accelerator(device: str | torch.device | None = None) -> Accelerator:
    """An Accelerator on the CPU when asked for (or when there is no GPU); we place tensors ourselves."""
    cpu = (torch.device(device).type == "cpu") if device is not None else not torch.cuda.is_available()
    return Accelerator(cpu=cpu, device_placement=False)


def seed_for(seed: int, stream: str, process: int = 0) -> int:
    """Independent, reproducible seeds for named random streams (and per process under multi-GPU)."""
    return zlib.crc32(f"{seed}/{stream}/{process}".encode())


def minibatch_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random minibatch: without replacement when the set is large enough, with replacement otherwise."""
    if batch_size <= n:
        return torch.randperm(n, generator=generator)[:batch_size]
    return torch.randint(n, (batch_size,), generator=generator)


# ---- checkpoints --------------------------------------------------------------------------------------------
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with their state.pt in place), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [d for d in root.glob("step_*") if d.is_dir() and (d / "state.pt").exists()]
    return sorted(done, key=lambda d: int(d.name.split("_")[1]))


def _param_state(method: Method, backbone: Backbone, params: list[torch.nn.Parameter]) -> dict:
    """Every LoRA weight of the denoiser and every trainable parameter, by name, so EMA adapters come along."""
    trainable = {id(p) for p in params}
    named = {n: p for n, p in backbone.denoiser.named_parameters() if "lora_" in n or id(p) in trainable}
    known = {id(p) for p in named.values()}
    loose = [p for p in params if id(p) not in known]  # trainable tensors outside the denoiser
    return {"named": {n: p.detach().cpu().clone() for n, p in named.items()},
            "loose": [p.detach().cpu().clone() for p in loose]}


def _load_param_state(state: dict, backbone: Backbone, params: list[torch.nn.Parameter]) -> None:
    named = dict(backbone.denoiser.named_parameters())
    missing = [n for n in state["named"] if n not in named]
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks ({missing[:3]}...): it was written for "
                         "another method or backbone; use a fresh run dir or --force")
    with torch.no_grad():
        for n, t in state["named"].items():
            named[n].copy_(t)
        known = {id(p) for p in named.values()}
        loose = [p for p in params if id(p) not in known]
        for p, t in zip(loose, state["loose"], strict=True):
            p.copy_(t)


def _rng_state(data_gens: list[torch.Generator], loss_gens: list[torch.Generator]) -> dict:
    state = {"data": [g.get_state() for g in data_gens], "loss": [g.get_state() for g in loss_gens],
             "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, data_gens: list[torch.Generator], loss_gens: list[torch.Generator]) -> None:
    for gens, key in ((data_gens, "data"), (loss_gens, "loss")):
        saved_states = [state[key]] if isinstance(state[key], torch.Tensor) else state[key]  # one stream, as before
        for gen, saved in zip(gens, saved_states, strict=True):
            gen.set_state(saved)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict, rng: dict, accelerator: Accelerator) -> Path:
    """Write checkpoints/step_N atomically (temp dir, then rename); keep only the newest."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        atomic_torch_save(rng, tmp / f"rng_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            atomic_torch_save(state, tmp / "state.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            digests = {f.name: _file_digest(f) for f in sorted(tmp.glob("*.pt"))}
            atomic_write_bytes(tmp / DIGEST_FILE, json.dumps(digests, indent=1).encode())
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
    except BaseException:  # e.g. a full disk: leave no half-written checkpoint behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in checkpoint_dirs(run_dir):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CorruptCheckpoint(Exception):
    """A checkpoint whose files are unreadable or not the bytes they were written as."""


def load_checkpoint(path: Path, process_index: int) -> tuple[dict, dict]:
    rng_path = path / f"rng_{process_index}.pt"
    if not rng_path.exists():
        raise ValueError(f"checkpoint {path} has no RNG state for process {process_index}: resume with the same "
                         "number of processes it was written with, or start over with --force")
    try:
        digests = json.loads((path / DIGEST_FILE).read_text()) if (path / DIGEST_FILE).exists() else {}
        for name, digest in digests.items():
            if _file_digest(path / name) != digest:
                raise CorruptCheckpoint(f"{path / name} is not the file that was written (its digest differs)")
        return torch.load(path / "state.pt", weights_only=True), torch.load(rng_path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CorruptCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") from e


def _newest_checkpoint(ckpts: list[Path], process_index: int, main: bool, say) -> tuple[dict | None, dict | None]:
    """The newest checkpoint's (state, rng); a corrupt one is named and removed, and the cell starts over."""
    if not ckpts:
        return None, None
    try:
        return load_checkpoint(ckpts[-1], process_index)
    except CorruptCheckpoint as e:
        say(f"checkpoint {e}; removing it and training from the start")
        if main:
            shutil.rmtree(ckpts[-1], ignore_errors=True)
        return None, None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if (logged := _logged_step(line)) is not None
            and logged <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    """The step of a log line; None for a line cut short (a kill or a full disk mid-write, so past any checkpoint)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _check_resumable(state: dict, cfg: TrainConfig, path: Path) -> None:
    if cfg.budget_seconds is None and int(state["step"]) > cfg.steps:
        raise ValueError(f"cannot resume from {path}: it is at step {state['step']}, past --steps {cfg.steps}; "
                         "raise --steps, or --force to start over")
    saved = {"grad_accum": 1, **state["config"]}  # checkpoints from before accumulation existed
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in _RESUME_MUST_MATCH if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise ValueError(f"cannot resume from {path}: the budget changed ({diff}, as checkpoint vs now); "
                         "use the same budget, or --force to start over")


# ---- the loop -----------------------------------------------------------------------------------------------
def _progress(disable: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[its]:.2f} it/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=disable)


def _sync_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average gradients over processes (the model is not DDP-wrapped: methods call the backbone directly)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train(method: Method, backbone: Backbone, train_batch: Batch, cfg: TrainConfig, run_dir: str | Path,
          resume: bool = False, accelerator: Accelerator | None = None) -> dict:
    """Set the method up and train it for its budget. Returns timings, the final loss and the cost spent.

    The budget is cfg.steps optimiser steps, or cfg.budget_flops training FLOPs (one step is counted first, by
    dopsd_bench.cost.step_flops, and the budget becomes floor(budget / FLOPs per step) steps, at least 1), or
    cfg.budget_seconds of the loop's wall time (checked after every step: the step that reaches the budget is the
    last). Every run counts one step's FLOPs, so the FLOPs spent (steps x FLOPs per step) are known whatever the
    budget. A resumed run continues its checkpoint's clock: a seconds budget covers the loop time of the steps the
    final adapter holds, summed over attempts (steps lost past the last checkpoint are run again and their first
    run's time is not counted; loading, setup and the FLOP count are never counted).

    Writes run_dir/train_log.jsonl (one line per step: step, loss, lr, grad_norm, time) and, every
    cfg.checkpoint_every steps and at the last step, run_dir/checkpoints/step_N. With `resume`, continues from
    the newest checkpoint (bit-exactly); without it, earlier checkpoints and logs in run_dir are discarded.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    accelerator = accelerator or make_accelerator(backbone.device)

    set_seed(cfg.seed)  # the same on every process, so every process attaches the same initial adapter
    method.setup(backbone, train_batch, cfg.rank, torch.Generator().manual_seed(seed_for(cfg.seed, "setup")))
    setup_s = time.perf_counter() - t0
    if not method.trains or cfg.steps == 0:
        return {"train_s": time.perf_counter() - t0, "setup_s": setup_s, "step_s": 0.0, "steps_run": 0,
                "start_step": 0, "final_loss": None, "train_steps": 0, "train_flops": 0, "flops_per_step": None,
                "train_seconds": 0.0}

    loop = _start_loop(method, backbone, cfg, accelerator)
    train_set = _on_device(train_batch, backbone.device)
    flops_per_step = _count_step_flops(loop, train_set, cfg)
    if cfg.budget_flops is not None:
        cfg = dataclasses.replace(cfg, steps=steps_for_flops(cfg.budget_flops, flops_per_step))
        accelerator.print(f"FLOP budget {cfg.budget_flops:.4g} at {flops_per_step:.4g} FLOPs per step "
                          f"(counted on one step): {cfg.steps} steps, {cfg.steps * flops_per_step:.4g} FLOPs")
    start, loss_value, earlier_loop_s = _restore_or_start_over(loop, cfg, run_dir, resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _say_start(loop, cfg, start, earlier_loop_s)
    done, elapsed, loss_value = _run_steps(loop, train_set, cfg, run_dir, start, loss_value, earlier_loop_s)

    # to the end of the last step, as its checkpoint records it: a resume from the final checkpoint reports the same
    train_seconds = earlier_loop_s + elapsed
    method.finish()
    # a resumed run's step time covers every step (the checkpoint's record holds the earlier ones' time)
    return {"train_s": time.perf_counter() - t0, "setup_s": setup_s,
            "step_s": train_seconds / done if done else 0.0, "steps_run": done - start,
            "start_step": start, "final_loss": loss_value, "train_steps": done, "train_flops": done * flops_per_step,
            "flops_per_step": flops_per_step, "train_seconds": train_seconds}


@dataclass
class _Loop:
    """What every step uses and every checkpoint saves: the method on its backbone, its trainable parameters, their
    optimiser, lr schedule and mixed-precision state, and the minibatch and loss random streams."""

    method: Method
    backbone: Backbone
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp: MixedPrecision
    data_gens: list[torch.Generator]  # one minibatch stream per accumulated minibatch
    loss_gens: list[torch.Generator]
    accelerator: Accelerator

    @property
    def model_id(self) -> str | None:
        return getattr(self.backbone, "model_id", None)


def _start_loop(method: Method, backbone: Backbone, cfg: TrainConfig, accelerator: Accelerator) -> _Loop:
    """The optimiser, schedule, mixed precision and random streams for the method's trainable parameters."""
    params = list(method.trainable_parameters())
    if not params:
        raise ValueError(f"method {method.name!r} trains but has no trainable parameters: its setup() must attach "
                         "an adapter (or unfreeze weights) before training")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    # only the optimiser is prepared: a prepared scheduler steps once per process, which would shorten warm-up
    optimizer = accelerator.prepare(optimizer)
    amp = MixedPrecision(cfg.precision, backbone.device)
    virtual = [accelerator.process_index * cfg.grad_accum + j for j in range(cfg.grad_accum)]
    data_gens = [torch.Generator().manual_seed(seed_for(cfg.seed, "data", v)) for v in virtual]
    loss_gens = [torch.Generator().manual_seed(seed_for(cfg.seed, "loss", v)) for v in virtual]
    return _Loop(method, backbone, params, optimizer, scheduler, amp, data_gens, loss_gens, accelerator)


def _on_device(train_batch: Batch, device: torch.device) -> Batch:
    """The training set with its images on `device`, checked to pair every image with a caption."""
    images = train_batch.images.to(device)
    captions = list(train_batch.captions)
    if len(captions) != images.shape[0] or images.shape[0] == 0:
        raise ValueError(f"training set: expected as many captions as images (> 0), got {images.shape[0]} images "
                         f"and {len(captions)} captions")
    return Batch(images=images, captions=captions, token=train_batch.token)


def _minibatch(train_set: Batch, batch_size: int, generator: torch.Generator) -> Batch:
    images, captions = train_set.images, train_set.captions
    idx = minibatch_indices(len(captions), batch_size, generator)
    return Batch(images=images[idx.to(images.device)], captions=[captions[i] for i in idx.tolist()],
                 token=train_set.token)


def _count_step_flops(loop: _Loop, train_set: Batch, cfg: TrainConfig) -> float:
    """One step's FLOPs, counted once (shapes fix them): every process runs such a pass per accumulated minibatch,
    so a step costs their sum."""
    count_gen = torch.Generator().manual_seed(seed_for(cfg.seed, "flops", loop.accelerator.process_index))
    batch = _minibatch(train_set, cfg.batch_size, count_gen)
    return loop.accelerator.num_processes * cfg.grad_accum * step_flops(loop.method, batch, count_gen)


def _checkpoint_to_resume(loop: _Loop, run_dir: Path, resume: bool) -> tuple[Path | None, dict | None, dict | None]:
    """The newest usable checkpoint (its path, state and RNG state), or three Nones to start over."""
    accelerator = loop.accelerator
    ckpts = checkpoint_dirs(run_dir) if resume else []
    state, rng = _newest_checkpoint(ckpts, accelerator.process_index, accelerator.is_main_process, accelerator.print)
    if state is None:
        return None, None, None
    if state.get("model", loop.model_id) != loop.model_id:
        # as a finished cell made on other weights is re-run, so is an unfinished one: its state is theirs
        accelerator.print(f"{ckpts[-1]} was written on {state['model']}, not {loop.model_id}: starting over")
        return None, None, None
    return ckpts[-1], state, rng


def _restore_or_start_over(loop: _Loop, cfg: TrainConfig, run_dir: Path, resume: bool
                           ) -> tuple[int, float | None, float]:
    """Continue from the newest checkpoint (with `resume`) or clear an earlier attempt's files. Returns the step to
    start from, the loss and the loop seconds the steps before it measured."""
    main = loop.accelerator.is_main_process
    log_path = run_dir / LOG_FILE
    start, loss_value, earlier_loop_s = 0, None, 0.0
    path, state, rng = _checkpoint_to_resume(loop, run_dir, resume)
    if state is not None:
        _check_resumable(state, cfg, path)
        _load_param_state(state["params"], loop.backbone, loop.params)
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        if loop.amp.scaler is not None and state.get("scaler") is not None:
            loop.amp.scaler.load_state_dict(state["scaler"])
        if state.get("method") is not None and hasattr(loop.method, "load_state_dict"):
            loop.method.load_state_dict(state["method"])
        _set_rng_state(rng, loop.data_gens, loop.loss_gens)
        start = int(state["step"])
        record = state.get("record", {})  # what the steps before the checkpoint measured
        loss_value, earlier_loop_s = record.get("loss"), record.get("loop_s", 0.0)
        if main:
            _truncate_log(log_path, start)
    elif main:
        # a fresh start: stale checkpoints or logs from an earlier attempt must not be mixed in
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    loop.accelerator.wait_for_everyone()
    return start, loss_value, earlier_loop_s


def _say_start(loop: _Loop, cfg: TrainConfig, start: int, earlier_loop_s: float) -> None:
    method, accelerator = loop.method, loop.accelerator
    n_params = sum(p.numel() for p in loop.params)
    until = (f"{cfg.budget_seconds:g} s of training ({earlier_loop_s:.1f} s spent)"
             if cfg.budget_seconds is not None else str(cfg.steps))
    accelerator.print(f"training {method.name or type(method).__name__}: {n_params:,} trainable parameters, "
                      f"steps {start}->{until}, batch {cfg.batch_size} x {accelerator.num_processes} "
                      f"process(es){f' x {cfg.grad_accum} accumulated' if cfg.grad_accum > 1 else ''}, "
                      f"lr {cfg.lr:g}, rank {cfg.rank}")


def _run_steps(loop: _Loop, train_set: Batch, cfg: TrainConfig, run_dir: Path, start: int, loss_value: float | None,
               earlier_loop_s: float) -> tuple[int, float, float | None]:
    """The optimiser steps from `start` to the budget, logged and checkpointed. Returns the steps done by the end,
    this attempt's loop seconds and the last loss."""
    accelerator = loop.accelerator
    main = accelerator.is_main_process
    seconds = cfg.budget_seconds
    if seconds is None:
        steps_ahead = range(start, cfg.steps)
    else:  # open-ended: the step that reaches the budget is the last (none when the checkpoint had reached it)
        steps_ahead = itertools.count(start) if earlier_loop_s < seconds else range(0)
    done, elapsed = start, 0.0
    t_loop = clock()
    with _progress(disable=not main) as progress, open(run_dir / LOG_FILE, "a") if main else _null() as log:
        bar = progress.add_task("train", total=cfg.steps if seconds is None else None, completed=start,
                                loss=float("nan"), its=0.0)
        for step in steps_ahead:
            lr = loop.optimizer.param_groups[0]["lr"]
            loss, grad_norm = _train_step(loop, train_set, cfg, step)
            done = step + 1
            loop.method.after_step(done)  # the number of optimiser steps taken so far (1-based)

            reduced = accelerator.reduce(loss.detach(), reduction="mean") if accelerator.num_processes > 1 else loss
            loss_value = float(reduced.item())
            elapsed = clock() - t_loop
            out_of_time = seconds is not None and _spent(earlier_loop_s + elapsed, accelerator) >= seconds
            if main:
                log.write(json.dumps({"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                                      "time": round(elapsed, 4)}) + "\n")
                log.flush()
            progress.update(bar, advance=1, loss=loss_value, its=(done - start) / max(elapsed, 1e-9))
            last = out_of_time or (seconds is None and done == cfg.steps)
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or last):
                record = {"loss": loss_value, "loop_s": earlier_loop_s + elapsed}
                _save_loop_checkpoint(loop, cfg, run_dir, done, record)
            if out_of_time:
                break
    return done, elapsed, loss_value


def _train_step(loop: _Loop, train_set: Batch, cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step: per accumulated minibatch of `train_set`, the method's loss and backward (of the loss over
    the number of minibatches); gradients averaged over processes, clipped, stepped (and the lr schedule with them).
    Returns the mean loss and the gradient norm before clipping."""
    method, optimizer, amp, accelerator = loop.method, loop.optimizer, loop.amp, loop.accelerator
    n = len(loop.data_gens)
    backward = accelerator.backward if n == 1 else (lambda part: accelerator.backward(part / n))
    optimizer.zero_grad(set_to_none=True)
    loss = None
    for data_gen, loss_gen in zip(loop.data_gens, loop.loss_gens, strict=True):
        batch = _minibatch(train_set, cfg.batch_size, data_gen)
        with amp.autocast():
            part = method.loss_and_backward(batch, loss_gen, amp.backward(backward))
        if part.ndim != 0:
            raise ValueError(f"{type(method).__name__}.loss must return a scalar, got shape {tuple(part.shape)}")
        if not torch.isfinite(part):
            raise FloatingPointError(f"loss is {part.item()} at step {step + 1}: lower --lr or check the method")
        loss = part if n == 1 else part.detach() / n + (0.0 if loss is None else loss)
    if accelerator.num_processes > 1:
        _sync_gradients(loop.params, accelerator)
    amp.unscale(optimizer)
    grad_norm = accelerator.clip_grad_norm_(loop.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    amp.step(optimizer)
    loop.scheduler.step()
    return loss, grad_norm


def _save_loop_checkpoint(loop: _Loop, cfg: TrainConfig, run_dir: Path, done: int, record: dict) -> None:
    """Checkpoint after `done` steps: everything `_restore_or_start_over` reads back, and `record` (what the steps
    so far measured: the last loss and the loop seconds over all attempts)."""
    method, amp = loop.method, loop.amp
    state = {"step": done, "config": asdict(cfg), "model": loop.model_id,
             "params": _param_state(method, loop.backbone, loop.params),
             "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
             "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
             "method": method.state_dict() if hasattr(method, "state_dict") else None,
             "record": record}
    save_checkpoint(run_dir, done, state, _rng_state(loop.data_gens, loop.loss_gens), loop.accelerator)


def _spent(seconds: float, accelerator: Accelerator) -> float:
    """The loop's seconds as the slowest process measured them, so every process stops after the same step."""
    if accelerator.num_processes == 1:
        return seconds
    return float(accelerator.gather(torch.tensor([seconds], device=accelerator.device)).max())


class _null:
    """A do-nothing file for processes that do not write the log."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass
