"""Every `sh` example of README.md runs, in order, against a real embedded server.

The blocks run as one bash script (`set -euo pipefail`) in a fresh TOWER_HOME
and a scratch folder, so later examples can use what earlier ones made
(`$SESSION`, `user.token`). The install block ("Two commands") is what `.ci/run`
itself runs, so it is the one block left out here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
INSTALL_BLOCK = "# 1. install towerctl"


def sh_blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```sh\n(.*?)^```", text, re.S | re.M)
    ]


def test_the_readme_has_runnable_examples() -> None:
    blocks = [b for _, b in sh_blocks() if not b.startswith(INSTALL_BLOCK)]
    assert len(blocks) >= 5
    assert any("session open" in b for b in blocks)


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("jq") is None, reason="the README's examples use jq")
def test_every_sh_example_of_the_readme_runs(tmp_path: Path) -> None:
    from towerctl import embedded

    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    script = ["set -euo pipefail"]
    for line, block in sh_blocks():
        if block.startswith(INSTALL_BLOCK):
            continue
        script.append(f"echo '### README.md line {line}' >&2")
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
        last_block = [ln for ln in done.stderr.splitlines() if ln.startswith("### README.md")]
        assert done.returncode == 0, (last_block[-1:], done.stderr[-2000:], done.stdout[-2000:])
        assert "Traceback" not in done.stderr
    finally:
        embedded.remove(home)


def test_the_readme_lists_every_doctor_check(conn: object) -> None:
    from towerctl.doctor import run_checks

    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Doctor") :].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert listed == {check.name for check in run_checks(conn)}  # type: ignore[arg-type]
