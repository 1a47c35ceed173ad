"""The one exception type that users of localdiff see.

Every problem with user input (a file that is not an image, an empty mask, directions made with another
model, ...) raises :class:`LocalDiffError` with a single-line message that says what is wrong and how to fix
it. The CLI prints that line and exits with status 2; the web UI shows it in the page.
"""

from __future__ import annotations


class LocalDiffError(ValueError):
    """A user-facing error: one line, what is wrong and how to fix it."""

    def __init__(self, message: str):
        # Keep messages to one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))
