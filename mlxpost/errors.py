"""Error types that carry where the bad input is (file, line, field)."""

from __future__ import annotations

from dataclasses import dataclass


class MlxpostError(Exception):
    """An error the user can fix; the CLI prints it without a traceback."""


@dataclass
class RowIssue:
    """One problem with one input row: ``train.jsonl:12: messages[2].role: ...``."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DataError(MlxpostError):
    """Bad rows in a data file. ``issues`` lists every problem found."""

    def __init__(self, issues: list[RowIssue], total_rows: int | None = None, hint: str = ""):
        self.issues = issues
        shown = "\n".join(f"  {i}" for i in issues[:20])
        more = f"\n  ... and {len(issues) - 20} more" if len(issues) > 20 else ""
        rows = len({(i.path, i.line) for i in issues})
        of = f" of {total_rows}" if total_rows is not None else ""
        msg = f"{rows}{of} rows are invalid:\n{shown}{more}"
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


class ConfigError(MlxpostError):
    """A bad recipe or command-line value; the message names the key (and file:line)."""
