"""Errors caused by user input: the CLI prints their one-line message and exits 2 (no traceback).

Anything else that escapes a command is a bug in the suite and keeps its traceback.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user (names, paths, configs); never a bug in the suite."""


class ConfigError(UserError, ValueError):
    """A config value out of range or of the wrong kind (RunConfig, method configs, --set overrides)."""


class TaskError(UserError):
    """A task spec or its data is invalid: bad YAML, missing folder, no images, unreadable image, caption mismatch."""


class UnknownNameError(UserError, LookupError):
    """A name that is not registered; the message lists the valid names and suggests the closest one."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        close = difflib.get_close_matches(name, self.valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listed = ", ".join(self.valid) if self.valid else f"(none: no {kind} is registered)"
        super().__init__(f"unknown {kind} {name!r}{hint}; valid: {listed}")


class DuplicateNameError(UserError, ValueError):
    """A plug-in registers a name that another object holds already (e.g. a third-party method named `sft`)."""


class CellBusy(UserError):
    """Another process holds the cell's lock: it is running that cell now."""


class RunFailed(Exception):
    """A cell that could not finish for a reason the user can act on (e.g. a model that produces NaN): the CLI prints
    its one-line message and exits 1, as for a failed check; a sweep records the cell as failed and goes on."""


class DiskFull(RunFailed, OSError):
    """A write that failed for want of space: a full disk (ENOSPC), a quota (EDQUOT) or a file-size limit (EFBIG).
    One line naming the file, exit 1. Also an OSError, so code that tolerates a failed write still does."""

    def __init__(self, path, errno: int | None, strerror: str):
        super().__init__(f"cannot write {path}: {strerror} (the disk is full or a size limit was reached); free "
                         "space, then run the same command again (`run --resume` continues from the last checkpoint)")
        self.errno, self.strerror, self.filename = errno, strerror, str(path)

    def __str__(self) -> str:
        return str(self.args[0])


class NonFiniteError(RunFailed, ValueError):
    """NaN or inf in samples, features or a metric."""


def require_finite(values, what: str, hint: str = "") -> None:
    """NonFiniteError naming `what` and how many of its rows hold NaN or inf, if any do (a tensor, rows first)."""
    import torch

    bad = ~torch.isfinite(values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)).all(1)
    if bool(bad.any()):
        tail = f": {hint}" if hint else ""
        raise NonFiniteError(f"{what} hold NaN or inf ({int(bad.sum())} of {bad.numel()}){tail}")
