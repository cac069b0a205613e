"""Continual tuning: a sequence task's rounds trained one after another on one model, scored after every round.

    dopsd-bench run --method sft --task sequence --steps 20          # the embedded world's mixed sequence
    dopsd-bench run --method dopsd --task sequence --instance concepts --set carry=merge

Round k trains the method through the shared loop, with the run's budget, on round k's training set only (no
earlier round's data unless `--set replay=true`, which adds every earlier round's training set), starting from
where round k-1 ended. The task's `carry` (or `--set carry=...`) says how:
- `continue` (default): the same LoRA adapters train on (D-OPSD's teacher follows its rule in methods/dopsd.py);
- `merge`: after a round its student adapter is merged into the denoiser's weights and every adapter is dropped,
  so the next round starts fresh adapters on the merged model.
Round 1 uses the run seed itself (it trains exactly as the single cell of its task instance does); later rounds use
seeds derived from it. After every round, on the main process: the single run's scoring on that round's instance
(retention and step curve included, vs the untuned model) and the fidelity on every earlier instance with the same
prompts, seeds and native steps; from them the accuracy matrix R[i][j], ACC, BWT and forgetting. For forward
transfer, each round also scores the untuned model on its instance and, before the next round trains, the model on
the next round's instance (docs/continual.md).

Run dir: config.json; rounds/NN-<task>-<instance>/ with train_log.jsonl, adapter/, carry.pt (every LoRA weight at
the end of the round) and round.json (written last: the round is finished); then result.json (schema 2, with
`rounds` and `sequence`), samples.png (the final model on every instance's first prompts) and, for carry=continue,
adapter/ (the final adapter). A finished round is never trained again: a sequence stopped in round k continues
at round k (from its checkpoint with --resume), with the model rebuilt from the finished rounds' carry.pt.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dopsd_bench import rundir, runner
from dopsd_bench.errors import ConfigError
from dopsd_bench.method import Batch, Method, MethodConfig, config_from_overrides, has_adapter
from dopsd_bench.result import COST_KEYS, TEACHER_SAMPLES_FILE, Result, no_budget
from dopsd_bench.runconfig import RunConfig, default_eval_batch_size, resolve_dtype
from dopsd_bench.tasks import Round, SequenceSpec
from dopsd_bench.train import CHECKPOINT_DIR, TrainConfig, seed_for, train

ROUNDS_DIR = "rounds"
ROUND_FILE = "round.json"
CARRY_FILE = "carry.pt"
# the last round's metrics that result.json repeats at the top: the few-step drift after the whole sequence
# (retention_leakage is left out: it reads only the last round's concept, not the sequence's)
FINAL_RETENTION = ("retention_fd", "retention_fd_untuned", "retention_fd_ratio", "retention_alignment",
                   "retention_alignment_untuned", "retention_attributes", "few_step_gap_ratio", "retention_sharpness",
                   "step_curve")


@dataclass
class SequenceOptions(MethodConfig):
    """The sequence's own `--set` keys (everything else goes to the method's config)."""

    carry: Literal["continue", "merge"] = "continue"  # how round k starts from round k-1
    replay: bool = False  # train round k on every earlier round's training set too (old data: off by default)

    def __post_init__(self) -> None:
        if self.carry not in ("continue", "merge"):
            raise ValueError(f"carry={self.carry!r}; allowed: continue, merge")


SEQUENCE_KEYS = tuple(SequenceOptions.field_names())


def split_overrides(overrides: dict[str, str], default_carry: str) -> tuple[SequenceOptions, dict[str, str]]:
    """(the sequence's options, the method's overrides): `carry` defaults to the task's, `replay` to false."""
    mine = {"carry": default_carry} | {k: v for k, v in overrides.items() if k in SEQUENCE_KEYS}
    try:
        options = config_from_overrides(SequenceOptions, mine)
    except ValueError as e:
        raise ConfigError(f"sequence: {e}") from None
    return options, {k: v for k, v in overrides.items() if k not in SEQUENCE_KEYS}


# ---- the metrics: pure functions of the accuracy matrix -------------------------------------------------------
# R[i][j] = fidelity on round j's instance after training round i (0-based); row i holds at least j = 0..i.
def _rows(matrix: list[list[float]]) -> int:
    if not matrix:
        raise ValueError("the accuracy matrix is empty: score at least one round")
    for i, row in enumerate(matrix):
        if len(row) < i + 1:
            raise ValueError(f"row {i} of the accuracy matrix has {len(row)} entries; after round {i} it needs the "
                             f"{i + 1} instances learned so far")
    return len(matrix)


def average_accuracy(matrix: list[list[float]]) -> float:
    """ACC = mean over j <= T of R[T][j], T the last round: fidelity on everything learned, at the end."""
    last = _rows(matrix) - 1
    return sum(matrix[last][j] for j in range(last + 1)) / (last + 1)


def backward_transfer(matrix: list[list[float]]) -> float | None:
    """BWT = mean over j < T of R[T][j] - R[j][j] (GEM): < 0 when later rounds undo earlier ones. None for 1 round."""
    last = _rows(matrix) - 1
    if last == 0:
        return None
    return sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last


def forgetting(matrix: list[list[float]]) -> float | None:
    """Mean over j < T of max over j <= i < T of R[i][j], minus R[T][j] (Chaudhry et al.): the best an instance
    ever scored before the last round, minus what it scores at the end. None for 1 round."""
    last = _rows(matrix) - 1
    if last == 0:
        return None
    return sum(max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)) / last


def forward_transfer(before: list[float | None], untuned: list[float]) -> float | None:
    """FWT = mean over 1 <= j <= T of before[j] - untuned[j] (GEM): before[j] = R[j-1][j], the fidelity on round j's
    instance after round j-1 (before round j trains on it), untuned[j] = the untuned model's fidelity on it. > 0
    when earlier rounds help a later one. before[0] is not used (round 0 starts from the untuned model). None for
    1 round, or when a term was not measured."""
    if len(before) != len(untuned):
        raise ValueError(f"forward transfer needs one untuned fidelity per round ({len(untuned)}) and one "
                         f"before-training fidelity per round ({len(before)})")
    terms = list(zip(before[1:], untuned[1:]))
    if not terms or any(b is None or u is None for b, u in terms):
        return None
    return sum(b - u for b, u in terms) / len(terms)


# ---- LoRA state carried between rounds ----------------------------------------------------------------------
_ADAPTER_NAME = re.compile(r"\.lora_[A-Za-z_]+\.([^.]+)\.")


def lora_state(backbone) -> dict[str, torch.Tensor]:
    """Every LoRA weight on the denoiser, by parameter name (student, D-OPSD's teacher, ...)."""
    return {n: p.detach().cpu().clone() for n, p in backbone.denoiser.named_parameters() if "lora_" in n}


def load_lora_state(backbone, state: dict[str, torch.Tensor], rank: int) -> None:
    """Put `state` (from lora_state) back: adapters that are missing are added first, at `rank`."""
    names = list(dict.fromkeys(m.group(1) for n in state if (m := _ADAPTER_NAME.search(n))))
    for name in names:
        if not has_adapter(backbone, name):
            backbone.add_lora(name, rank=rank)
    params = dict(backbone.denoiser.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"a finished round's {CARRY_FILE} has weights the model lacks ({missing[:3]}); it was "
                         "written for another method or backbone: run the sequence again with --force")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _lora_layers(backbone) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in backbone.denoiser.modules() if isinstance(m, LoraLayer)]


def merge_adapter(backbone, name: str) -> None:
    """Add adapter `name`'s weight delta into the denoiser's base weights (it stays attached; see drop_adapters)."""
    with torch.no_grad():
        for layer in _lora_layers(backbone):
            if name in layer.lora_A:
                weight = layer.get_base_layer().weight
                weight.add_(layer.get_delta_weight(name).to(weight.dtype))


def drop_adapters(backbone) -> None:
    """Remove every LoRA adapter from the denoiser: the next add_lora starts fresh, as in a first round."""
    names = list(getattr(backbone.denoiser, "peft_config", None) or {})
    backbone.set_adapter(None)
    with warnings.catch_warnings():  # peft says which adapter it activates instead of a deleted one: none is meant
        warnings.simplefilter("ignore", UserWarning)
        for name in names:
            for layer in _lora_layers(backbone):
                layer.delete_adapter(name)
            backbone.denoiser.peft_config.pop(name, None)
    backbone.set_adapter(None)


def _carry_over(backbone, method: Method, options: SequenceOptions) -> None:
    """After a round: with carry=merge, fold the student into the weights and start the next round fresh."""
    if options.carry == "merge" and method.trains and method.adapter is not None:
        merge_adapter(backbone, method.adapter)
        drop_adapters(backbone)


# ---- the run dir ------------------------------------------------------------------------------------------------
def round_dir_name(index: int, round_: Round) -> str:
    return f"{index + 1:02d}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", round_.label)


def has_rounds(run_dir: Path) -> bool:
    """Whether a sequence's run dir holds a finished round or a round's checkpoint (something to continue from)."""
    root = Path(run_dir) / ROUNDS_DIR
    return any(root.glob(f"*/{ROUND_FILE}")) or any(root.glob(f"*/{CHECKPOINT_DIR}"))


def _finished_rounds(run_dir: Path, rounds: list[Round], options: SequenceOptions, model_id: str | None,
                     main: bool, say) -> list[dict]:
    """The records of the rounds that are finished, in order, as long as each was made by this sequence on these
    weights with these options; the main process removes the round dirs after them (their start has changed)."""
    records: list[dict] = []
    for k, r in enumerate(rounds):
        path = run_dir / ROUNDS_DIR / round_dir_name(k, r) / ROUND_FILE
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            break
        made = (record.get("label"), record.get("model"), record.get("carry"), record.get("replay"))
        if made != (r.label, model_id, options.carry, options.replay):
            say(f"{path.parent}: finished as {made}, not {(r.label, model_id, options.carry, options.replay)} "
                "(round, model, carry, replay): training from this round again")
            break
        records.append(record)
    keep = {round_dir_name(k, r) for k, r in enumerate(rounds[:len(records) + 1])}
    for old in sorted((run_dir / ROUNDS_DIR).glob("*")) if main and (run_dir / ROUNDS_DIR).is_dir() else []:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    if records:
        say(f"{run_dir}: rounds 1-{len(records)} are finished; continuing at round {len(records) + 1}"
            if len(records) < len(rounds) else f"{run_dir}: every round is finished; writing the result")
    return records


def _restore(backbone, run_dir: Path, rounds: list[Round], done: int, options: SequenceOptions, rank: int,
             adapter: str | None) -> None:
    """The model as it was after round `done`: the last carry.pt (continue) or every round's, merged in order."""
    dirs = [run_dir / ROUNDS_DIR / round_dir_name(k, r) for k, r in enumerate(rounds[:done])]
    if options.carry == "continue":
        dirs = dirs[-1:]
    for d in dirs:
        if not (d / CARRY_FILE).exists():
            continue  # a method that trains nothing carries nothing
        load_lora_state(backbone, torch.load(d / CARRY_FILE, weights_only=True), rank)
        if options.carry == "merge" and adapter is not None:
            merge_adapter(backbone, adapter)
            drop_adapters(backbone)


# ---- scoring ----------------------------------------------------------------------------------------------------
def score_fidelity(backbone, data, method, features, batch_size: int | None = None) -> dict:
    """Fidelity on one instance exactly as `evaluate` scores it (its prompts, seeds, native steps and scorer;
    `batch_size` images sampled at once, None: all)."""
    from dopsd_bench.metrics.evaluate import _in_batches, _Scorer
    from dopsd_bench.metrics.info import entry

    native = backbone.native_steps
    images = _in_batches(lambda p, s, _: method.sample(p, s, native), data.eval_prompts, data.eval_seeds, None,
                         batch_size)
    return entry(_Scorer(data, features).fidelity(features.extract(images)), True)


class _OnMergedWeights:
    """A method sampled after earlier rounds were merged into the weights: scoring must take the untuned model's
    outputs from the cache (filled before round 1), never from the changed weights."""

    changes_base_weights = True

    def __init__(self, method: Method):
        self._method = method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)


def _entry_mean(entry: Any) -> float | None:
    return float(entry["mean"]) if isinstance(entry, dict) and isinstance(entry.get("mean"), (int, float)) else None


def accuracy_matrix(records: list[dict]) -> list[list[float]]:
    """R from the rounds' records: row i = fidelity after round i on rounds 0..i's instances."""
    labels = [rec["label"] for rec in records]
    return [[float(rec["fidelity"][labels[j]]["mean"]) for j in range(i + 1)] for i, rec in enumerate(records)]


def transfer_terms(records: list[dict]) -> tuple[list[float | None], list[float | None]]:
    """(before, untuned) for forward_transfer from the rounds' records: before[j] = fidelity on round j's instance
    after round j-1 (None for j = 0), untuned[j] = the untuned model's; None where a record lacks it."""
    before: list[float | None] = [None]
    for prev, rec in itertools.pairwise(records):
        ahead = prev.get("next_fidelity") or {}
        before.append(_entry_mean(ahead) if ahead.get("label") == rec["label"] else None)
    return before, [_entry_mean(rec.get("untuned_fidelity")) for rec in records]


def summary(records: list[dict]) -> list[dict]:
    """Per round: ACC, BWT, forgetting and FWT of the matrix so far, few-step drift vs the untuned model,
    cumulative cost."""
    matrix = accuracy_matrix(records)
    before, untuned = transfer_terms(records)
    out, train_s, flops = [], 0.0, 0.0
    for i, rec in enumerate(records):
        m = rec.get("metrics", {})
        train_s += float(rec.get("timings", {}).get("train_s", 0.0))
        round_flops = (rec.get("cost") or {}).get("train_flops", 0.0 if rec.get("cost") is None else None)
        flops = flops + float(round_flops) if flops is not None and isinstance(round_flops, (int, float)) else None
        out.append({"round": i + 1, "label": rec["label"], "acc": average_accuracy(matrix[:i + 1]),
                    "bwt": backward_transfer(matrix[:i + 1]), "forgetting": forgetting(matrix[:i + 1]),
                    "fwt": forward_transfer(before[:i + 1], untuned[:i + 1]),
                    **{k: _entry_mean(m.get(k)) for k in ("retention_fd_ratio", "retention_alignment",
                                                         "retention_alignment_untuned")},
                    "cumulative_train_s": train_s, "cumulative_train_flops": flops})
    return out


def accuracy_table(result: dict):
    """A rich Table of R: row i = after round i, column j = fidelity on round j's instance, with each round's
    few-step drift vs the untuned model; above it the untuned model's row, and in (parentheses) the fidelity on the
    next round's instance before that round trains; ACC, BWT, forgetting, FWT and the training time in the caption."""
    from rich.table import Table

    seq = result["sequence"]
    matrix, labels, per_round = seq["accuracy_matrix"], seq["rounds"], seq["per_round"]
    before = seq.get("fidelity_before") or [None] * len(labels)  # absent from results made before FWT was scored
    untuned = seq.get("fidelity_untuned") or [None] * len(labels)
    last = per_round[-1]

    def signed(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.4f}"

    fgt = last["forgetting"]
    caption = (f"ACC {last['acc']:.4f}   BWT {signed(last['bwt'])}   forgetting "
               f"{'n/a' if fgt is None else f'{fgt:.4f}'}   FWT {signed(last.get('fwt'))}   "
               f"training {last['cumulative_train_s']:.1f}s in all")
    table = Table(title=f"{result['method']} on {result['task']}/{result['instance']} (carry={seq['carry']}, seed "
                        f"{result['seed']}): fidelity on instance j after round i", caption=caption)
    table.add_column("round i", overflow="fold")  # the one column that wraps on a narrow terminal
    for j in range(len(labels)):
        table.add_column(f"j={j + 1}", justify="right", no_wrap=True, min_width=6)
    table.add_column("FD ratio", justify="right", no_wrap=True, min_width=8)
    table.add_column("align.", justify="right", no_wrap=True, min_width=6)
    if any(u is not None for u in untuned):
        table.add_row("[dim]untuned[/dim]", *("" if u is None else f"[dim]{u:.4f}[/dim]" for u in untuned), "1.000", "")
    for i, row in enumerate(matrix):
        cells = [f"{row[j]:.4f}" if j <= i else "" for j in range(len(labels))]
        if i + 1 < len(labels) and before[i + 1] is not None:
            cells[i + 1] = f"[dim]({before[i + 1]:.4f})[/dim]"
        ratio, align = per_round[i]["retention_fd_ratio"], per_round[i]["retention_alignment"]
        table.add_row(f"{i + 1} {labels[i]}", *cells, "" if ratio is None else f"{ratio:.3f}",
                      "" if align is None else f"{align:.3f}")
    return table


# ---- the run ----------------------------------------------------------------------------------------------------
def run_sequence(cfg: RunConfig, spec: SequenceSpec) -> Path:
    """Train and score every round of `cfg.instance` of the sequence task `spec`; returns the run dir."""
    options, method_overrides = split_overrides(cfg.overrides, spec.carry)
    method = runner.build_method(cfg.method, method_overrides)
    if not method.continual:
        raise ConfigError(f"method {cfg.method!r} cannot be tuned round after round (its trained state is not a "
                          "LoRA adapter on the model); a sequence takes methods such as sft, dreambooth or dopsd")
    tcfg = runner.train_config(cfg, method)
    rounds = spec.rounds(cfg.instance)
    for r in rounds:  # what would fail in a later round fails before the first one trains
        runner._preflight(dataclasses.replace(cfg, task=r.task, instance=r.instance, overrides=method_overrides),
                          method)
    body = functools.partial(_run_rounds, options=options, rounds=rounds,
                             method_overrides=method_overrides)
    return runner._run(cfg, method, tcfg, spec, label=method.name or cfg.method, body=body)


def _run_rounds(cfg: RunConfig, method: Method, tcfg: TrainConfig, spec: SequenceSpec, label: str, lora, accelerator,
                console, t0: float, *, options: SequenceOptions, rounds: list[Round],
                method_overrides: dict[str, str]) -> Path:
    final_dir = cfg.run_dir()
    run_dir = runner._staging_dir(final_dir) if cfg.force else final_dir
    main = accelerator.is_main_process
    device = runner._device(cfg, accelerator)
    if main:
        runner._prepare_run_dir(run_dir, cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    eval_batch_size = cfg.eval_batch_size or default_eval_batch_size(device)
    tcfg = dataclasses.replace(tcfg, precision=dtype)  # autocast to the weights' dtype; LoRA state stays fp32
    backbone = runner._load_backbone(cfg, device)
    model_id = getattr(backbone, "model_id", cfg.model)
    datas = [r.spec().build(r.instance, cfg.seed, resolution=backbone.resolution) for r in rounds]
    features = _features_per_round(cfg, rounds, datas, backbone.resolution, device)
    timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
    cache_dir = Path(cfg.out_dir) / ".cache"
    info = _sequence_info(cfg, backbone, model_id, dtype, eval_batch_size, options, rounds)
    if main:
        rundir.atomic_write_json(run_dir / rundir.CONFIG_FILE, runner._config_record(cfg, method, tcfg, info))
        if options.carry == "merge" and method.trains:
            for data in datas:  # merging changes the weights: the untuned outputs every round compares with, first
                runner._prefill_untuned(backbone, data, cache_dir, eval_batch_size)

    records = _finished_rounds(run_dir, rounds, options, model_id, main,
                               console.print if main else lambda *_: None)
    _restore(backbone, run_dir, rounds, len(records), options, tcfg.rank, method.adapter)
    for k in range(len(records), len(rounds)):
        console.print(f"[bold]round {k + 1}/{len(rounds)}: {rounds[k].label}[/bold]")
        m = runner.build_method(cfg.method, method_overrides)  # a fresh method object; the model carries the state
        round_dir = run_dir / ROUNDS_DIR / round_dir_name(k, rounds[k])
        if main:
            (round_dir / ROUND_FILE).unlink(missing_ok=True)
        rcfg = dataclasses.replace(tcfg, seed=round_seed(tcfg.seed, k))
        train_t = train(m, backbone, _round_training_set(datas, k, options.replay), rcfg, round_dir,
                        resume=cfg.resume, accelerator=accelerator)
        if main:
            record = _finish_round(k, m, backbone, rounds, datas, features, rcfg, train_t, round_dir,
                                   cache_dir, options, model_id, merged=options.carry == "merge" and k > 0,
                                   console=console, batch_size=eval_batch_size)
            records.append(record)
        _carry_over(backbone, m, options)
    if not main:
        return final_dir
    # scored once per round: a sequence may mix world and folder rounds
    scorers = [runner._scorer_record(cfg, data, backbone.resolution) for data in datas]
    result = _result(cfg, label, method, tcfg, records, options, rounds, backbone, device, timings, scorers).to_json()
    _write_final_grid(cfg, method_overrides, run_dir, backbone, options, datas, cache_dir)
    if options.carry == "continue" and result["adapter"]:
        shutil.copytree(run_dir / ROUNDS_DIR / round_dir_name(len(rounds) - 1, rounds[-1]) / rundir.ADAPTER_DIR,
                        run_dir / rundir.ADAPTER_DIR, dirs_exist_ok=True)
    result["timings"]["total_s"] = time.perf_counter() - t0
    rundir.atomic_write_json(run_dir / rundir.RESULT_FILE, result)  # last: its presence means the cell is complete
    if run_dir != final_dir:
        rundir.replace_dir(run_dir, final_dir)
    _say_done(console, result, final_dir, len(rounds))
    return final_dir


def _features_per_round(cfg: RunConfig, rounds: list[Round], datas: list, resolution: int, device) -> list:
    """Each round's feature extractor, one per kind of data (the world judge is loaded once)."""
    extractors: dict[str, Any] = {}
    features = []
    for r, data in zip(rounds, datas, strict=True):
        kind = "world" if data.source == "world" else r.task
        if kind not in extractors:
            extractors[kind] = runner._features(cfg, data, resolution, device)
        features.append(extractors[kind])
    return features


def _sequence_info(cfg: RunConfig, backbone, model_id: str | None, dtype: str, eval_batch_size: int | None,
                   options: SequenceOptions, rounds: list[Round]) -> dict:
    """The model, precision and sequence a run trains, as config.json records them."""
    return {"backbone": {"name": backbone.name, "model": model_id, "native_steps": backbone.native_steps,
                         "resolution": backbone.resolution},
            "precision": {"dtype": dtype, "adapter_dtype": "fp32", "autocast": dtype != "fp32",
                          "gradient_checkpointing": cfg.gradient_checkpointing, "eval_batch_size": eval_batch_size},
            "sequence": {"name": cfg.instance, "rounds": [r.label for r in rounds], **dataclasses.asdict(options)}}


def _round_training_set(datas: list, k: int, replay: bool) -> Batch:
    """Round k's training set; with replay, every earlier round's training set too."""
    images, captions = datas[k].train_images, list(datas[k].train_captions)
    if replay and k:
        images = torch.cat([d.train_images for d in datas[:k + 1]])
        captions = [c for d in datas[:k + 1] for c in d.train_captions]
    return Batch(images=images, captions=captions, token=datas[k].token)


def _write_final_grid(cfg: RunConfig, method_overrides: dict[str, str], run_dir: Path, backbone,
                      options: SequenceOptions, datas: list, cache_dir: Path) -> None:
    """samples.png, and teacher.png (as a single cell's) on the last round's instance: its references, the untuned
    in-context teacher and the teacher the whole sequence left."""
    final = runner.build_method(cfg.method, method_overrides)  # samples through the adapters the rounds left
    final.backbone = backbone
    with torch.no_grad():
        _write_grid(run_dir, backbone, final, options, datas)
        if datas[-1].train_images.shape[0]:
            merged = options.carry == "merge" and final.trains  # the untuned rows come from the cache
            rows = runner._teacher_rows(final, backbone, datas[-1], cache_dir, merged)
            rundir.atomic_write_bytes(run_dir / TEACHER_SAMPLES_FILE, runner.samples_grid(rows))


def _say_done(console, result: dict, final_dir: Path, n_rounds: int) -> None:
    console.print(accuracy_table(result))
    console.print(f"run dir: {final_dir}  ({n_rounds} rounds, training {result['timings']['train_s']:.1f}s in "
                  f"all, total {result['timings']['total_s']:.1f}s this time)")


def round_seed(seed: int, index: int) -> int:
    """Round 1 trains with the run seed itself; round k > 1 with an independent seed derived from it."""
    return seed if index == 0 else seed_for(seed, f"round{index + 1}")


def _finish_round(k: int, method: Method, backbone, rounds: list[Round], datas: list, features: list,
                  rcfg: TrainConfig, train_t: dict, round_dir: Path, cache_dir: Path, options: SequenceOptions,
                  model_id: str | None, merged: bool, console, batch_size: int | None = None) -> dict:
    """Save the round's adapter and carry state, score it, write round.json (last). Returns the round's record."""
    trained = method.trains and method.adapter is not None
    if trained:
        with rundir.atomic_dir(round_dir / rundir.ADAPTER_DIR) as tmp:
            backbone.save_lora(tmp, method.adapter)
        rundir.atomic_torch_save(lora_state(backbone), round_dir / CARRY_FILE)
    sampler = _OnMergedWeights(method) if merged and trained else method
    started = time.perf_counter()

    def phase(name: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s  {name}[/dim]", highlight=False)

    eval_t: dict[str, float] = {}
    phase("fidelity of the untuned model on this instance")
    untuned = runner._CachedUntuned(backbone, cache_dir, weights_changed=merged and trained)
    untuned_fidelity = score_fidelity(backbone, datas[k], untuned, features[k], batch_size)
    metrics = runner._evaluate(backbone, datas[k], sampler, features[k], cache_dir, eval_t, progress=phase,
                               batch_size=batch_size)
    if k:
        phase(f"fidelity on the {k} earlier instance{'s' if k > 1 else ''}")
    t = time.perf_counter()
    fidelity = {rounds[j].label: score_fidelity(backbone, datas[j], sampler, features[j], batch_size)
                for j in range(k)}
    fidelity[rounds[k].label] = {key: metrics["fidelity"][key] for key in ("mean", "per_sample", "higher_is_better")}
    ahead = None  # the next round's instance, before it trains on it: forward transfer's first term
    if k + 1 < len(rounds):
        phase(f"fidelity on the next round's instance ({rounds[k + 1].label})")
        ahead = {"label": rounds[k + 1].label,
                 **score_fidelity(backbone, datas[k + 1], sampler, features[k + 1], batch_size)}
    earlier_s = time.perf_counter() - t
    record = {
        "round": k + 1, "label": rounds[k].label, "task": datas[k].task, "instance": datas[k].instance,
        "family": datas[k].family, "model": model_id, "carry": options.carry, "replay": options.replay,
        "seed": rcfg.seed, "fidelity": fidelity, "untuned_fidelity": untuned_fidelity, "next_fidelity": ahead,
        "metrics": metrics,
        "training": {key: train_t.get(key) for key in ("steps_run", "start_step", "final_loss")},
        "cost": {key: train_t.get(key) for key in COST_KEYS} if method.trains else None,
        "timings": {"train_s": float(train_t.get("train_s", 0.0)),
                    "sample_s": sum(eval_t.get(key, 0.0) for key in ("sample_tuned", "teacher_tuned", "untuned")),
                    "score_s": eval_t.get("score", 0.0), "earlier_instances_s": earlier_s},
        "adapter": f"{ROUNDS_DIR}/{round_dir.name}/{rundir.ADAPTER_DIR}" if trained else None,
    }
    rundir.atomic_write_json(round_dir / ROUND_FILE, record)  # last: the round is finished
    shutil.rmtree(round_dir / CHECKPOINT_DIR, ignore_errors=True)
    return record


def _result(cfg: RunConfig, label: str, method: Method, tcfg: TrainConfig, records: list[dict],
            options: SequenceOptions, rounds: list[Round], backbone, device, timings: dict,
            scorers: list[dict]) -> Result:
    """result.json of a sequence (its total time is added when it is written)."""
    matrix = accuracy_matrix(records)
    per_round = summary(records)
    before, untuned = transfer_terms(records)
    last = per_round[-1]
    final = records[-1]["metrics"]
    metrics = {
        "acc": {"mean": last["acc"], "per_sample": None, "higher_is_better": True},
        "bwt": {"mean": last["bwt"], "per_sample": None, "higher_is_better": True},
        "forgetting": {"mean": last["forgetting"], "per_sample": None, "higher_is_better": False},
        "fwt": {"mean": last["fwt"], "per_sample": None, "higher_is_better": True},
        **{k: final[k] for k in FINAL_RETENTION if k in final},
    }
    trained = method.trains
    return Result(
        method=label, task=cfg.task_name, instance=cfg.instance, family="sequence", backbone=cfg.backbone,
        model=getattr(backbone, "model_id", cfg.model), seed=cfg.seed,
        budget=tcfg.budget() if trained else no_budget(), cost=_total_cost(records) if trained else None,
        metrics=metrics,
        timings={**timings, "train_s": last["cumulative_train_s"],
                 "sample_s": sum(r["timings"]["sample_s"] for r in records),
                 "score_s": sum(r["timings"]["score_s"] + r["timings"]["earlier_instances_s"] for r in records)},
        training={"rounds": len(records), "steps_per_round": tcfg.steps if trained else 0,
                  "final_loss": records[-1]["training"].get("final_loss")},
        env=rundir.env_info(device), scorer=scorers,
        samples_rows=[f"final model on {r.label} (eval prompts, native steps)" for r in rounds],
        adapter=rundir.ADAPTER_DIR if options.carry == "continue" and records[-1]["adapter"] else None,
        rounds=records,
        sequence={"name": cfg.instance, "carry": options.carry, "replay": options.replay,
                  "rounds": [r.label for r in rounds], "accuracy_matrix": matrix, "acc": last["acc"],
                  "bwt": last["bwt"], "forgetting": last["forgetting"], "fwt": last["fwt"],
                  "fidelity_before": before, "fidelity_untuned": untuned, "per_round": per_round})


def _total_cost(records: list[dict]) -> dict:
    """What the whole sequence's training spent: every round's steps, FLOPs and seconds added up."""
    costs = [r.get("cost") or {} for r in records]
    total = {key: sum(c[key] for c in costs) if all(isinstance(c.get(key), (int, float)) for c in costs) else None
             for key in COST_KEYS if key != "flops_per_step"}
    return {**total, "flops_per_step": costs[-1].get("flops_per_step")}


def _write_grid(run_dir: Path, backbone, final: Method, options: SequenceOptions, datas: list) -> None:
    """samples.png: one row per round's instance (its first evaluation prompts and seeds), from the final model."""
    native, n = backbone.native_steps, runner.GRID_COLUMNS
    rows = []
    for data in datas:
        if options.carry == "merge" or not final.trains:
            backbone.set_adapter(None)  # every round is merged in: the model itself is the tuned model
            rows.append(backbone.sample(data.eval_prompts[:n], data.eval_seeds[:n], native))
        else:
            rows.append(final.sample(data.eval_prompts[:n], data.eval_seeds[:n], native))
    rundir.atomic_write_bytes(run_dir / rundir.SAMPLES_FILE, runner.samples_grid(rows))
