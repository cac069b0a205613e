"""Task specs: YAML files that say what to learn and how it is evaluated. A task never touches a model.

A spec names a family (concept | style), a data source and its instances:
- `source: world` — the embedded procedural world; instances are its held-out glyphs (concept) or fill styles
  (style), and the new token is the instance name. Training images, evaluation prompts with their true attributes
  and retention prompts with true renders come from dopsd_bench/world/datasets.py.
- `source: folder` — the user's images. Each instance is a folder (relative to the YAML file) in the DreamBooth
  layout (images + a caption template `prompt`, e.g. "a photo of {token} {class}") or an imagefolder with a
  metadata.jsonl of {"file_name": ..., "text": ...} lines. Evaluation and retention prompts are listed in the YAML.

Sample i of the evaluation uses prompt i % len(prompts) and seed eval_seeds[i]; the same for retention. The
evaluation data never depends on the run seed, so every method and seed is scored on the same prompts and noise.
See tasks/style.yaml for a world task and README.md for a folder task.

A third family, `sequence`, is continual tuning (docs/continual.md): each instance lists rounds in order, each
round an instance of another task (`concept:zorb`, `style:dotted`, `path/to/task.yaml:dog`), and `carry` says how
a round starts from the last (`continue` the same LoRA, or `merge` it and start a fresh one). It is data only:
the runner trains the rounds (dopsd_bench/continual.py). See tasks/sequence.yaml.

    spec = load_task("style")                     # or load_task("path/to/my_task.yaml")
    data = spec.build("dotted", seed=0)           # -> TaskData
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dopsd_bench.errors import TaskError, UnknownNameError
from dopsd_bench.registry import TASKS, builtin_tasks_dir  # the task folders are the TASKS registry's to read

if TYPE_CHECKING:
    import torch

    from dopsd_bench.taskdata import TaskData

__all__ = ["InstanceSpec", "Round", "SequenceSpec", "TaskError", "TaskSpec", "builtin_tasks_dir", "load_task"]

FAMILIES = ("concept", "style")
SEQUENCE_FAMILY = "sequence"
CARRY_MODES = ("continue", "merge")
_SEQUENCE_KEYS = ("name", "description", "family", "instances", "default_instance", "carry")
SOURCES = ("world", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_TOP_KEYS = ("name", "description", "family", "source", "instances", "default_instance", "n_train", "data_seed",
             "eval_prompts", "n_samples", "eval_seeds", "retention_prompts", "n_retention", "retention_seeds",
             "resolution")
_INSTANCE_KEYS = ("path", "token", "prompt", "class")
_PLACEHOLDER = re.compile(r"{([^{}]*)}")


@dataclass
class InstanceSpec:
    name: str
    token: str  # the new word that names the concept/style in prompts
    path: Path | None = None  # folder source: the instance's image folder (absolute)
    prompt: str | None = None  # folder source, DreamBooth layout: caption template for every image
    class_name: str | None = None  # optional class noun for `{class}` in templates ("dog")

    def fill(self, template: str, where: str) -> str:
        """Replace {token} and {class} in a prompt template; anything else in braces is an error."""
        values = {"token": self.token, "class": self.class_name}
        for key in _PLACEHOLDER.findall(template):
            if key not in values:
                raise TaskError(f"{where}: unknown placeholder {{{key}}} in {template!r}; "
                                "allowed: {token}, {class}")
            if values[key] is None:
                raise TaskError(f"{where}: {template!r} uses {{class}} but instance {self.name!r} has no `class`")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


@dataclass
class TaskSpec:
    name: str
    family: str  # "concept" | "style"
    source: str  # "world" | "folder"
    instances: dict[str, InstanceSpec]
    default_instance: str
    eval_prompts: list[str] | None  # folder: templates; world: None (generated)
    n_eval_prompts: int  # world: how many prompts to generate; folder: len(eval_prompts)
    n_samples: int
    eval_seeds: list[int]
    retention_prompts: list[str] | None
    n_retention_prompts: int
    n_retention: int
    retention_seeds: list[int]
    n_train: int | None = 8  # world: renders per instance; folder: None = every image in the folder
    data_seed: int = 0  # fixes the world's evaluation and retention prompts
    resolution: int | None = None  # folder: default image size when build() is not given one
    description: str = ""
    path: Path | None = None  # the YAML file it was read from
    _checked: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.family not in FAMILIES:
            raise TaskError(f"{where}: unknown family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if self.source not in SOURCES:
            raise TaskError(f"{where}: unknown source {self.source!r}; expected one of {', '.join(SOURCES)}")
        if not self.instances:
            raise TaskError(f"{where}: no instances; list at least one under `instances:`")
        if self.default_instance not in self.instances:
            raise UnknownNameError(f"instance of task {self.name!r}", self.default_instance, list(self.instances))
        for key in ("n_eval_prompts", "n_samples", "n_retention_prompts", "n_retention"):
            _positive(getattr(self, key), key, where)
        if self.n_train is not None:
            _positive(self.n_train, "n_train", where)
        if self.resolution is not None:
            _positive(self.resolution, "resolution", where)
        if len(self.eval_seeds) != self.n_samples:
            raise TaskError(f"{where}: eval_seeds has {len(self.eval_seeds)} seeds but n_samples is {self.n_samples}; "
                            "give one seed per sample")
        if len(self.retention_seeds) != self.n_retention:
            raise TaskError(f"{where}: retention_seeds has {len(self.retention_seeds)} seeds but n_retention is "
                            f"{self.n_retention}; give one seed per sample")
        if self.source == "world":
            self._validate_world(where)
        else:
            self._validate_folder(where)

    def _validate_world(self, where: str) -> None:
        from dopsd_bench.world import render

        valid = list(render.HELD_OUT_GLYPHS) if self.family == "concept" else list(render.HELD_OUT_STYLES)
        for inst in self.instances.values():
            if inst.name not in valid:
                raise UnknownNameError(f"world {self.family} in task {self.name!r}", inst.name, valid)
            if inst.path is not None or inst.prompt is not None:
                raise TaskError(f"{where}: world instances take no path/prompt (instance {inst.name!r})")
        if self.n_train is None:
            raise TaskError(f"{where}: a world task needs n_train (how many training renders)")

    def _validate_folder(self, where: str) -> None:
        if not self.eval_prompts:
            raise TaskError(f"{where}: a folder task lists its evaluation prompts under `eval_prompts:`")
        if not self.retention_prompts:
            raise TaskError(f"{where}: a folder task lists general prompts (without the token) under "
                            "`retention_prompts:`")
        for inst in self.instances.values():
            iwhere = f"{where}, instance {inst.name!r}"
            if inst.path is None:
                raise TaskError(f"{iwhere}: needs `path:`, the folder of its training images")
            if not inst.path.is_dir():
                what = "is not a folder" if inst.path.exists() else "does not exist"
                raise TaskError(f"{iwhere}: image folder {inst.path} {what}"
                                + (f" (paths are relative to {self.path.parent})" if self.path else ""))
            for template in self.eval_prompts:
                inst.fill(template, iwhere)
                if "{token}" not in template and not re.search(rf"(?<!\w){re.escape(inst.token)}(?!\w)", template):
                    raise TaskError(f"{iwhere}: evaluation prompt {template!r} names neither {{token}} nor "
                                    f"{inst.token!r}: fidelity would measure a prompt that never asks for the concept")
            if inst.prompt is not None:
                inst.fill(inst.prompt, iwhere)
            for prompt in self.retention_prompts:
                if re.search(rf"(?<!\w){re.escape(inst.token)}(?!\w)", prompt) or "{" in prompt:
                    raise TaskError(f"{iwhere}: retention prompt {prompt!r} mentions the token or a placeholder; "
                                    "retention prompts are general prompts the tuning must not change")

    # ---- instances ----------------------------------------------------------------------------------------
    def instance(self, name: str | None = None) -> InstanceSpec:
        name = self.default_instance if name is None else name
        if name not in self.instances:
            raise UnknownNameError(f"instance of task {self.name!r}", name, list(self.instances))
        return self.instances[name]

    def check(self, instance: str | None = None) -> None:
        """Validate the instance's data without building it: folder listing, captions, and that every image decodes.

        The CLI calls this before a run starts, so bad data fails before any run directory is written.
        """
        inst = self.instance(instance)
        if self.source == "folder" and inst.name not in self._checked:
            for path, _ in self._folder_items(inst):
                _read_image(path, None)
            self._checked.add(inst.name)

    # ---- building -----------------------------------------------------------------------------------------
    def build(self, instance: str | None = None, seed: int = 0, resolution: int | None = None) -> TaskData:
        """The data of one instance. `seed` (the run seed) only draws the world's training renders; evaluation
        prompts and seeds are fixed by the spec. `resolution`: square image size (the backbone's); None keeps the
        world's native size, or uses the YAML `resolution` for folders."""
        inst = self.instance(instance)
        if self.source == "world":
            return self._build_world(inst, seed, resolution)
        return self._build_folder(inst, resolution or self.resolution)

    def training_captions(self, instance: str | None = None, seed: int = 0) -> list[str]:
        """The captions an instance trains on, without reading its images (a world task renders its few tiny
        training scenes): what `plan` tokenizes to size a training step's text."""
        inst = self.instance(instance)
        if self.source == "world":
            from dopsd_bench.world import datasets

            return datasets.training_set(self.family, inst.name, self.n_train, seed=_train_seed(self, inst, seed))[1]
        return [caption for _, caption in self._folder_items(inst)]

    def _build_world(self, inst: InstanceSpec, seed: int, resolution: int | None) -> TaskData:
        from dopsd_bench.taskdata import TaskData
        from dopsd_bench.world import datasets

        train, captions = datasets.training_set(self.family, inst.name, self.n_train,
                                                seed=_train_seed(self, inst, seed))
        prompts, targets = datasets.eval_prompts(self.family, inst.name, self.n_eval_prompts, seed=self.data_seed)
        r_prompts, r_targets, r_real = datasets.retention_prompts(self.n_retention_prompts, seed=self.data_seed)
        if len(r_prompts) < self.n_retention_prompts:
            raise TaskError(f"task {self.name!r}: the world yielded {len(r_prompts)} retention prompts, "
                            f"{self.n_retention_prompts} were asked for; ask for fewer")
        retention_targets = _cycle(r_targets, self.n_retention)
        if self.n_retention > len(r_prompts):  # repeated prompts get fresh true renders, not copies
            extra = datasets.true_renders(retention_targets[len(r_prompts):], seed=self.data_seed)
            r_real = _cat(r_real, extra)
        return TaskData(
            task=self.name, family=self.family, instance=inst.name, token=inst.token,
            train_images=_resize(train, resolution), train_captions=captions,
            eval_prompts=_cycle(prompts, self.n_samples), eval_seeds=list(self.eval_seeds),
            retention_prompts=_cycle(r_prompts, self.n_retention), retention_seeds=list(self.retention_seeds),
            eval_targets=_cycle(targets, self.n_samples), retention_targets=retention_targets,
            retention_real=_resize(r_real, resolution),
        )

    def _build_folder(self, inst: InstanceSpec, resolution: int | None) -> TaskData:
        import torch

        from dopsd_bench.taskdata import TaskData

        if resolution is None:
            raise ValueError(f"task {self.name!r}: folder images need a size; pass resolution= (the backbone's) "
                             "or set `resolution:` in the YAML")
        items = self._folder_items(inst)
        images = torch.stack([_read_image(path, resolution) for path, _ in items])
        where = f"task {self.name!r}, instance {inst.name!r}"
        prompts = [inst.fill(t, where) for t in self.eval_prompts]
        return TaskData(
            task=self.name, family=self.family, instance=inst.name, token=inst.token,
            train_images=images, train_captions=[caption for _, caption in items],
            eval_prompts=_cycle(prompts, self.n_samples), eval_seeds=list(self.eval_seeds),
            retention_prompts=_cycle(self.retention_prompts, self.n_retention),
            retention_seeds=list(self.retention_seeds),
        )

    def _folder_items(self, inst: InstanceSpec) -> list[tuple[Path, str]]:
        """(image path, caption) pairs of a folder instance, validated; sorted by file name."""
        where = f"task {self.name!r}, instance {inst.name!r}"
        folder = inst.path
        if folder is None or not folder.is_dir():
            raise TaskError(f"{where}: image folder {folder} does not exist")
        metadata = folder / METADATA_FILE
        if metadata.exists():
            items = _metadata_items(folder, metadata, where)
        else:
            files = sorted(p for p in folder.iterdir() if _is_image(p))
            if files and inst.prompt is None:
                raise TaskError(f"{where}: {folder} has no {METADATA_FILE}, so the instance needs a caption "
                                "template `prompt:` (e.g. 'a photo of {token} {class}')")
            items = [(p, inst.fill(inst.prompt, where)) for p in files] if files else []
        if not items:
            raise TaskError(f"{where}: no images in {folder}; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
        if self.n_train is not None:
            if self.n_train > len(items):
                raise TaskError(f"{where}: n_train is {self.n_train} but {folder} has {len(items)} images")
            items = items[: self.n_train]
        return items


# ---- loading ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Round:
    """One round of a sequence: an instance of another (concept, style or folder) task."""

    task: str  # as written: a registered name, or a .yaml path (made absolute)
    instance: str

    @property
    def label(self) -> str:
        """`task:instance` with the task's short name: the round's name in tables and result.json."""
        return f"{Path(self.task).stem if self.task.endswith(('.yaml', '.yml')) else self.task}:{self.instance}"

    def spec(self) -> TaskSpec:
        return load_task(self.task)  # type: ignore[return-value]  # checked to be a TaskSpec when parsed


@dataclass
class SequenceInstance:
    name: str
    rounds: list[Round]


@dataclass
class SequenceSpec:
    """A sequence task: named sequences of rounds (the instances), and how state carries from round to round."""

    name: str
    instances: dict[str, SequenceInstance]
    default_instance: str
    carry: str = "continue"
    description: str = ""
    path: Path | None = None
    family: str = SEQUENCE_FAMILY

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.carry not in CARRY_MODES:
            raise TaskError(f"{where}: carry must be one of {', '.join(CARRY_MODES)}, got {self.carry!r}")
        if not self.instances:
            raise TaskError(f"{where}: no sequences; list at least one under `instances:`")
        if self.default_instance not in self.instances:
            raise UnknownNameError(f"instance of task {self.name!r}", self.default_instance, list(self.instances))

    def instance(self, name: str | None = None) -> SequenceInstance:
        name = self.default_instance if name is None else name
        if name not in self.instances:
            raise UnknownNameError(f"instance of task {self.name!r}", name, list(self.instances))
        return self.instances[name]

    def rounds(self, instance: str | None = None) -> list[Round]:
        return list(self.instance(instance).rounds)

    def check(self, instance: str | None = None) -> None:
        """Every round's data, as TaskSpec.check does for one instance (bad images fail before a run starts)."""
        for r in self.rounds(instance):
            r.spec().check(r.instance)


def sequence_from_dict(raw: dict[str, Any], name: str, base_dir: Path, path: Path | None = None) -> SequenceSpec:
    """Parse a `family: sequence` mapping: every round names a task that loads and an instance that it has."""
    where = f"task {name!r}"
    _check_keys(raw, _SEQUENCE_KEYS, where)
    value = raw.get("instances")
    if not isinstance(value, dict) or not value:
        raise TaskError(f"{where}: a sequence task maps each sequence name to its rounds, e.g. "
                        "`instances: {mixed: [concept:zorb, style:dotted]}`; got {value!r}")
    instances = {}
    for seq_name, entries in value.items():
        swhere = f"{where}, sequence {seq_name!r}"
        if not isinstance(entries, list) or len(entries) < 2:
            raise TaskError(f"{swhere}: list at least two rounds as `task:instance` strings; got {entries!r}")
        rounds: list[Round] = []
        for number, entry in enumerate(entries, start=1):
            task, sep, instance = str(entry).rpartition(":")
            if not isinstance(entry, str) or not sep or not task or not instance:
                raise TaskError(f"{swhere}: round {number} must be `task:instance` (e.g. concept:zorb); got {entry!r}")
            if task.endswith((".yaml", ".yml")):
                task = str((base_dir / task).resolve())
            spec = load_task(task)
            if not isinstance(spec, TaskSpec):
                raise TaskError(f"{swhere}: round {number} ({entry}) is itself a sequence; rounds are concept, style "
                                "or folder task instances")
            round_ = Round(task=task, instance=spec.instance(instance).name)
            if round_ in rounds:
                raise TaskError(f"{swhere}: round {number} repeats {entry}; each instance is learned once, so the "
                                "accuracy matrix has one column per round")
            rounds.append(round_)
        instances[str(seq_name)] = SequenceInstance(name=str(seq_name), rounds=rounds)
    return SequenceSpec(name=name, instances=instances,
                        default_instance=str(raw.get("default_instance", next(iter(instances)))),
                        carry=str(raw.get("carry", "continue")),
                        description=str(raw.get("description", "")).strip(), path=path)


def load_task(name_or_path: str | Path) -> TaskSpec | SequenceSpec:
    """A registered task name ("style") or a path to a task .yaml; unknown names raise UnknownNameError.
    A `family: sequence` file gives a SequenceSpec."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TaskError(f"task file {text} does not exist; give a registered task name or a path to a .yaml")
        return load_task_file(path)
    return load_task_file(Path(TASKS.get(text)))


def load_task_file(path: Path) -> TaskSpec | SequenceSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"task file {path} is not valid YAML: {' '.join(str(e).split())}") from e
    except UnicodeDecodeError as e:
        raise TaskError(f"task file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise TaskError(f"cannot read task file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise TaskError(f"task file {path} must hold a mapping of keys (family, source, instances, ...)")
    if raw.get("family") == SEQUENCE_FAMILY:
        return sequence_from_dict(raw, name=str(raw.get("name") or path.stem), base_dir=path.parent, path=path)
    return spec_from_dict(raw, name=str(raw.get("name") or path.stem), base_dir=path.parent, path=path)


def spec_from_dict(raw: dict[str, Any], name: str, base_dir: Path, path: Path | None = None) -> TaskSpec:
    """Parse the YAML mapping of a task (defaults filled in, every value checked)."""
    where = f"task {name!r}"
    _check_keys(raw, _TOP_KEYS, where)
    for key in ("family", "source", "instances"):
        if key not in raw:
            raise TaskError(f"{where}: missing required key `{key}`")
    if raw["family"] not in FAMILIES:
        raise TaskError(f"{where}: unknown family {raw['family']!r}; expected one of {', '.join(FAMILIES)}")
    source = raw["source"]
    if source not in SOURCES:
        raise TaskError(f"{where}: unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    instances = _parse_instances(raw["instances"], source, base_dir, where)

    # a world task may give only n_samples / n_retention: one generated prompt per sample
    eval_prompts, n_eval = _parse_prompts(raw.get("eval_prompts", raw.get("n_samples")), source, "eval_prompts",
                                          where)
    retention, n_ret_prompts = _parse_prompts(raw.get("retention_prompts", raw.get("n_retention")), source,
                                              "retention_prompts", where)
    n_samples = raw.get("n_samples", n_eval)
    n_retention = raw.get("n_retention", n_ret_prompts)
    _positive(n_samples, "n_samples", where)
    _positive(n_retention, "n_retention", where)
    eval_seeds = _parse_seeds(raw.get("eval_seeds", {"range": [0, n_samples]}), "eval_seeds", where)
    retention_seeds = _parse_seeds(raw.get("retention_seeds", {"range": [100_000, n_retention]}),
                                   "retention_seeds", where)
    default_n_train = 8 if source == "world" else None
    data_seed = raw.get("data_seed", 0)
    if isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0:
        raise TaskError(f"{where}: data_seed must be an integer >= 0, got {data_seed!r}")
    return TaskSpec(
        name=name, family=raw["family"], source=source, instances=instances,
        default_instance=str(raw.get("default_instance", next(iter(instances), ""))),
        eval_prompts=eval_prompts, n_eval_prompts=n_eval, n_samples=n_samples, eval_seeds=eval_seeds,
        retention_prompts=retention, n_retention_prompts=n_ret_prompts, n_retention=n_retention,
        retention_seeds=retention_seeds, n_train=raw.get("n_train", default_n_train), data_seed=data_seed,
        resolution=raw.get("resolution"), description=str(raw.get("description", "")).strip(), path=path,
    )


def _parse_instances(value: Any, source: str, base_dir: Path, where: str) -> dict[str, InstanceSpec]:
    if source == "world":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TaskError(f"{where}: world instances are a list of names, e.g. [zorb, kwel]; got {value!r}")
        return {v: InstanceSpec(name=v, token=v) for v in value}  # the world's token is the instance name
    if not isinstance(value, dict):
        raise TaskError(f"{where}: folder instances are a mapping name -> {{path, token, prompt, class}}; "
                        f"got {value!r}")
    out = {}
    for name, entry in value.items():
        if not isinstance(entry, dict):
            raise TaskError(f"{where}: instance {name!r} must be a mapping with at least `path`; got {entry!r}")
        _check_keys(entry, _INSTANCE_KEYS, f"{where}, instance {name!r}")
        token = str(entry.get("token", name))
        if not token.strip() or any(c.isspace() for c in token):
            raise TaskError(f"{where}, instance {name!r}: token must be one word, got {token!r}")
        path = entry.get("path")
        out[str(name)] = InstanceSpec(
            name=str(name), token=token, path=(base_dir / str(path)).resolve() if path is not None else None,
            prompt=entry.get("prompt"), class_name=entry.get("class"))
    return out


def _parse_prompts(value: Any, source: str, key: str, where: str) -> tuple[list[str] | None, int]:
    """Folder: a non-empty list of strings. World: {count: N} (or a bare N): N generated prompts."""
    if source == "world":
        count = value.get("count") if isinstance(value, dict) else value
        if isinstance(value, dict):
            _check_keys(value, ("count",), f"{where}, {key}")
        _positive(count, f"{key}.count", where)
        return None, count
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskError(f"{where}: `{key}` must be a non-empty list of prompts; got {value!r}")
    return list(value), len(value)


def _parse_seeds(value: Any, key: str, where: str) -> list[int]:
    """A list of ints, or {range: [start, count]}."""
    if isinstance(value, dict):
        _check_keys(value, ("range",), f"{where}, {key}")
        rng = value.get("range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) and v >= 0 for v in rng)):
            raise TaskError(f"{where}: {key}.range must be [start, count] with integers >= 0; got {rng!r}")
        return list(range(rng[0], rng[0] + rng[1]))
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        if len(set(value)) != len(value):
            raise TaskError(f"{where}: {key} repeats a seed; each sample needs its own")
        return list(value)
    raise TaskError(f"{where}: {key} must be a list of integers >= 0 or {{range: [start, count]}}; got {value!r}")


def _check_keys(raw: dict, valid: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in valid:
            raise UnknownNameError(f"key in {where}", str(key), list(valid))


def _positive(value: Any, key: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TaskError(f"{where}: {key} must be a positive integer, got {value!r}")


# ---- data helpers -----------------------------------------------------------------------------------------
def _train_seed(spec: TaskSpec, inst: InstanceSpec, seed: int) -> int:
    """A training-set seed per (data seed, instance, run seed), far from the evaluation/retention draws."""
    digest = hashlib.sha256(f"train|{spec.data_seed}|{inst.name}|{seed}".encode()).digest()
    return 1_000 + int.from_bytes(digest[:4], "little") % (2**31 - 1_000)


def _cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([a, b], dim=0)


def _resize(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution is None or images.shape[-1] == resolution:
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1, 1)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _metadata_items(folder: Path, metadata: Path, where: str) -> list[tuple[Path, str]]:
    """Imagefolder captions: one {"file_name": ..., "text": ...} per line, exactly one per image in the folder."""
    captions: dict[str, str] = {}
    try:
        text = metadata.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{where}: {metadata} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") \
            from e
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: {metadata} line {number} is not JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"),
                                                                                                  str):
            raise TaskError(f"{where}: {metadata} line {number} needs string keys \"file_name\" and \"text\"")
        name = Path(row["file_name"]).as_posix()
        if name in captions:
            raise TaskError(f"{where}: {metadata} gives {name} two captions (line {number}); keep one")
        captions[name] = row["text"]
    images = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if _is_image(p)}
    missing = [n for n in captions if n not in images]
    if missing:
        raise TaskError(f"{where}: {metadata} names images that are not in {folder}: {_few(missing)}")
    uncaptioned = [n for n in images if n not in captions]
    if uncaptioned:
        raise TaskError(f"{where}: images without a caption in {metadata}: {_few(uncaptioned)}; "
                        "add a line for each or remove them")
    return [(images[n], captions[n]) for n in sorted(captions)]


def _few(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _read_image(path: Path, resolution: int | None) -> torch.Tensor | None:
    """Decode one image (RGB), center-crop and resize it to `resolution`; (3, R, R) in [-1, 1]. None: only check."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")  # decodes the whole file, so truncated data fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TaskError(f"cannot read image {path}: {e}") from e
    if resolution is None:
        return None
    import numpy as np
    import torch

    rgb = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
