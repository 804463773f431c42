"""User-facing errors: one line, non-zero exit, no traceback."""
from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input or environment; click prints ``Error: <message>`` and exits with status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
