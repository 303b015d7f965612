"""User-facing errors: one paragraph that says what went wrong and what to do next.

The CLI prints these without a traceback (unless ``--debug``) and exits non-zero; anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error caused by input the user can fix; the message says how."""

    exit_code = 2


class CacheError(UserError):
    """A problem with files the toolkit keeps on disk (unusable folder, corrupt entry), not with the request.

    The message names the path and the fix; a server reports it as its own fault without the path.
    """


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
