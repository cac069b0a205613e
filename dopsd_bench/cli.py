"""The `dopsd-bench` command line (typer + rich).

    dopsd-bench run --method dopsd --task style               # train, sample, score one cell -> runs/...
    dopsd-bench run --method sft --task concept --instance kwel --steps 50 --set weighting=logit_normal
    dopsd-bench eval --lora path/to/adapter --task style      # score an adapter trained elsewhere
    dopsd-bench list methods                                  # also: tasks, backbones, metrics
    dopsd-bench --methods-path my_methods/ list methods       # third-party methods (or DOPSD_BENCH_METHODS_PATH)
    dopsd-bench --metrics-path my_metrics/ run ...            # third-party metrics (or DOPSD_BENCH_METRICS_PATH)

Bad input (an unknown name, an invalid task or config) prints one red line to stderr and exits 2, without a
traceback; anything else is a bug and keeps its traceback. Commands that live in other modules are added at the
bottom of this file, one line each.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from dopsd_bench import __version__, options
from dopsd_bench.errors import RunFailed, UnknownNameError, UserError
from dopsd_bench.registry import BACKBONES, METHODS, METRICS, PLUGIN_PATH_VARS, TASKS

# ---- commands from other modules: one line each, imported only when used -------------------------------------------
# name -> ("module:function", one-line help). The function is typer-annotated and its docstring's first line is the
# help shown here (a test keeps the two equal): `--help` lists commands without importing their modules (pandas,
# torch), and a command is imported when it runs. A bare "module:function" is imported to be listed, and is hidden
# while that module or function does not exist.
COMMANDS: dict[str, str | tuple[str, str]] = {
    "sweep": ("dopsd_bench.sweep:sweep_command",
              "Run a matched grid of methods x tasks x seeds x budgets; resumable and shardable."),
    "leaderboard": ("dopsd_bench.leaderboard:leaderboard_command",
                    "Aggregate run dirs into a leaderboard with paired-bootstrap 95% intervals."),
    "report": ("dopsd_bench.report:report_command",
               "Write one self-contained HTML report: leaderboard, image grids, step curves, fidelity-vs-retention."),
    "check": ("dopsd_bench.check:check_command",
              "Exit 1 when a metric is worse than the baseline beyond its interval or tolerance; 0 otherwise."),
    "plan": ("dopsd_bench.plan:plan_command",
             "Say what a run will cost (parameters, memory) and whether it can finish, without loading weights."),
}
WORLD_COMMANDS: dict[str, str | tuple[str, str]] = {
    "check": ("dopsd_bench.world.check:check_command",
              "Recompute the embedded world's figures on fixed seeds, each goal with its verdict."),
}


class LazyGroup(TyperGroup):
    """A command group that also offers `lazy` commands (see COMMANDS), imported when they run."""

    lazy: ClassVar[dict[str, str | tuple[str, str]]] = {}

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's own parse errors (an unknown option or command, a value of the wrong type, a missing argument)
        as one red line and exit 2, like every other bad input; a command's own exit code passes through."""
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except Exception as e:
            # typer vendors click privately, so its UsageError / BadParameter are known by their interface
            if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
                raise
            context = getattr(e, "ctx", None)
            where = f"{context.command_path}: " if context is not None else ""
            see = f"; see `{context.command_path} --help`" if context is not None else ""
            message = where + e.format_message().rstrip(".") + see
            err.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", highlight=False)
            raise SystemExit(e.exit_code) from None
        raise SystemExit(code if isinstance(code, int) else 0)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:  # typer vendors click: its Context/Command types
        if cmd_name not in self.commands and cmd_name in self.lazy:
            entry = self.lazy[cmd_name]
            if isinstance(entry, tuple):  # listed from its static help: a stand-in until it runs
                return TyperCommand(cmd_name, help=entry[1], short_help=entry[1])
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name: str) -> Any:
        entry = self.lazy[cmd_name]
        command = load_command(cmd_name, entry[0] if isinstance(entry, tuple) else entry)
        if command is not None:
            self.commands[cmd_name] = command
        return command

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and args[0] in self.lazy:
            self._load(args[0])  # it runs (or shows its own help): the real command
        elif args and args[0] not in self.commands:
            for name in self.lazy:  # a typo: load every command, so "did you mean" can name any of them
                self._load(name)
        return super().resolve_command(ctx, args)

    def list_commands(self, ctx: Any) -> list[str]:
        names = set(self.commands)
        for name, entry in self.lazy.items():
            if isinstance(entry, tuple):
                if importlib.util.find_spec(entry[0].partition(":")[0]) is not None:  # finds, does not import
                    names.add(name)
            elif self.get_command(ctx, name) is not None:
                names.add(name)
        return sorted(names)


def load_command(name: str, ref: str) -> Any:
    """The click command for `module:function`, or None while that module or function does not exist;
    an import error inside an existing module is a bug and propagates."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return None
    if not hasattr(module, attr):
        return None
    single = typer.Typer(add_completion=False)
    single.command(name)(user_errors(getattr(module, attr)))
    return typer.main.get_command(single)


def lazy_group(commands: dict[str, str | tuple[str, str]]) -> type[LazyGroup]:
    return type("LazyGroup", (LazyGroup,), {"lazy": commands})


app = typer.Typer(name="dopsd-bench", cls=lazy_group(COMMANDS), no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False,
                  help="Benchmark suite and training harness for tuning step-distilled text-to-image models.")
world_app = typer.Typer(cls=lazy_group(WORLD_COMMANDS), no_args_is_help=True,
                        help="The embedded procedural world and its models.")
app.add_typer(world_app, name="world")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line, however narrow the terminal
LIST_KINDS = {"methods": METHODS, "tasks": TASKS, "backbones": BACKBONES, "metrics": METRICS}


# what a user can do after Ctrl-C, per command function
INTERRUPTED = {
    "run": "interrupted; continue this cell from its last checkpoint with the same command and --resume",
    "sweep_command": "interrupted; run the same sweep again to continue (finished cells are skipped, an "
                     "unfinished one resumes from its last checkpoint)",
}


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", highlight=False)
    raise typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError (unknown names, bad tasks, bad configs) into one red line on stderr and exit code 2, and
    RunFailed (a cell that could not finish, e.g. NaN samples) into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except RunFailed as e:
            fail(str(e), code=1)
        except KeyboardInterrupt:
            fail(INTERRUPTED.get(fn.__name__, "interrupted"), code=130)

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"dopsd-bench {__version__}")
        raise typer.Exit()


@app.callback()
@user_errors
def main(
    methods_path: Annotated[list[Path] | None, typer.Option(
        "--methods-path", help="a .py file or folder of third-party methods to register (repeatable); "
        "DOPSD_BENCH_METHODS_PATH works too")] = None,
    metrics_path: Annotated[list[Path] | None, typer.Option(
        "--metrics-path", help="a .py file or folder of third-party metrics to register (repeatable); "
        "DOPSD_BENCH_METRICS_PATH works too")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="show dependencies' loading bars and messages "
                                          "(DOPSD_BENCH_VERBOSE=1 works too)")] = False,
) -> None:
    if verbose:
        os.environ["DOPSD_BENCH_VERBOSE"] = "1"  # read where it applies, in this process and in sweep workers
    for path in methods_path or []:
        if not path.exists():
            raise UserError(f"--methods-path {path} does not exist; give a method .py file or a folder of them")
        METHODS.add_path(path)
    for path in metrics_path or []:
        if not path.exists():
            raise UserError(f"--metrics-path {path} does not exist; give a metric .py file or a folder of them")
        METRICS.add_path(path)
        # sweep workers in subprocesses score with the same metrics
        os.environ[PLUGIN_PATH_VARS["metric"]] = os.pathsep.join(
            p for p in (os.environ.get(PLUGIN_PATH_VARS["metric"], ""), str(path.resolve())) if p)


# ---- run / eval -----------------------------------------------------------------------------------------------
def _task_and_instance(task: str, instance: str | None) -> tuple[str, str]:
    """Validate the task and its instance data before any run dir exists; a task file path becomes absolute."""
    from dopsd_bench.tasks import load_task

    spec = load_task(task)
    inst = spec.instance(instance).name
    spec.check(inst)
    if spec.path is not None and task.endswith((".yaml", ".yml")):
        task = str(spec.path.resolve())
    return task, inst


@app.command()
@user_errors
def run(
    method: options.Method = "dopsd",
    task: options.Task = "style",
    instance: options.Instance = None,
    backbone: options.Backbone = "flux2-klein",
    model: options.Model = None,
    seed: Annotated[int, typer.Option(help="training seed (evaluation prompts and seeds are fixed by the task)")] = 0,
    steps: Annotated[int | None, typer.Option(help="training steps (default: the method's)")] = None,
    budget_flops: Annotated[float | None, typer.Option(
        help="training budget in FLOPs instead of steps, e.g. 2e13 (one step is counted, then divided)")] = None,
    budget_seconds: Annotated[float | None, typer.Option(
        help="training budget in wall seconds of the training loop instead of steps, e.g. 120")] = None,
    batch_size: options.BatchSize = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: the method's)")] = None,
    rank: options.Rank = None,
    grad_accum: Annotated[int | None, typer.Option(
        help="minibatches accumulated per optimiser step (default 1): a global batch of batch-size x processes x "
             "this, at one minibatch's memory")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="method config override key=value (repeatable), e.g. --set teacher=frozen")] = None,
    out_dir: options.Out = "runs",
    force: Annotated[bool, typer.Option(help="re-run a cell that already has a result.json")] = False,
    resume: Annotated[bool, typer.Option(help="continue an unfinished cell from its last checkpoint")] = False,
    checkpoint_every: Annotated[int | None, typer.Option(help="save a training checkpoint every N steps")] = None,
    device: options.Device = None,
    dtype: options.Dtype = None,
    gradient_checkpointing: options.GradientCheckpointing = False,
    eval_batch_size: options.EvalBatchSize = None,
    scorer: options.Scorer = None,
    dino: options.Dino = None,
    clip: options.Clip = None,
    teacher_model: options.TeacherModel = None,
    extra_fd: options.ExtraFd = None,
) -> None:
    """Train one method on one task instance, sample at the backbone's native steps, score, and write a run dir."""
    from dopsd_bench.runconfig import RunConfig, parse_overrides

    overrides = parse_overrides(set_ or [])
    task, instance = _task_and_instance(task, instance)  # cheapest first: methods and backbones import torch
    METHODS.get(method)
    BACKBONES.get(backbone)
    cfg = RunConfig(method=method, task=task, instance=instance, backbone=backbone, model=model, seed=seed,
                    steps=steps, budget_flops=budget_flops, budget_seconds=budget_seconds, batch_size=batch_size,
                    lr=lr, rank=rank, grad_accum=grad_accum, overrides=overrides, out_dir=out_dir,
                    force=force, resume=resume, checkpoint_every=checkpoint_every, device=device, dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing, eval_batch_size=eval_batch_size, scorer=scorer,
                    dino=dino, clip=clip, teacher_model=teacher_model, extra_fd=extra_fd)
    from dopsd_bench import runner

    runner.run_cell(cfg)


@app.command("eval")
@user_errors
def eval_(
    lora: Annotated[Path, typer.Option(help="a LoRA in the diffusers format (file or folder), trained anywhere")],
    task: options.Task = "style",
    instance: options.Instance = None,
    backbone: Annotated[str, typer.Option(help="backbone adapter the LoRA was trained for")] = "flux2-klein",
    model: options.Model = None,
    name: Annotated[str, typer.Option(help="method label for the results (as `method` in result.json)")] = "lora",
    seed: Annotated[int, typer.Option(help="seed label of the cell (sampling seeds are fixed by the task)")] = 0,
    out_dir: options.Out = "runs",
    force: Annotated[bool, typer.Option(help="re-score a cell that already has a result.json")] = False,
    device: options.Device = None,
    dtype: options.Dtype = None,
    eval_batch_size: options.EvalBatchSize = None,
    scorer: options.Scorer = None,
    dino: options.Dino = None,
    clip: options.Clip = None,
    teacher_model: options.TeacherModel = None,
    extra_fd: options.ExtraFd = None,
) -> None:
    """Score an adapter trained elsewhere with the same protocol as `run` (same prompts, seeds and metrics)."""
    from dopsd_bench.runconfig import RunConfig

    if not lora.exists():
        raise UserError(f"--lora {lora} does not exist; give a diffusers-format LoRA file or folder")
    task, instance = _task_and_instance(task, instance)
    BACKBONES.get(backbone)
    cfg = RunConfig(method=name, task=task, instance=instance, backbone=backbone, model=model, seed=seed,
                    out_dir=out_dir, force=force, device=device, lora=str(lora.resolve()), dtype=dtype,
                    eval_batch_size=eval_batch_size, scorer=scorer, dino=dino, clip=clip, teacher_model=teacher_model,
                    extra_fd=extra_fd)
    from dopsd_bench import runner

    runner.eval_cell(cfg)


# ---- list -----------------------------------------------------------------------------------------------------
@app.command("list")
@user_errors
def list_(what: Annotated[str, typer.Argument(help="methods, tasks, backbones or metrics")]) -> None:
    """List the registered methods, tasks, backbones or metrics with one-line descriptions."""
    if what not in LIST_KINDS:
        raise UnknownNameError("kind", what, list(LIST_KINDS))
    registry = LIST_KINDS[what]
    entries = registry.catalog()
    table = Table(title=f"{what} ({len(entries)})", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    for name, description in entries.items():
        table.add_row(escape(name), escape(description))  # descriptions may hold [brackets]
    out.print(table)


