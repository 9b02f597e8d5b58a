"""User errors: one clear line naming the config key and the fix, exit status 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, paths, data), not with the code.

    The CLI prints ``error: <key>: <message> — <fix>`` and exits with status 2, no traceback.
    """

    def __init__(self, key: str, message: str, fix: str = "") -> None:
        self.key, self.message, self.fix = key, message, fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.key}: {self.message}" + (f" — {self.fix}" if self.fix else "")
