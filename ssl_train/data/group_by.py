"""``data.group_by``: what ties images together, so that the splits keep each group in one split.

Three forms (README, "When your images are not independent"):

- ``level:N``: the folder name ``N`` levels below ``data.path`` / ``data.labeled_path`` (0 is the top level,
  the class folder of a labeled folder): ``level:1`` on ``<class>/<patient>/<image>.png`` groups by patient.
  In Parquet it reads the ``path`` column (``folder_to_parquet`` writes it) the same way.
- ``regex:PATTERN``: a regular expression searched in the file name (Parquet: the ``path`` column's file
  name), with a named group ``group``: ``regex:^(?P<group>[^_]+)_`` groups ``p17_scan3.png`` as ``p17``.
- ``column:NAME``: a Parquet column (any type; read as text).

Equal names are one group wherever they appear: across classes, and across ``data.path`` and
``data.labeled_path``. Only the standard library here: the config imports it to validate the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal, Optional

KINDS = ("level", "regex", "column")


class GroupByError(ValueError):
    """A malformed ``data.group_by`` value, or a file whose group it cannot read."""


@dataclass(frozen=True)
class GroupBy:
    """A parsed ``data.group_by``."""

    text: str
    kind: Literal["level", "regex", "column"]
    level: int = 0
    pattern: Optional[re.Pattern[str]] = None
    column: str = ""

    def of_path(self, relative: str) -> str:
        """The group of the file at ``relative`` (a POSIX path under the folder given) for ``level`` and ``regex``."""
        path = PurePosixPath(relative)
        if self.kind == "level":
            if self.level >= len(path.parts) - 1:
                raise GroupByError(f"'{relative}' has no folder at level {self.level} (data.group_by='{self.text}'; "
                                   "level 0 is the first folder below the path given)")
            return path.parts[self.level]
        assert self.pattern is not None
        match = self.pattern.search(path.name)
        if match is None or not match.group("group"):
            raise GroupByError(f"file name '{path.name}' ({relative}) does not match data.group_by pattern "
                               f"'{self.pattern.pattern}' (or its group 'group' is empty)")
        return match.group("group")


def parse_group_by(text: str) -> GroupBy:
    """``'level:1'``, ``'regex:^(?P<group>[^_]+)_'`` or ``'column:patient_id'`` -> GroupBy; GroupByError otherwise."""
    kind, _, value = text.partition(":")
    if kind not in KINDS or not value:
        raise GroupByError("write level:N (a folder level), regex:PATTERN (a file-name pattern with a named "
                           "group 'group') or column:NAME (a Parquet column)")
    if kind == "level":
        if not value.isdigit():
            raise GroupByError(f"level:{value}: the level must be an integer >= 0 (0 is the first folder level)")
        return GroupBy(text, "level", level=int(value))
    if kind == "regex":
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise GroupByError(f"regex '{value}' does not compile: {error}") from None
        if "group" not in pattern.groupindex:
            raise GroupByError(f"regex '{value}' needs a named group 'group', e.g. ^(?P<group>[^_]+)_")
        return GroupBy(text, "regex", pattern=pattern)
    return GroupBy(text, "column", column=value)
