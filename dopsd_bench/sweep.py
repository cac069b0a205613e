"""`dopsd-bench sweep`: a matched grid of methods x tasks (families expand to their instances) x seeds x budgets.

    dopsd-bench sweep --methods base,sft,dopsd --tasks concept,style --seeds 0,1,2 --out runs/grid
    dopsd-bench sweep --config sweeps/leaderboard.yaml            # the same grid from a file (flags override it)
    dopsd-bench sweep ... --budget steps=50,lr=1e-4 --budget steps=100   # two budget points (default: methods')
    dopsd-bench sweep ... --budget budget_flops=2e13              # matched training FLOPs (or budget_seconds=120)
    dopsd-bench sweep ... --shard 0/4                             # this machine's quarter of the grid
    dopsd-bench sweep ... --dry-run                               # list the cells and which are done
Tiny CPU example: `dopsd-bench sweep --methods base,sft --tasks style --seeds 0 --budget steps=2 --out /tmp/sw`.

Sweep file (YAML; every key optional except methods and tasks):
    methods: [base, sft, dopsd]
    tasks: [concept, style, "concept:zorb"]     # a family expands to its instances; family:instance picks one
    seeds: [0, 1, 2]
    budgets: [{steps: 200, lr: 1.0e-4}]         # each item is one budget point; missing keys = method defaults
    # a point's length in cost instead of steps: {budget_flops: 2.0e+13} or {budget_seconds: 120} (one unit each)
    set: {key: value}                           # --set for every method
    method_set: {dopsd: {teacher: ema}}         # --set for one method
    backbone: NAME, model: PATH_OR_ID, device: cpu, out: runs/grid, processes: 1, checkpoint_every: 50
    dtype: bf16, gradient_checkpointing: true, eval_batch_size: 16   # as `run`'s flags, for every cell
    scorer: dino-clip, dino: PATH, clip: PATH_OR_none                # how every cell is scored (as `run`'s flags)
    teacher_model: PATH_OR_ID                   # z-image's in-context teacher (VL model) for every cell
    extra_fd: effnet_lite0                      # further retention FD/KID spaces (as `run --extra-fd`)

Resumable: a cell whose run dir holds a complete result.json is skipped (the runner writes it atomically and last),
and an unfinished cell is re-run with resume=True, so its training picks up from its last checkpoint. Kill the sweep
at any point and run the same command again. A result made on other weights (its model id, which carries a digest
of the denoiser's weights, differs from the model's now: a rebuilt embedded model) is stale and its cell runs again.

Sharding: cells are sorted by their run-dir id and shard i of n (0-based) takes every n-th cell from i. Without
--shard, SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (and SLURM_ARRAY_TASK_MIN) are used when set.

Execution. With --processes 1 each cell runs in this process (default: no per-cell interpreter and torch start-up,
and caches of untuned-model samples stay warm); a crash that raises is logged and the sweep goes on, a hard crash
(segfault, OOM kill) stops it and a re-run resumes. --isolate runs every cell in its own subprocess
(`python -m dopsd_bench.sweep cell ...`); --processes N>1 always does, under
`accelerate launch --num_processes N -m dopsd_bench.sweep cell ...` for multi-GPU data parallel training.
--workers N runs N copies of the sweep side by side on this machine, each on its share of the CPU cores, taking
cells through their locks (dopsd_bench/sweep_workers.py).
Every event goes to OUT/sweep.log (one JSON object per line), including the exact command.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dopsd_bench import options, sweep_workers
from dopsd_bench.cli import user_errors
from dopsd_bench.errors import CellBusy, UserError
from dopsd_bench.result import BUDGET_KEYS

DEFAULT_RUNNER = "dopsd_bench.runner:run_cell"
DEFAULT_OUT = "runs/sweep"
SWEEP_KEYS = {"methods", "tasks", "seeds", "budgets", "set", "method_set", "backbone", "model", "device", "out",
              "processes", "checkpoint_every", "dtype", "gradient_checkpointing", "eval_batch_size", "scorer", "dino",
              "clip", "teacher_model", "extra_fd"}
LOG_FILE = "sweep.log"
console = Console(stderr=True)


# ---- the grid -----------------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    methods: list[str]
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    budgets: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    overrides: dict[str, str] = field(default_factory=dict)  # every method
    method_overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> its own overrides
    out: Path = Path(DEFAULT_OUT)
    backbone: str | None = None
    model: str | None = None
    device: str | None = None
    processes: int = 1
    checkpoint_every: int | None = None
    dtype: str | None = None
    gradient_checkpointing: bool | None = None
    eval_batch_size: int | None = None
    scorer: str | None = None
    dino: str | None = None
    clip: str | None = None
    teacher_model: str | None = None
    extra_fd: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.methods:
            raise UserError("a sweep needs at least one method: pass --methods a,b or `methods:` in the sweep file")
        if not self.tasks:
            raise UserError("a sweep needs at least one task: pass --tasks concept,style or `tasks:` in the sweep file")
        if not self.seeds:
            raise UserError("a sweep needs at least one seed: pass --seeds 0,1,2")
        if self.processes < 1:
            raise UserError(f"--processes must be >= 1, got {self.processes}")
        self.budgets = self.budgets or [{}]
        for b in self.budgets:
            bad = sorted(set(b) - set(BUDGET_KEYS))
            if bad:
                raise UserError(f"unknown budget key(s) {bad}; allowed: {', '.join(BUDGET_KEYS)}")
        for m in self.method_overrides:
            if m not in self.methods:
                raise UserError(f"method_set names method {m!r}, which is not in the sweep's methods {self.methods}")


@dataclass(frozen=True)
class Cell:
    """One run of the grid, as the kwargs of RunConfig (only the ones the sweep sets; the rest keep defaults)."""

    kwargs: tuple[tuple[str, Any], ...]

    @property
    def config(self) -> dict[str, Any]:
        return {k: (dict(v) if k == "overrides" else v) for k, v in self.kwargs}

    def run_config(self) -> Any:
        return build_run_config(self.config)

    def cell_id(self) -> str:
        return str(self.run_config().cell_id())

    def run_dir(self) -> Path:
        cfg = self.run_config()
        return Path(cfg.out_dir) / cfg.cell_id()


def build_run_config(kwargs: dict[str, Any]) -> Any:
    """RunConfig from the sweep's kwargs, leaving out None values (so RunConfig's defaults apply)."""
    from dopsd_bench.runconfig import RunConfig

    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise UserError(f"RunConfig has no field(s) {unknown}; it has {sorted(names)}")
    return RunConfig(**{k: v for k, v in kwargs.items() if v is not None})


def _instances(task: str) -> list[tuple[str, str | None]]:
    """'family' -> every (family, instance) it defines; 'family:instance' -> just that one."""
    from dopsd_bench.tasks import load_task

    if ":" in task and not task.endswith((".yaml", ".yml")):
        family, instance = task.rsplit(":", 1)
        load_task(family).instance(instance)  # an unknown instance fails here, with "did you mean"
        return [(family, instance)]
    names = list(load_task(task).instances)
    if not names:
        raise UserError(f"task {task!r} defines no instances; check its YAML file")
    return [(task, str(n)) for n in names]


def expand(spec: SweepSpec, check_names: bool = True) -> list[Cell]:
    """Every cell of the grid, sorted by run-dir id (the order shards are cut from).

    `check_names` looks methods and backbone up in their registries first, so a typo fails before any cell runs
    (with "did you mean"); a custom --runner may give names its own meaning, so the sweep skips it there.
    """
    trains = dict.fromkeys(spec.methods, True)
    overrides_of = {m: {**spec.overrides, **spec.method_overrides.get(m, {})} for m in spec.methods}
    if check_names:
        from dopsd_bench.registry import BACKBONES, METHODS

        # a method that trains nothing (base, icl) gets no budget: one cell serves every budget point
        trains = {m: bool(getattr(METHODS.get(m), "trains", True)) for m in spec.methods}
        if spec.backbone is not None:
            BACKBONES.get(spec.backbone)
        overrides_of = checked_overrides(spec)
    cells: dict[str, Cell] = {}
    task_instances = [ti for t in spec.tasks for ti in _instances(t)]
    for method in spec.methods:
        overrides = overrides_of[method]
        for task, instance in task_instances:
            for seed in spec.seeds:
                for budget in spec.budgets:
                    kwargs = {
                        "method": method, "task": task, "instance": instance, "seed": int(seed),
                        "backbone": spec.backbone, "model": spec.model, "device": spec.device,
                        "out_dir": str(spec.out), "resume": True, "checkpoint_every": spec.checkpoint_every,
                        "dtype": spec.dtype, "gradient_checkpointing": spec.gradient_checkpointing,
                        "eval_batch_size": spec.eval_batch_size, "scorer": spec.scorer, "dino": spec.dino,
                        "clip": spec.clip, "teacher_model": spec.teacher_model, "extra_fd": spec.extra_fd,
                        **({k: budget.get(k) for k in BUDGET_KEYS} if trains[method] else {}),
                    }
                    if overrides:
                        kwargs["overrides"] = tuple(sorted(overrides.items()))
                    cell = Cell(tuple((k, v) for k, v in kwargs.items() if v is not None))
                    cells.setdefault(cell.cell_id(), cell)  # a grid that names one cell twice runs it once
    return [cells[k] for k in sorted(cells)]


def checked_overrides(spec: SweepSpec) -> dict[str, dict[str, str]]:
    """Each method's `--set` overrides, checked before any cell runs: a common key goes to the methods whose config
    has it (a key no method has is refused), a per-method key must be that method's, and every value must convert."""
    from dopsd_bench.method import config_from_overrides
    from dopsd_bench.registry import METHODS

    fields = {m: {f.name for f in dataclasses.fields(METHODS.get(m).Config)} for m in spec.methods}
    for key in spec.overrides:
        if not any(key in names for names in fields.values()):
            have = "; ".join(f"{m}: {', '.join(sorted(n)) or '(none)'}" for m, n in fields.items())
            raise UserError(f"--set {key}: no method of this sweep has that setting; their settings are {have}")
    out = {}
    for m in spec.methods:
        overrides = {k: v for k, v in spec.overrides.items() if k in fields[m]} | spec.method_overrides.get(m, {})
        try:
            config_from_overrides(METHODS.get(m).Config, overrides)
        except ValueError as e:
            raise UserError(f"--set for method {m}: {e}") from None
        out[m] = overrides
    return out


def parse_shard(shard: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """'i/n' (0-based) -> (i, n); None -> SLURM array variables when set, else (0, 1)."""
    env = os.environ if env is None else env
    if shard is None and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return _check_shard(i, int(env["SLURM_ARRAY_TASK_COUNT"]), "SLURM_ARRAY_TASK_ID")
    if shard is None:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise UserError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4), got {shard!r}") from None
    return _check_shard(i, n, "--shard")


def _check_shard(i: int, n: int, where: str) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise UserError(f"{where}: shard {i} of {n} is out of range; expected 0 <= i < n")
    return i, n


def shard_cells(cells: list[Cell], i: int, n: int) -> list[Cell]:
    return cells[i::n]


# ---- parsing flags and files --------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_budget(text: str) -> dict[str, Any]:
    """'steps=100,lr=1e-4' -> {'steps': 100, 'lr': 0.0001}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise UserError(f"--budget expects key=value pairs separated by commas (e.g. steps=100,lr=1e-4), "
                            f"got {text!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in BUDGET_KEYS:
            raise UserError(f"unknown budget key {k!r} in {text!r}; allowed: {', '.join(BUDGET_KEYS)}")
        out[k] = _parse_value(v)
    return out


def parse_sets(items: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """['k=v', 'dopsd:k=v'] -> ({'k': 'v'}, {'dopsd': {'k': 'v'}}); each part checked as `run --set` checks it."""
    from dopsd_bench.runconfig import parse_overrides

    common: list[str] = []
    per_method: dict[str, list[str]] = {}
    for item in items:
        method, colon, _ = item.partition("=")[0].partition(":")
        if colon:
            per_method.setdefault(method.strip(), []).append(item.split(":", 1)[1])
        else:
            common.append(item)
    return parse_overrides(common), {method: parse_overrides(sets) for method, sets in per_method.items()}


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def load_sweep_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file {path} must be a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise UserError(f"sweep file {path}: unknown key(s) {unknown}; allowed: {sorted(SWEEP_KEYS)}")
    return data


def _seeds(values: Any) -> list[int]:
    """Training seeds from --seeds or the sweep file: integers in [0, 2**32), else UserError."""
    values = values if isinstance(values, (list, tuple)) else [values]
    out = []
    for value in values:
        try:
            seed = int(str(value).strip())
        except ValueError:
            raise UserError(f"seeds: {value!r} is not an integer; expected e.g. --seeds 0,1,2 or `seeds: [0, 1]`") \
                from None
        if not 0 <= seed < 2**32:
            raise UserError(f"seeds: {seed} is out of range; expected integers in [0, 2**32)")
        out.append(seed)
    return out


def make_spec(file: dict[str, Any], **flags: Any) -> SweepSpec:
    """Merge a sweep file with flags (a flag that is not None wins)."""
    def pick(name: str, default: Any = None) -> Any:
        return flags[name] if flags.get(name) is not None else file.get(name, default)

    budgets = flags.get("budgets") or [
        {k: _parse_value(str(v)) for k, v in b.items()} for b in (file.get("budgets") or [{}])
    ]
    common = {str(k): str(v) for k, v in (file.get("set") or {}).items()}
    per_method = {str(m): {str(k): str(v) for k, v in d.items()} for m, d in (file.get("method_set") or {}).items()}
    flag_common, flag_per_method = flags.get("sets") or ({}, {})
    common.update(flag_common)
    for m, d in flag_per_method.items():
        per_method.setdefault(m, {}).update(d)
    seeds = pick("seeds", [0])
    return SweepSpec(
        methods=[str(m) for m in pick("methods", [])],
        tasks=[str(t) for t in pick("tasks", [])],
        seeds=_seeds(seeds),
        budgets=budgets,
        overrides=common,
        method_overrides=per_method,
        out=Path(pick("out", DEFAULT_OUT)),
        backbone=pick("backbone"),
        model=pick("model"),
        device=pick("device"),
        processes=int(pick("processes", 1)),
        checkpoint_every=pick("checkpoint_every"),
        dtype=pick("dtype"),
        gradient_checkpointing=pick("gradient_checkpointing"),
        eval_batch_size=pick("eval_batch_size"),
        scorer=pick("scorer"),
        dino=pick("dino"),
        clip=pick("clip"),
        teacher_model=pick("teacher_model"),
        extra_fd=pick("extra_fd"),
    )


# ---- running ------------------------------------------------------------------------------------------------
def resolve_runner(spec: str) -> Callable[[Any], Any]:
    """'module:function' -> the function that runs one RunConfig."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--runner expects module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load runner {spec!r}: {e}") from None


class SweepLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        line = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "pid": os.getpid(), "event": event, **fields}
        # one short line per append: O_APPEND keeps lines whole across shards that share the file
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


def _clean_stale_temp(run_dir: Path) -> None:
    # a SIGKILL between a temp file's creation and its rename leaves `.result.json.*.tmp`; the cell re-runs anyway
    for tmp in glob.glob(str(run_dir / ".result.json.*.tmp")):
        os.unlink(tmp)


def cell_command(cell: Cell, runner: str, processes: int) -> list[str]:
    payload = json.dumps(cell.config, default=str)
    tail = ["-m", "dopsd_bench.sweep", "cell", "--config-json", payload, "--runner", runner]
    if processes > 1:
        return ["accelerate", "launch", "--num_processes", str(processes), *tail]
    return [sys.executable, *tail]


def expected_model(cfg: Any) -> str | None:
    """The model id a cell's run would record now (None if it cannot be told without the runner; a custom
    --runner gives names its own meaning, so the sweep asks only for the default one). Hashes the weights of a small
    local model (milliseconds), so it is not cached: the weights may change between calls."""
    from dopsd_bench.backbones import backbone_identity

    try:
        return backbone_identity(cfg.backbone, cfg.model)
    except UserError:  # a name only a custom --runner knows, or an unbuilt model: the runner reports it
        return None


def run_cells(
    cells: list[Cell],
    log: SweepLog,
    runner: str = DEFAULT_RUNNER,
    processes: int = 1,
    isolate: bool = False,
    force: bool = False,
) -> dict[str, int]:
    """Run every unfinished cell (all of them with force); returns counts of done / skipped / failed."""
    subprocess_mode = isolate or processes > 1
    run_fn = None if subprocess_mode else resolve_runner(runner)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    columns = [TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("", total=len(cells))
        for cell in cells:
            outcome = _run_or_skip(cell, log, runner, processes, force, run_fn,
                                   lambda cid: progress.update(bar, description=cid))
            counts[outcome] += 1
            progress.advance(bar)
    return counts


def _run_or_skip(cell: Cell, log: SweepLog, runner: str, processes: int, force: bool,
                 run_fn: Callable[[Any], Any] | None, show: Callable[[str], None]) -> str:
    """One cell of `run_cells`: skipped when done (unless force) or run by another process, else run (in a
    subprocess when run_fn is None) and checked. Returns its count's name: done, skipped or failed."""
    from dopsd_bench.rundir import cell_state, is_complete, lock_holder

    cfg = cell.run_config()
    cid = str(cfg.cell_id())
    run_dir = Path(cfg.out_dir) / cid
    model_id = expected_model(cfg) if runner == DEFAULT_RUNNER else None
    state, done = cell_state(run_dir, model_id)
    if state == "done" and (not force or sweep_workers.done_by_a_peer(run_dir)):
        log.write("skip", cell=cid)
        return "skipped"
    if state == "stale":
        log.write("stale", cell=cid, made_on=done["model"], model=model_id)
        console.print(f"cell {cid}: made on {done['model']}, the weights are now {model_id}: running it again")
    holder = lock_holder(run_dir)
    if holder is not None:
        return _busy(log, cid, holder, f"cell {cid}: being run by {holder}")
    show(cid)
    _clean_stale_temp(run_dir)
    log.write("start", cell=cid)
    t0 = time.perf_counter()
    try:
        error = _execute(cell, cfg, runner, processes, force, run_fn, log)
    except CellBusy as e:  # taken by another process since the check above
        return _busy(log, cid, str(e), str(e))
    seconds = round(time.perf_counter() - t0, 3)
    if error is None and not is_complete(run_dir):
        error = "the runner returned but left no complete result.json"
    if error is None:
        log.write("done", cell=cid, seconds=seconds)
        return "done"
    log.write("fail", cell=cid, seconds=seconds, error=error)
    console.print(f"[red]cell {cid} failed[/red]: {error}")
    return "failed"


def _busy(log: SweepLog, cid: str, holder: str, message: str) -> str:
    """Another process (a shard, a shell) runs the cell: it is theirs."""
    log.write("busy", cell=cid, holder=holder)
    console.print(f"{message}; skipped here")
    return "skipped"


def _execute(cell: Cell, cfg: Any, runner: str, processes: int, force: bool, run_fn: Callable[[Any], Any] | None,
             log: SweepLog) -> str | None:
    """Run one cell, in a subprocess when run_fn is None, else in this process. Returns what stopped it, or None;
    CellBusy (the cell was taken meanwhile) passes through."""
    if run_fn is None:
        if force:
            cell = Cell(tuple((k, v) for k, v in cell.kwargs if k != "resume") + (("force", True),))
        cmd = cell_command(cell, runner, processes)
        rc = subprocess.run(cmd, check=False).returncode
        return f"exit code {rc}: {shlex.join(cmd)}" if rc != 0 else None
    try:
        run_fn(dataclasses.replace(cfg, force=True, resume=False) if force else cfg)
    except CellBusy:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- one failing cell must not stop the grid
        log.write("traceback", cell=str(cfg.cell_id()), traceback=traceback.format_exc())
        return f"{type(e).__name__}: {e}"
    return None


# ---- CLI ----------------------------------------------------------------------------------------------------
def sweep_command(
    methods: Annotated[str | None, typer.Option(help="comma-separated method names, e.g. base,sft,dopsd")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks; a family expands to its instances, "
                                                   "family:instance picks one")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated training seeds, e.g. 0,1,2")] = None,
    budget: Annotated[list[str] | None, typer.Option("--budget", "--budgets", help="one budget point, e.g. "
                      "steps=100,lr=1e-4 (repeat for several; default: each method's own)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML sweep file (flags override it)")] = None,
    out: Annotated[Path | None, typer.Option(help=f"results root (default {DEFAULT_OUT})")] = None,
    backbone: Annotated[str | None, typer.Option(help="backbone name (default: the embedded one)")] = None,
    model: Annotated[str | None, typer.Option(help="local path or hub id of the backbone's weights")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="method config override key=value "
                    "(all methods) or method:key=value (one method); repeatable")] = None,
    shard: Annotated[str | None, typer.Option(help="run shard i/n of the grid (0-based); default from "
                                                   "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")] = None,
    processes: Annotated[int | None, typer.Option(help="processes per cell; >1 runs each cell under "
                                                       "`accelerate launch --num_processes N`")] = None,
    isolate: Annotated[bool, typer.Option(help="run each cell in its own subprocess")] = False,
    device: Annotated[str | None, typer.Option(help="device for every cell, e.g. cpu or cuda")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="training checkpoint every N steps")] = None,
    dtype: Annotated[str | None, typer.Option(help="frozen weights' dtype for every cell: bf16, fp16 or fp32 "
                                                   "(default: bf16 on a GPU that has it, else fp32)")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="recompute activations in backward")] = None,
    eval_batch_size: Annotated[int | None, typer.Option(help="images sampled at once when scoring")] = None,
    scorer: options.Scorer = None,
    dino: options.Dino = None,
    clip: options.Clip = None,
    teacher_model: options.TeacherModel = None,
    extra_fd: options.ExtraFd = None,
    workers: Annotated[int, typer.Option(help="run N copies of this sweep side by side, each on cores/N threads, "
                                              "taking cells first come first served (CPU machines)")] = 1,
    force: Annotated[bool, typer.Option(help="re-run cells that are already complete")] = False,
    dry_run: Annotated[bool, typer.Option(help="list the cells (and which are done) without running them")] = False,
    runner: Annotated[str, typer.Option(hidden=True, help="module:function that runs one RunConfig")] = DEFAULT_RUNNER,
) -> None:
    """Run a matched grid of methods x tasks x seeds x budgets; resumable and shardable."""
    file = load_sweep_file(config) if config else {}
    spec = make_spec(
        file, methods=_csv(methods), tasks=_csv(tasks), seeds=_csv(seeds),
        budgets=[parse_budget(b) for b in budget] if budget else None, out=out, backbone=backbone,
        model=model, device=device, processes=processes, checkpoint_every=checkpoint_every, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, eval_batch_size=eval_batch_size, scorer=scorer,
        dino=dino, clip=clip, teacher_model=teacher_model, extra_fd=extra_fd, sets=parse_sets(set_ or []),
    )
    i, n = parse_shard(shard)
    all_cells = expand(spec, check_names=runner == DEFAULT_RUNNER)
    cells = shard_cells(all_cells, i, n)
    sweep_workers.check_workers(workers, spec.processes)
    if dry_run:
        _print_cell_states(cells, runner)
        return
    if workers > 1 and sweep_workers.WORKER_VAR not in os.environ:
        model_of = (lambda c: expected_model(c.run_config())) if runner == DEFAULT_RUNNER else (lambda c: None)
        raise typer.Exit(sweep_workers.run_workers(workers, cells, spec.out, model_of, f"{i}/{n}", force))
    counts = _run_shard(spec, cells, f"{i}/{n}", len(all_cells), runner, isolate, force)
    if counts["failed"]:
        raise typer.Exit(1)


def _print_cell_states(cells: list[Cell], runner: str) -> None:
    """`--dry-run`: each cell's state (done, stale, new, ...) and id, tab-separated, one per line."""
    from dopsd_bench.rundir import cell_state

    for cell in cells:
        model_id = expected_model(cell.run_config()) if runner == DEFAULT_RUNNER else None
        print(f"{cell_state(cell.run_dir(), model_id)[0]}\t{cell.cell_id()}")


def _run_shard(spec: SweepSpec, cells: list[Cell], shard: str, grid: int, runner: str, isolate: bool,
               force: bool) -> dict[str, int]:
    """Run this shard's cells between a sweep_start and a sweep_end line of the log, then say how it went."""
    log = SweepLog(spec.out / LOG_FILE)
    log.write("sweep_start", argv=shlex.join(sys.argv), shard=shard, cells=len(cells), grid=grid,
              spec={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()})
    t0 = time.perf_counter()
    counts = run_cells(cells, log, runner=runner, processes=spec.processes, isolate=isolate, force=force)
    seconds = round(time.perf_counter() - t0, 1)
    log.write("sweep_end", seconds=seconds, **counts)
    console.print(f"sweep {shard}: {counts['done']} run, {counts['skipped']} already done, "
                  f"{counts['failed']} failed, {seconds} s; log {log.path}")
    return counts


def _cell_entry(
    config_json: Annotated[str, typer.Option(help="RunConfig kwargs as JSON")],
    runner: Annotated[str, typer.Option(help="module:function")] = DEFAULT_RUNNER,
) -> None:
    """Run one cell (what --isolate and --processes N launch)."""
    kwargs = json.loads(config_json)
    if "overrides" in kwargs:
        kwargs["overrides"] = dict(kwargs["overrides"])
    resolve_runner(runner)(build_run_config(kwargs))


_app = typer.Typer(add_completion=False, no_args_is_help=True)
_app.command("sweep")(user_errors(sweep_command))  # `python -m dopsd_bench.sweep`: bad input is one line, exit 2
_app.command("cell", hidden=True)(_cell_entry)

if __name__ == "__main__":
    _app()
