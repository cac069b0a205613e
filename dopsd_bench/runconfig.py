"""RunConfig: everything that identifies one cell of the benchmark (method x task instance x backbone x seed x budget).

The CLI builds it (`dopsd-bench run` / `eval`), the sweep builds many, and dopsd_bench/runner.py consumes it.
`cell_id()` is the run directory below `out_dir`; it is stable across processes, so a finished cell is found again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dopsd_bench.errors import ConfigError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# fields that change what is trained or scored but are not part of the readable directory name
_HASHED = ("model", "steps", "budget_flops", "budget_seconds", "batch_size", "lr", "rank", "grad_accum", "overrides",
           "lora", "dtype", "scorer", "dino", "clip", "teacher_model")
DTYPES = ("bf16", "fp16", "fp32")
SCORERS = ("judge", "dino-clip")  # the scorers a cell can name; metrics.features.choose_scorer picks the default


@dataclass
class RunConfig:
    method: str
    task: str  # a registered task name or a path to a task .yaml
    instance: str | None = None  # None: the task's default instance
    backbone: str = "flux2-klein"
    model: str | None = None  # local path or hub id; None: the backbone's default model
    seed: int = 0
    steps: int | None = None  # budget; None: the method's / loop's default
    budget_flops: float | None = None  # budget in training FLOPs instead of steps (one step counted, then divided)
    budget_seconds: float | None = None  # budget in the training loop's wall seconds instead of steps
    batch_size: int | None = None
    lr: float | None = None
    rank: int | None = None
    grad_accum: int | None = None  # minibatches accumulated per optimiser step (None: 1)
    overrides: dict[str, str] = field(default_factory=dict)  # method config overrides (`--set key=value`)
    out_dir: str = "runs"
    force: bool = False  # re-run even if the cell has a complete result.json
    resume: bool = False  # continue from the cell's last checkpoint
    checkpoint_every: int | None = None
    device: str | None = None  # None: cuda if available, else cpu
    lora: str | None = None  # `eval`: score this diffusers-format LoRA instead of training
    dtype: str | None = None  # frozen weights' dtype (bf16 | fp16 | fp32); None: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False  # recompute the denoiser's activations in backward (memory for time)
    eval_batch_size: int | None = None  # images sampled at once when scoring; None: 16 on a GPU, all on the CPU
    scorer: str | None = None  # judge | dino-clip; None: metrics.features.choose_scorer's default for the task
    dino: str | None = None  # DINOv2 weights for dino-clip (None: $DOPSD_BENCH_DINO, else the hub default)
    clip: str | None = None  # CLIP weights for dino-clip, "none" for none (None: $DOPSD_BENCH_CLIP, else the hub's)
    teacher_model: str | None = None  # the in-context teacher's VL model (z-image); None: the model's own setting
    extra_fd: str | None = None  # further retention FD/KID spaces, e.g. "effnet_lite0"; None: $DOPSD_BENCH_EXTRA_FD

    def __post_init__(self) -> None:
        # in this order, so a config with several bad fields is refused for the same one each time
        self._check_names()
        self._check_budget()
        self._check_execution()
        self._check_lr()
        self._check_overrides()
        self._check_output_and_device()

    def _check_names(self) -> None:
        for name in ("method", "task", "backbone"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} must be a non-empty name, got {value!r}")
        for name in ("instance", "model", "device", "lora", "teacher_model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a non-empty string or None, got {value!r}")

    def _check_budget(self) -> None:
        """The seed and the training budget: steps, batch size and rank, or a budget in FLOPs or seconds."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), as numpy's and torch's generators take it; "
                              f"got {self.seed!r}")
        for name in ("steps", "batch_size", "rank", "grad_accum"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer (or unset for the default), got {value!r}")
        if self.grad_accum == 1:
            self.grad_accum = None  # the default: one cell, whether 1 is given or not
        for name in ("budget_flops", "budget_seconds"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be a positive finite number, "
                                  f"got {value!r}")
            setattr(self, name, float(value))  # 120 and 120.0 are one cell
        given = [f"{name} {getattr(self, name):g}" for name in ("steps", "budget_flops", "budget_seconds")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"a training budget is given in one unit: got {' and '.join(given)}; keep one of "
                              "--steps, --budget-flops, --budget-seconds")

    def _check_execution(self) -> None:
        """How the cell runs and is scored: precision, gradient checkpointing, scoring batch size and scorer,
        checkpoint interval."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or unset for the device's default), "
                              f"got {self.dtype!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        batch = self.eval_batch_size
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0):
            raise ConfigError(f"eval_batch_size must be a positive integer (or unset for the default), got {batch!r}")
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ConfigError(f"checkpoint_every must be an integer >= 0 (0 = no checkpoints), got {every!r}")
        check_scorer(self.scorer)
        for name in ("dino", "clip"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a local folder or hub id (or unset for the default), got {value!r}")
        if self.scorer == "judge" and (self.dino or self.clip):
            raise ConfigError("--dino/--clip choose the dino-clip scorer's weights, but the scorer is the judge: "
                              "drop them or use --scorer dino-clip")

    def _check_lr(self) -> None:
        if self.lr is not None:
            if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                    or self.lr <= 0:
                raise ConfigError(f"lr must be a positive finite number (or unset for the default), got {self.lr!r}")
            self.lr = float(self.lr)

    def _check_overrides(self) -> None:
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides must be a dict of key -> value strings, got {type(self.overrides).__name__}")
        for key, value in self.overrides.items():
            if not isinstance(key, str) or not _KEY.match(key):
                raise ConfigError(f"override key {key!r} is not a config field name (letters, digits, _ and .)")
            if not isinstance(value, str):
                raise ConfigError(f"override {key}={value!r}: values are strings, as given by --set key=value")

    def _check_output_and_device(self) -> None:
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        if self.force and self.resume:
            raise ConfigError("--force (start the cell again) and --resume (continue it) exclude each other; "
                              "pick one")
        if self.device is not None and not re.match(r"^(cpu|cuda|mps|xpu)(:\d+)?$", self.device):
            raise ConfigError(f"device must look like cpu, cuda, cuda:1, mps or xpu; got {self.device!r}")
        if self.model is not None and _looks_local(self.model) and not Path(self.model).expanduser().is_dir():
            raise ConfigError(f"model {self.model!r} is not a folder; expected a saved diffusers pipeline folder "
                              "(with model_index.json) or a hub id such as org/name")

    # ---- identity -----------------------------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        """The task's name for paths: a YAML path counts by its file stem."""
        return Path(self.task).stem if self.task.endswith((".yaml", ".yml")) else self.task

    def resolved_instance(self) -> str:
        """`instance`, or the task's default instance (reads the task spec; never a model)."""
        if self.instance is not None:
            return self.instance
        from dopsd_bench.tasks import load_task

        return load_task(self.task).default_instance

    def budget(self) -> dict[str, Any]:
        """The explicitly set budget (None = the default of the method / loop)."""
        return {"steps": self.steps, "budget_flops": self.budget_flops, "budget_seconds": self.budget_seconds,
                "batch_size": self.batch_size, "lr": self.lr, "rank": self.rank, "grad_accum": self.grad_accum}

    def non_default(self) -> dict[str, Any]:
        """The fields that make this cell differ from the default cell of the same method/task/instance/seed."""
        return {k: getattr(self, k) for k in _HASHED if getattr(self, k) not in (None, {}, "")}

    def cell_id(self) -> str:
        """`{backbone}/{task}-{instance}/{method}/seed{seed}`, plus `-{hash}` of non-default budget/overrides/model."""
        parts = [self.backbone, f"{self.task_name}-{self.resolved_instance()}", self.method]
        leaf = f"seed{self.seed}"
        extra = self.non_default()
        if extra:
            leaf += "-" + hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
        return "/".join(_SAFE.sub("_", p) for p in parts + [leaf])

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.cell_id()

    # ---- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown RunConfig fields {unknown}; valid: {sorted(known)}")
        return cls(**data)


def check_scorer(scorer: str | None) -> None:
    """ConfigError unless `scorer` is one of SCORERS or None (the task's default)."""
    if scorer is not None and scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)} (or unset for the task's default), "
                          f"got {scorer!r}")


def _looks_local(model: str) -> bool:
    """A path rather than a hub id ("org/name") or an embedded name: absolute, home- or dot-relative."""
    return model.startswith(("/", "~", "./", "../", "\\")) or model in (".", "..")


def check_device(device: str | None) -> None:
    """ConfigError unless `device` (None: the default) can run this torch build's tensors now."""
    import torch

    if device is None:
        return
    kind, _, index = device.partition(":")
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}[kind]
    if not available():
        raise ConfigError(f"--device {device}: this torch build ({torch.__version__}) has no usable {kind} device; "
                          "use --device cpu, or install a torch build for that device")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")


def resolve_dtype(dtype: str | None, device) -> str:
    """The weights' dtype a run uses on `device` (a torch.device): `dtype`, or bf16 on a CUDA GPU that supports it
    and fp32 elsewhere (on the CPU a bf16 training step of the embedded model is 1.1x, of the tiny test model 1.7x,
    the fp32 one: scripts/bench_precision.py). ConfigError for bf16 on a GPU without it."""
    import torch

    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dtype is None:
        return "bf16" if bf16_gpu else "fp32"
    if dtype == "bf16" and device.type == "cuda" and not bf16_gpu:
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          "use --dtype fp16 or fp32")
    return dtype


def torch_dtype(dtype: str):
    """"bf16" | "fp16" | "fp32" -> the torch dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def default_eval_batch_size(device) -> int | None:
    """Images sampled at once when scoring: 16 on an accelerator (bounded memory at 1024 px), all of a set on the
    CPU (the embedded world's sets are small; batches of 16 sample them as fast, within noise, and one batch keeps
    earlier CPU results bit for bit: scripts/bench_precision.py)."""
    return None if device.type == "cpu" else 16


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["lr_teacher=0.1", "teacher=ema"] -> {"lr_teacher": "0.1", "teacher": "ema"}; values stay strings."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if not _KEY.match(key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a config field name")
        if key in out:
            raise ConfigError(f"--set {key} is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out
