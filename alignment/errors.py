"""One error family: every message says what is wrong, where, and how to fix it."""


class SmoeError(Exception):
    """A problem the user can fix. The CLI prints it without a traceback and exits 2."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what if where is None else f"{where}: {what}"]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("\n  ".join(parts))
