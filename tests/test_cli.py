"""The CLI contract: exit 2 with one red line (no traceback) on bad input, `list`, and the RunConfig that `run` and
`eval` hand to the runner (a fake runner here; the real one is tested with the training loop)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import dopsd_bench
from dopsd_bench.cli import app
from dopsd_bench.errors import ConfigError
from dopsd_bench.registry import BACKBONES, METHODS, METRICS, TASKS
from dopsd_bench.runconfig import RunConfig, parse_overrides

cli = CliRunner()


def invoke(*args: str):
    return cli.invoke(app, list(args))


def assert_user_error(result, *needles: str) -> str:
    text = result.output  # stdout + stderr as the user sees them
    assert result.exit_code == 2, text
    assert "Traceback" not in text and "error:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


@pytest.fixture
def fake_runner(monkeypatch):
    """dopsd_bench.runner replaced by one that records the config and writes a result.json like the real one."""
    calls = []

    def run_cell(cfg: RunConfig):
        calls.append(cfg)
        run_dir = cfg.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps({"method": cfg.method}))

    module = types.ModuleType("dopsd_bench.runner")
    module.run_cell = run_cell
    module.eval_cell = run_cell
    monkeypatch.setitem(sys.modules, "dopsd_bench.runner", module)
    # `from dopsd_bench import runner` reads the package attribute first, set once another test imported the real one
    monkeypatch.setattr(dopsd_bench, "runner", module, raising=False)
    return calls


# ---- unknown names ------------------------------------------------------------------------------------------
def test_unknown_method_lists_valid_names():
    stderr = assert_user_error(invoke("run", "--method", "nosuch"), "unknown method 'nosuch'")
    for name in METHODS.names():
        assert name in stderr
    assert_user_error(invoke("run", "--method", "dopsdd"), "did you mean 'dopsd'?")


def test_unknown_task_and_instance_and_backbone():
    assert_user_error(invoke("run", "--task", "nosuch"), "unknown task 'nosuch'", "concept", "style")
    assert_user_error(invoke("run", "--task", "style", "--instance", "doted"), "did you mean 'dotted'?", "checkered")
    stderr = assert_user_error(invoke("run", "--backbone", "flux"), "unknown backbone 'flux'")
    assert all(name in stderr for name in BACKBONES.names())


def test_console_script_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "dopsd_bench", "run", "--task", "nosuch"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "unknown task 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


# ---- list -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "registry"), [("methods", METHODS), ("tasks", TASKS), ("backbones", BACKBONES),
                                                ("metrics", METRICS)])
def test_list(kind, registry):
    result = cli.invoke(app, ["list", kind], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"{kind} ({len(registry.names())})" in result.stdout
    for name in registry.names():
        assert name in result.stdout


def test_list_tasks_shows_instances():
    result = cli.invoke(app, ["list", "tasks"], terminal_width=200)
    assert "concept: zorb, kwel, fenx, drup" in result.stdout and "style: dotted, checkered" in result.stdout


def test_list_unknown_kind():
    assert_user_error(invoke("list", "method"), "did you mean 'methods'?")


def test_methods_path_option(restore_registries, tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text("from dopsd_bench.registry import METHODS\n\n"
                      "@METHODS.register('cli-plugin', description='a method from --methods-path')\n"
                      "class Mine:\n    pass\n")
    result = cli.invoke(app, ["--methods-path", str(plugin), "list", "methods"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "cli-plugin" in result.stdout and "a method from --methods-path" in result.stdout
    assert_user_error(invoke("--methods-path", str(tmp_path / "missing.py"), "list", "methods"), "does not exist")


# ---- run / eval hand a RunConfig to the runner ---------------------------------------------------------------------
def test_run_builds_the_config(fake_runner, tmp_path):
    result = invoke("run", "--method", "sft", "--task", "concept", "--steps", "3", "--lr", "1e-3", "--set", "a=1",
                    "--set", "b.c=x=y", "--out", str(tmp_path), "--seed", "2")
    assert result.exit_code == 0, result.output
    (cfg,) = fake_runner
    assert (cfg.method, cfg.task, cfg.instance, cfg.backbone, cfg.seed) == ("sft", "concept", "zorb", "flux2-klein", 2)
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.rank) == (3, 1e-3, None, None)
    assert cfg.overrides == {"a": "1", "b.c": "x=y"} and cfg.out_dir == str(tmp_path)


def test_run_defaults(fake_runner):
    assert invoke("run").exit_code == 0
    (cfg,) = fake_runner
    assert (cfg.method, cfg.task, cfg.instance, cfg.backbone, cfg.model) == ("dopsd", "style", "dotted",
                                                                               "flux2-klein", None)


@pytest.mark.parametrize(("args", "needle"), [
    (["--steps", "0"], "steps must be a positive integer"),
    (["--lr", "-1"], "lr must be a positive"),
    (["--set", "novalue"], "--set expects key=value"),
    (["--set", "a=1", "--set", "a=2"], "given twice"),
    (["--force", "--resume"], "exclude each other"),
    (["--device", "gpu0"], "device must look like"),
    (["--device", "meta"], "device must look like"),
    (["--seed", "4294967296"], "seed must be an integer in [0, 2**32)"),
    (["--model", "/nonexistent/model"], "is not a folder"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be an integer >= 0"),
])
def test_run_bad_config(fake_runner, args, needle):
    assert_user_error(invoke("run", *args), needle)
    assert fake_runner == []


def test_folder_task_with_corrupt_image_fails_before_the_run(fake_runner, tmp_path):
    images = tmp_path / "dog"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (60 * i, 80, 90)).save(images / f"{i}.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "dog.yaml").write_text(
        "family: concept\nsource: folder\ninstances:\n  dog: {path: dog, token: sks, prompt: 'a photo of sks dog'}\n"
        "eval_prompts: ['a sks dog on a beach']\nretention_prompts: ['a cat']\n")
    out = tmp_path / "runs"
    result = invoke("run", "--method", "sft", "--task", str(tmp_path / "dog.yaml"), "--out", str(out))
    assert_user_error(result, "cannot read image", str(images / "corrupt.jpg"))
    assert fake_runner == [] and not list(tmp_path.rglob("result.json"))
    (images / "corrupt.jpg").unlink()
    assert invoke("run", "--method", "sft", "--task", str(tmp_path / "dog.yaml"), "--out", str(out)).exit_code == 0
    (cfg,) = fake_runner
    assert cfg.task == str((tmp_path / "dog.yaml").resolve()) and cfg.instance == "dog"
    assert (out / cfg.cell_id() / "result.json").exists() and cfg.cell_id().startswith("flux2-klein/dog-dog/sft/")


def test_eval(fake_runner, tmp_path):
    assert_user_error(invoke("eval", "--lora", str(tmp_path / "nope")), "does not exist")
    lora = tmp_path / "adapter"
    lora.mkdir()
    result = invoke("eval", "--lora", str(lora), "--task", "concept", "--instance", "fenx", "--name", "mine")
    assert result.exit_code == 0, result.output
    (cfg,) = fake_runner
    assert (cfg.method, cfg.instance, cfg.lora) == ("mine", "fenx", str(lora.resolve()))


# ---- RunConfig ------------------------------------------------------------------------------------------------
def test_cell_id_is_stable_and_hashes_non_defaults():
    base = RunConfig(method="dopsd", task="style", instance="dotted", seed=3)
    assert base.cell_id() == "flux2-klein/style-dotted/dopsd/seed3"
    assert RunConfig(method="dopsd", task="style", seed=3).cell_id() == base.cell_id()  # default instance
    a = RunConfig(method="dopsd", task="style", instance="dotted", seed=3, steps=10, overrides={"k": "v"})
    b = RunConfig(method="dopsd", task="style", instance="dotted", seed=3, overrides={"k": "v"}, steps=10)
    c = RunConfig(method="dopsd", task="style", instance="dotted", seed=3, steps=11, overrides={"k": "v"})
    assert a.cell_id() == b.cell_id() != c.cell_id() and a.cell_id().startswith(base.cell_id() + "-")
    assert RunConfig(method="sft", task="/x/my task.yaml", instance="a b").cell_id() == \
        "flux2-klein/my_task-a_b/sft/seed0"
    assert RunConfig(method="sft", task="style", model="other/model").cell_id() != \
        RunConfig(method="sft", task="style").cell_id()


def test_run_config_round_trip_and_validation():
    cfg = RunConfig(method="sft", task="concept", instance="kwel", lr=1, overrides={"x": "1"})
    assert cfg.lr == 1.0 and RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown RunConfig fields"):
        RunConfig.from_dict({**cfg.to_dict(), "stpes": 3})
    for bad in ({"seed": -1}, {"rank": 0}, {"batch_size": 2.5}, {"lr": float("nan")}, {"method": ""},
                {"overrides": {"bad key": "1"}}, {"overrides": {"k": 1}}, {"checkpoint_every": True}):
        with pytest.raises(ConfigError):
            RunConfig(**{"method": "sft", "task": "style", **bad})
    assert parse_overrides(["a=1", "b.c= x "]) == {"a": "1", "b.c": " x "}
    assert Path(RunConfig(method="sft", task="style", out_dir="o").run_dir()) == \
        Path("o/flux2-klein/style-dotted/sft/seed0")


# ---- commands from other modules load on demand -----------------------------------------------------------------
def test_lazy_commands(monkeypatch):
    from dopsd_bench import cli as cli_module
    from dopsd_bench.errors import UserError

    def fake_command(fail: bool = False) -> None:
        """A command from another module."""
        if fail:
            raise UserError("bad input for the fake command")
        print("fake ran")

    module = types.ModuleType("fake_cli_module")
    module.fake_command = fake_command
    monkeypatch.setitem(sys.modules, "fake_cli_module", module)
    monkeypatch.setitem(cli_module.COMMANDS, "fake", "fake_cli_module:fake_command")
    monkeypatch.setitem(cli_module.COMMANDS, "absent", "module_that_is_not_written_yet:command")
    monkeypatch.setitem(cli_module.COMMANDS, "unnamed", "fake_cli_module:no_such_function")
    assert invoke("fake").stdout.strip() == "fake ran"
    assert_user_error(invoke("fake", "--fail"), "bad input for the fake command")
    help_text = cli.invoke(app, ["--help"], terminal_width=200).stdout
    assert "fake" in help_text and "A command from another module." in help_text
    assert "absent" not in help_text and "unnamed" not in help_text
    assert invoke("absent").exit_code == 2 and "No such command" in invoke("absent").output
    assert "Did you mean 'fake'" in invoke("fakee").output


def test_world_check_of_a_folder_without_a_build_is_a_user_error(tmp_path):
    (tmp_path / "glyphworld-base").mkdir()
    assert_user_error(invoke("world", "check", "--models", str(tmp_path)),
                      "expected a build folder", "missing: glyphworld-base, glyphworld-turbo")


def test_world_check_with_too_few_prompts_is_a_user_error():
    assert_user_error(invoke("world", "check", "--prompts", "4"), "--prompts 4", "at least 16")


# ---- cold start: --help and list read static text, not the modules behind it -------------------------------------
def test_static_command_help_is_the_commands_own_docstring():
    import importlib

    from dopsd_bench import cli as cli_module

    for table in (cli_module.COMMANDS, cli_module.WORLD_COMMANDS):
        for name, (ref, short) in table.items():
            module, _, attr = ref.partition(":")
            doc = getattr(importlib.import_module(module), attr).__doc__
            assert doc.strip().splitlines()[0] == short, name


@pytest.mark.parametrize("registry", [METHODS, BACKBONES, METRICS], ids=lambda r: r.kind)
def test_catalog_read_without_import_is_what_the_registry_describes(registry):
    static = registry._catalog()  # the source-read entries that `list` shows when no plug-in is configured
    assert static and dict(sorted(static.items())) == registry.describe()


@pytest.mark.parametrize("args", [["--help"], ["world", "--help"], ["list", "methods"], ["list", "metrics"],
                                  ["list", "backbones"], ["list", "tasks"]])
def test_help_and_list_import_neither_torch_nor_pandas(args):
    code = ("import sys; from dopsd_bench.cli import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'torchmetrics') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_a_failed_run_is_one_line_and_exit_1(monkeypatch):
    from dopsd_bench import cli as cli_module
    from dopsd_bench.errors import NonFiniteError

    def nan_command() -> None:
        """A command whose model produced NaN."""
        raise NonFiniteError("the tuned model's samples hold NaN or inf (8 of 8)")

    module = types.ModuleType("fake_nan_module")
    module.nan_command = nan_command
    monkeypatch.setitem(sys.modules, "fake_nan_module", module)
    monkeypatch.setitem(cli_module.COMMANDS, "nan", "fake_nan_module:nan_command")
    result = invoke("nan")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == ["error: the tuned model's samples hold NaN or inf (8 of 8)"]


def test_ctrl_c_is_one_line_saying_how_to_continue(monkeypatch):
    from dopsd_bench import runner

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_cell", interrupted)
    result = invoke("run", "--steps", "3")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "--resume" in result.stderr


@pytest.mark.parametrize("args, needles", [
    (["run", "--methd", "sft"], ["dopsd-bench run: No such option: --methd", "--method", "dopsd-bench run --help"]),
    (["run", "--seed", "abc"], ["Invalid value for '--seed'", "integer"]),
    (["nosuch"], ["dopsd-bench: No such command 'nosuch'"]),
    (["world", "nosuch"], ["dopsd-bench world: No such command"]),
    (["list"], ["Missing argument"]),
])
def test_parse_errors_are_one_line_with_exit_2(args, needles):
    """click's own parse errors (before any command runs) keep the one-line contract of every other bad input."""
    assert_user_error(invoke(*args), *needles)


def test_parse_errors_leave_exit_codes_of_commands_and_help_alone():
    assert invoke("--help").exit_code == 0 and invoke("run", "--help").exit_code == 0
    assert invoke("--version").exit_code == 0
    assert_user_error(invoke("run", "--method", "nosuch"), "unknown method 'nosuch'")
