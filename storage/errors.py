"""The one exception type users see: a single line naming the file, field or value at fault."""

from __future__ import annotations


class AselectError(Exception):
    """A user-facing error; its message is one line and is shown without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
