"""The exception raised for invalid task data."""

from __future__ import annotations


class DataError(ValueError):
    """Invalid task data: a missing file or column, an unknown label, a value that does not parse.

    The message names the task, the file or source, the field and the value found, so a user can
    fix the data or the task specification without reading a traceback.
    """


def describe_row(index: int, source: str, *, is_csv: bool = False) -> str:
    """Describe data row ``index`` (0-based) of ``source`` for a message, with the file line for CSV/TSV files."""
    text = f"row {index + 1} of {source}"
    if is_csv:
        text += f" (line {index + 2} counting the header)"
    return text
