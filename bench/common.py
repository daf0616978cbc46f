"""Helpers shared by the benchmark scripts: a markdown table and appending a section to RESULTS.md."""

from __future__ import annotations

import platform
from pathlib import Path

import pandas as pd
import torch

from ssl_train.training.loop import cpu_has_native_bf16

RESULTS = Path(__file__).parent / "RESULTS.md"


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    def cell(value: object) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def machine() -> str:
    """The CPU facts a timing depends on; native bf16 decides whether trials train in bf16 (loop.uses_bf16)."""
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16: trials train in float32"
    return (f"{platform.machine()} CPU ({bf16}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def append_section(section: str, results: Path = RESULTS) -> None:
    """Append a dated section to RESULTS.md (earlier sections are kept as the record)."""
    previous = results.read_text() if results.exists() else "# Benchmark results\n"
    results.write_text(previous.rstrip() + "\n\n" + section.strip() + "\n")


def replace_section(title: str, section: str, results: Path = RESULTS) -> None:
    """Put ``section`` in RESULTS.md in place of the one headed ``## {title}`` (up to the next ``## ``), or at the
    end where there is none: RESULTS.md holds the current figures, git the earlier ones."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {title}"), None)
    if start is None:
        results.write_text(text.rstrip() + "\n\n" + section.strip() + "\n")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    results.write_text("\n".join([*lines[:start], section.strip(), "", *lines[end:]]).rstrip() + "\n")
