"""User-facing errors: one line, non-zero exit, no traceback."""
from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input or environment; click prints ``Error: <message>`` and exits with status 1."""

    def __init__(self, message: str) -> None:
        text = str(message)
        if text.startswith("Caught UserError in DataLoader worker"):
            # Raised in a DataLoader worker, re-raised here as UserError("Caught UserError in DataLoader worker
            # process N. Original Traceback ... core.errors.UserError: <message>"): keep the message alone.
            text = text.rsplit("UserError: ", 1)[-1]
        super().__init__(" ".join(text.split()))  # always one line
