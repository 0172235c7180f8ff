"""The lint's findings on a screen or a pipe: one block per finding (rich on a terminal)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from towerctl.migrations import describe_size
from towerctl.render import _console
from towerctl.sanitize import for_terminal

if TYPE_CHECKING:
    from towerctl.migrations import Finding


def summary(findings: Sequence[Finding]) -> str:
    """'3 findings (1 accepted)' or 'no findings'."""
    if not findings:
        return "no findings"
    accepted = sum(f.accepted for f in findings)
    plural = "s" if len(findings) != 1 else ""
    return f"{len(findings)} finding{plural}" + (f" ({accepted} accepted)" if accepted else "")


def _rows(finding: Finding) -> list[tuple[str, str]]:
    size = describe_size(finding.rows, finding.bytes)
    rows = [
        ("table", f"{for_terminal(finding.table)} ({size})"),
        ("lock", f"{finding.lock}: blocks {finding.blocks}"),
        ("why", finding.why),
        ("fix", finding.fix),
    ]
    if finding.accepted:
        rows.append(("accepted", for_terminal(finding.reason or "(no reason given)")))
    return rows


def _title(finding: Finding) -> str:
    mark = "  [accepted]" if finding.accepted else ""
    return f"{for_terminal(finding.file)}:{finding.line}  {finding.rule}{mark}"


def write_findings(findings: Sequence[Finding], out: Any, *, terminal: bool) -> None:
    """One block per finding: file, line, rule, the table and its size, why, the fix."""
    if not terminal:
        for finding in findings:
            out.write(_title(finding) + "\n")
            for label, text in _rows(finding):
                out.write(f"  {label:<9}{text}\n")
            out.write("\n")
        return
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text  # text, never markup: a table or file name may hold [brackets]

    color = not os.environ.get("NO_COLOR")
    console = _console(out, color=color, width=shutil.get_terminal_size().columns)
    for finding in findings:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for label, text in _rows(finding):
            grid.add_row(Text(label), Text(text))
        style = "green" if finding.accepted else "yellow"
        title = Text(_title(finding))
        console.print(Panel(grid, title=title, title_align="left", border_style=style))


def warn_findings(findings: Sequence[Finding]) -> None:
    """The findings as warnings on stderr (a dry run): blocks, then the count."""
    if not findings:
        return
    write_findings(findings, sys.stderr, terminal=sys.stderr.isatty())
    sys.stderr.write(f"lint: {summary(findings)} (towerctl migrate lint explains them)\n")
