"""User-facing errors.

`ConfigError` is raised for bad input (config keys, values, missing data files,
unknown methods). The CLI prints its message as one paragraph, without a
traceback, and exits with status 2. Raise it before any compute starts.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """Bad user input, detected before any compute. The message is shown as is."""


def suggest(name: str, valid: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest valid name, or ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond holds."""
    if not cond:
        raise ConfigError(message)
