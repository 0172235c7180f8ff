"""Every `sh` example of README.md and of the docs site runs, in order, against a real
embedded server.

The blocks run as one bash script (`set -euo pipefail`) in a fresh TOWER_HOME and a
scratch folder: README.md's first, then each page of `docs/` in the order of `nav` in
mkdocs.yml, so later examples can use what earlier ones made (`$SESSION`,
`user.token`). The install block ("Two commands") is what `.ci/run` itself runs, so it
is the one block left out here. A block not meant to run is marked `console`, `text` or
its own language; `bash`, `shell`, `zsh` and unmarked blocks are refused, so no shell
example escapes the run (docs/testing.md states the rule).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
INSTALL_BLOCK = "# 1. install towerctl"
REFUSED_LANGUAGES = {"", "bash", "shell", "zsh", "shell-session"}


def pages() -> list[Path]:
    """README.md, then the docs pages in the order of mkdocs.yml's nav."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    return [README] + [DOCS / name for name in re.findall(r":\s*(\S+\.md)\s*$", nav, re.M)]


def fences(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block of a Markdown file."""
    found: list[tuple[int, str, str]] = []
    opened: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if opened is None:
            if m := re.match(r"^```\s*(\S*)", line):
                opened, body = (number, m.group(1)), []
        elif line.startswith("```"):
            found.append((opened[0], opened[1], "".join(body)))
            opened = None
        else:
            body.append(line + "\n")
    assert opened is None, f"{path.name}: the block at line {opened[0]} is not closed"
    return found


def sh_blocks() -> list[tuple[str, int, str]]:
    return [
        (path.relative_to(ROOT).as_posix(), line, body)
        for path in pages()
        for line, language, body in fences(path)
        if language == "sh" and not body.startswith(INSTALL_BLOCK)
    ]


def test_the_readme_and_docs_have_runnable_examples() -> None:
    blocks = sh_blocks()
    assert len(blocks) >= 5
    assert any("session open" in b for _, _, b in blocks)
    assert {name for name, _, _ in blocks} > {"README.md"}


def test_every_docs_page_is_in_the_nav() -> None:
    assert set(pages()[1:]) == set(DOCS.rglob("*.md"))


def test_no_shell_example_escapes_the_run() -> None:
    for path in pages():
        for line, language, _ in fences(path):
            assert language not in REFUSED_LANGUAGES, (
                f"{path.relative_to(ROOT)} line {line}: mark a block `sh` (it runs) "
                "or `console`/`text` (it does not)"
            )


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("jq") is None, reason="the examples use jq")
def test_every_sh_example_runs(tmp_path: Path) -> None:
    from towerctl import embedded

    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    script = ["set -euo pipefail"]
    for name, line, block in sh_blocks():
        script.append(f"echo '### {name} line {line}' >&2")
        script.append(block)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    env.update(
        TOWER_HOME=str(home),
        NO_COLOR="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    try:
        first = subprocess.run(
            ["towerctl", "migrate"], env=env, cwd=work, capture_output=True, text=True, timeout=120
        )
        assert first.returncode == 0, first.stderr
        done = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        last_block = [ln for ln in done.stderr.splitlines() if ln.startswith("### ")]
        assert done.returncode == 0, (last_block[-1:], done.stderr[-2000:], done.stdout[-2000:])
        assert "Traceback" not in done.stderr
    finally:
        embedded.remove(home)


def test_the_docs_list_every_doctor_check(conn: object) -> None:
    from towerctl.doctor import run_checks

    text = (DOCS / "operators.md").read_text(encoding="utf-8")
    table = text[text.index("## Doctor") :].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert listed == {check.name for check in run_checks(conn)}  # type: ignore[arg-type]
