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


class CellBusy(UserError):
    """Another process holds the cell's lock: it is running that cell now."""
