"""Name -> object registries for methods, tasks, backbones and metrics (lm-evaluation-harness style).

    @METHODS.register("sft", description="flow-matching LoRA fine-tune")
    class SFT(Method): ...

    METHODS.get("sft")      # -> the class; an unknown name raises UnknownNameError with "did you mean"

Registries fill themselves lazily on first lookup, so importing this module is cheap and plug-in modules can
import it without cycles:
- METHODS: every module of the shipped `dopsd_bench.methods` package (the top-level methods/ folder), entry points
  in the group `dopsd_bench.methods`, and third-party .py files or folders named by DOPSD_BENCH_METHODS_PATH
  (os.pathsep-separated) or `dopsd-bench --methods-path PATH`.
- BACKBONES: dopsd_bench.backbones.{flux2,zimage} (skipped while a module does not exist) + group
  `dopsd_bench.backbones`.
- METRICS: the shipped specs of `dopsd_bench.metrics.info`, entry points in the group `dopsd_bench.metrics`, and
  third-party .py files or folders named by DOPSD_BENCH_METRICS_PATH or `dopsd-bench --metrics-path PATH`.
- TASKS: the YAML files of the shipped tasks folder and of DOPSD_BENCH_TASKS_PATH folders, by file stem (read here, so
  dopsd_bench/tasks.py, which reads a task file, imports this module and not the other way round).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dopsd_bench.errors import DuplicateNameError, TaskError, UnknownNameError, UserError

__all__ = ["BACKBONES", "METHODS", "METRICS", "TASKS", "Registry", "UnknownNameError", "load_module_from_path"]


class Registry:
    """A named collection of plug-ins of one kind, filled by `register` and, once, by an optional loader."""

    def __init__(self, kind: str, loader: Callable[[Registry], None] | None = None,
                 catalog: Callable[[], dict[str, str]] | None = None, group: str | None = None):
        self.kind = kind  # singular noun for messages: "method", "task", ...
        self._entries: dict[str, tuple[Any, str]] = {}
        self._loader = loader
        self._catalog = catalog  # the shipped entries' descriptions, read without importing them
        self._group = group  # entry-point group of third-party plug-ins
        self._loaded = loader is None
        self.extra_paths: list[Path] = []  # third-party plug-in files/folders (see METHODS)

    def register(self, name: str, description: str = "") -> Callable[[Any], Any]:
        """Decorator: register the decorated object under `name` and return it unchanged."""

        def decorator(obj: Any) -> Any:
            self.add(name, obj, description)
            return obj

        return decorator

    def add(self, name: str, obj: Any, description: str = "") -> None:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"{self.kind} name must be a non-empty string without spaces, got {name!r}")
        if name in self._entries and self._entries[name][0] is not obj:
            raise DuplicateNameError(f"{self.kind} {name!r} is registered twice: {_where(self._entries[name][0])} and "
                             f"{_where(obj)}; rename one of them")
        self._entries[name] = (obj, description or _describe(obj))

    def get(self, name: str) -> Any:
        self._ensure_loaded()
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.names())
        return self._entries[name][0]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def objects(self) -> dict[str, Any]:
        """name -> registered object, in registration order (the shipped entries first)."""
        self._ensure_loaded()
        return {n: obj for n, (obj, _) in self._entries.items()}

    def describe(self) -> dict[str, str]:
        """name -> one-line description, sorted by name."""
        self._ensure_loaded()
        return {n: self._entries[n][1] for n in sorted(self._entries)}

    def catalog(self) -> dict[str, str]:
        """What `describe` returns, without importing the shipped plug-ins (torch and friends) where their
        descriptions can be read as they are written: `list` stays fast. Third-party plug-ins are imported."""
        plugins = self.extra_paths or _env_paths(PLUGIN_PATH_VARS.get(self.kind, "")) or (
            self._group and importlib.metadata.entry_points(group=self._group))
        if self._loaded or self._catalog is None or plugins:
            return self.describe()
        return dict(sorted(self._catalog().items()))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def add_path(self, path: str | Path) -> None:
        """Also load plug-ins from a .py file or a folder of them (now, if the registry is already loaded)."""
        path = Path(path)
        self.extra_paths.append(path)
        if self._loaded:
            _load_path(path, f"--{self.kind}s-path")

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: plug-in modules call register() while the loader runs
        try:
            self._loader(self)
        except BaseException:
            self._loaded = False
            raise


def _describe(obj: Any) -> str:
    text = getattr(obj, "description", "")
    if (not isinstance(text, str) or not text) and (inspect.isclass(obj) or inspect.isroutine(obj)):
        text = inspect.getdoc(obj) or ""  # only code has a docstring worth showing (not a Path's class doc)
    if not isinstance(text, str) or not text.strip():
        return ""
    return text.strip().splitlines()[0]


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# ---- loaders ------------------------------------------------------------------------------------------------
def import_submodules(package: str) -> None:
    """Import `package` and each of its modules (not starting with "_"); a package that does not exist is skipped."""
    try:
        pkg = importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name == package:
            return
        raise
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def import_optional(module: str) -> None:
    """Import `module` if it exists; a module that is missing itself is skipped, errors inside it are not."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise


def load_entry_points(registry: Registry, group: str) -> None:
    """Entry points may name a module (which registers on import) or an object (registered under the entry's name)."""
    for ep in importlib.metadata.entry_points(group=group):
        obj = ep.load()
        if inspect.ismodule(obj) or any(o is obj for o, _ in registry._entries.values()):
            continue
        registry.add(ep.name, obj)


def load_module_from_path(path: Path) -> Any:
    """Import one .py file under a private, stable module name (so dataclasses and pickling find it)."""
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"dopsd_bench_plugins.{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}: expected a Python file ending in .py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_path(path: Path, origin: str) -> None:
    if path.is_dir():
        for file in sorted(path.glob("*.py")):
            if not file.name.startswith("_"):
                load_module_from_path(file)
    elif path.is_file() and path.suffix == ".py":
        load_module_from_path(path)
    else:
        raise UserError(f"plug-in path {str(path)!r} (from {origin}) is neither a .py file nor a folder; "
                        "give a .py file or a folder of them")


def _env_paths(var: str) -> list[Path]:
    return [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p.strip()]


PLUGIN_PATH_VARS = {"method": "DOPSD_BENCH_METHODS_PATH", "metric": "DOPSD_BENCH_METRICS_PATH"}


def registered_in_source(files: list[Path], registry_name: str) -> dict[str, str]:
    """name -> description of each `@<registry_name>.register("name", description="...")` decorator in `files`, read
    from their source without importing them (the shipped plug-ins write them so; a test holds the result equal to
    the imported registry's `describe`)."""
    import ast

    found = {}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register"
                        and isinstance(deco.func.value, ast.Name) and deco.func.value.id == registry_name):
                    name = ast.literal_eval(deco.args[0])
                    found[name] = next((ast.literal_eval(k.value) for k in deco.keywords if k.arg == "description"),
                                       "")
    return found


def _package_files(package: str, only: tuple[str, ...] = ()) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.py")
                   if not f.name.startswith("_"))
    return [f for f in files if not only or f.stem in only]


def _methods_catalog() -> dict[str, str]:
    return registered_in_source(_package_files("dopsd_bench.methods"), "METHODS")


def _backbones_catalog() -> dict[str, str]:
    return registered_in_source(_package_files("dopsd_bench.backbones", ("flux2", "zimage")), "BACKBONES")


def _metrics_catalog() -> dict[str, str]:
    info = importlib.import_module("dopsd_bench.metrics.info")
    return {name: spec.description for name, spec in info.METRIC_INFO.items()}


def _load_methods(registry: Registry) -> None:
    import_submodules("dopsd_bench.methods")
    load_entry_points(registry, "dopsd_bench.methods")
    var = PLUGIN_PATH_VARS["method"]
    for path in _env_paths(var):
        _load_path(path, var)
    for path in registry.extra_paths:
        _load_path(path, "--methods-path")


def _load_backbones(registry: Registry) -> None:
    for module in ("dopsd_bench.backbones.flux2", "dopsd_bench.backbones.zimage"):
        import_optional(module)
    load_entry_points(registry, "dopsd_bench.backbones")


def _load_metrics(registry: Registry) -> None:
    importlib.import_module("dopsd_bench.metrics.info")  # the shipped metrics (torch-free: specs only)
    load_entry_points(registry, "dopsd_bench.metrics")
    var = PLUGIN_PATH_VARS["metric"]
    for path in _env_paths(var):
        _load_path(path, var)
    for path in registry.extra_paths:
        _load_path(path, "--metrics-path")


def builtin_tasks_dir() -> Path:
    """The shipped tasks folder: the `dopsd_bench.tasks_data` package when installed, else ./tasks of a checkout."""
    try:
        spec = importlib.util.find_spec("dopsd_bench.tasks_data")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "tasks"


def task_dirs() -> list[Path]:
    """The shipped tasks folder, then the folders in DOPSD_BENCH_TASKS_PATH (os.pathsep-separated)."""
    return [builtin_tasks_dir(), *_env_paths("DOPSD_BENCH_TASKS_PATH")]


def _load_tasks(registry: Registry) -> None:
    """Register every *.yaml of the task folders by file stem (a task's format: dopsd_bench/tasks.py)."""
    for folder in task_dirs():
        if not folder.is_dir():
            raise TaskError(f"task folder {folder} (from DOPSD_BENCH_TASKS_PATH) does not exist")
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.stem in registry._entries:
                if Path(registry._entries[path.stem][0]).resolve() == path.resolve():
                    continue
                raise TaskError(f"two tasks are named {path.stem!r}: {registry._entries[path.stem][0]} and {path}; "
                                "rename one")
            registry.add(path.stem, path, description=_peek_description(path))


def _peek_description(path: Path) -> str:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        return f"(invalid YAML: {str(e).splitlines()[0]})"
    except (OSError, UnicodeDecodeError) as e:
        return f"(unreadable: {e})"
    if not isinstance(raw, dict):
        return "(invalid: not a mapping)"
    desc = str(raw.get("description", "")).strip()
    instances = raw.get("instances")
    names = list(instances) if isinstance(instances, (list, dict)) else []
    head = f"{raw.get('family', '?')}: {', '.join(map(str, names))}"
    return f"{head} — {desc}" if desc else head


METHODS = Registry("method", _load_methods, _methods_catalog, "dopsd_bench.methods")
TASKS = Registry("task", _load_tasks)
BACKBONES = Registry("backbone", _load_backbones, _backbones_catalog, "dopsd_bench.backbones")
METRICS = Registry("metric", _load_metrics, _metrics_catalog, "dopsd_bench.metrics")
