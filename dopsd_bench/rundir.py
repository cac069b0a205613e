"""The run directory: atomic writes, the result.json schema, and the environment a result was produced in.

Every file is written to a temporary name in its own directory and moved into place with os.replace, so a reader
(or a re-run after SIGKILL) never sees half a file. result.json is written last: its presence means the cell is done.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dopsd_bench.result import (
    ADAPTER_DIR,
    CONFIG_FILE,
    READABLE_SCHEMA_VERSIONS,
    RESULT_FILE,
    RESULT_KEYS,
    SAMPLES_FILE,
    SCHEMA_VERSION,
)

__all__ = ["ADAPTER_DIR", "CONFIG_FILE", "RESULT_FILE", "RESULT_KEYS", "SAMPLES_FILE", "SCHEMA_VERSION"]  # re-exported
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate")


# ---- atomic writes ------------------------------------------------------------------------------------------
# a write that failed for want of space: a full disk, a quota, a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space_errno(e: BaseException) -> int | None:
    """The errno of an error that says a write found no space (NO_SPACE_ERRNOS), else None. safetensors (the LoRA
    and sample-cache files) reports the OS error in its message only: "... (os error 28)"."""
    if isinstance(e, OSError):
        return e.errno if e.errno in NO_SPACE_ERRNOS else None
    from safetensors import SafetensorError

    found = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
    return int(found.group(1)) if found and int(found.group(1)) in NO_SPACE_ERRNOS else None


def no_space_error(e: BaseException, path: str | Path):
    """`e` as DiskFull naming `path` if it is a write that found no space (see no_space_errno), else None."""
    from dopsd_bench.errors import DiskFull

    if isinstance(e, DiskFull):
        return e
    code = no_space_errno(e)
    return None if code is None else DiskFull(path, code, os.strerror(code))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = no_space_error(e, path)
        if full is not None:
            raise full from e
        raise
    return path


def remove_dead_writers_temps(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files and dirs that writers killed mid-write left under `run_dir` (atomic_write_*'s and
    atomic_dir's `.<name>.<random>.tmp`, a checkpoint's `.tmp_step_N`): a SIGKILL leaves no chance to clean up. Call
    it only while holding the cell's lock, so that no live writer owns them. Returns what was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    dead = [q for q in run_dir.rglob(".*") if q.name.endswith(".tmp") or q.name.startswith(".tmp_step_")]
    for q in sorted(dead, key=lambda q: len(q.parts), reverse=True):  # inner ones first
        if q.is_dir():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
    return dead


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` (old contents removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, path: Path) -> None:
    """Move directory `new` to `path`, replacing what is there (os.replace cannot replace a non-empty directory: the
    old one is moved aside first, then dropped)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: convert it to a number, string, list or dict")


# ---- the cell lock ------------------------------------------------------------------------------------------
def lock_path(run_dir: str | Path) -> Path:
    """The cell's lock file, beside its run dir (so that swapping the run dir in place keeps it)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def cell_lock(run_dir: str | Path, say: Any = print) -> Iterator[None]:
    """Hold the cell's lock while its body runs; CellBusy (one line naming the holder) if another process holds it.

    An OS file lock (flock): the kernel releases it when its process ends, however it ends, so a lock is never
    stale. A lock file still naming a process that is gone (killed) is taken over, and `say` tells the user."""
    import fcntl

    from dopsd_bench.errors import CellBusy

    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise CellBusy(f"cell {run_dir} is being run by {_holder(f.read())}; wait for it to finish, or stop "
                           "that process and run again") from None
        f.seek(0)
        earlier = f.read()
        if earlier.strip():
            say(f"cell {run_dir}: taking over from {_holder(earlier)}, which stopped without finishing it")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # an empty lock file: the last holder finished (or failed) in its own time
            f.flush()


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds the cell's lock now ("pid P on HOST (since T)"), or None if nobody does."""
    import fcntl

    path = lock_path(run_dir)
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(f.read())
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


# ---- result.json --------------------------------------------------------------------------------------------
def read_result(run_dir: str | Path) -> dict | None:
    """The parsed result.json if the cell is complete (a readable schema version, all keys), else None."""
    path = Path(run_dir) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(result, dict) or result.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        return None
    if any(k not in result for k in RESULT_KEYS):
        return None
    return result


def is_complete(run_dir: str | Path) -> bool:
    return read_result(run_dir) is not None


def cell_state(run_dir: str | Path, model: str | None) -> tuple[str, dict | None]:
    """('todo' | 'done' | 'stale', its complete result.json or None). 'stale': the result records another model id
    than `model` (see Backbone.identity: it was made on other weights); `model` None matches any."""
    done = read_result(run_dir)
    if done is None:
        return "todo", None
    return ("stale" if model is not None and done.get("model") != model else "done"), done


# ---- environment --------------------------------------------------------------------------------------------
def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The commit of the source tree this package runs from, or None outside a git checkout."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def env_info(device: torch.device | str) -> dict:
    info: dict[str, Any] = {"python": platform.python_version()}
    info.update({name: package_version(name) for name in PACKAGES})
    from dopsd_bench import __version__

    info["dopsd_bench"] = __version__
    info["device"] = device_name(device)
    info["processes"] = int(os.environ.get("WORLD_SIZE", "1"))  # data-parallel processes (accelerate launch, torchrun)
    info["git_sha"] = git_sha()
    info["hostname"] = socket.gethostname()
    return info
