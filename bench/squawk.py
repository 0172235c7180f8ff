#!/usr/bin/env python3
"""towerctl's `migrate lint` beside Squawk (`squawk-cli` from npm) on public migration sets.

    python bench/squawk.py corpus DIR --git NAME=GITDIR:PREFIX:SUFFIX ...   # assemble a corpus
    python bench/squawk.py compare DIR --squawk PATH [--json OUT]          # the comparison

`corpus` copies each set's files (from a bare git directory, e.g. one made by `git clone
--bare`, at its HEAD) into DIR/NAME as NNNN_name.sql in their order, and writes DIR/NAME/SOURCE
(the repository directory and commit); `--sql NAME=FOLDER` takes a folder as it is (towerctl's
own sql/). A set's PRELUDE file (SQL), when present, runs first on its database (the table
its own runner keeps, which some files read). Nothing of a corpus is kept in this repository.

`compare` walks each set file by file on one throwaway PostgreSQL: file N is linted by
`towerctl migrate --to N lint --json` against a database where files 1..N-1 were applied by
`towerctl migrate` (so the catalog is the live one a deployment would have), and by Squawk
(`--reporter json`, which reads the file alone). Each Squawk violation is placed on its
statement (PostgreSQL's grammar through towerctl's parser) and sorted: a lock-taking rule on a
table that existed before the file, on a table the same run created, a lock-timeout rule, a
rule about re-running a file that failed half-way (towerctl runs each file in one transaction),
or a style rule (types, naming). It prints one markdown table and the disagreements.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO
from towerctl.migrations import grammar

LOCK_RULES = {
    "adding-field-with-default", "adding-foreign-key-constraint", "adding-not-nullable-field",
    "adding-serial-primary-key-field", "adding-required-field", "ban-drop-column",
    "ban-drop-table", "changing-column-type", "constraint-missing-not-valid",
    "disallowed-unique-constraint", "renaming-column", "renaming-table",
    "require-concurrent-index-creation", "require-concurrent-index-deletion",
    "ban-alter-domain-with-add-constraint", "ban-truncate-cascade", "ban-drop-not-null",
    "ban-drop-database", "adding-primary-key-constraint",
}  # fmt: skip
TIMEOUT_RULES = {"require-lock-timeout", "require-statement-timeout", "require-timeout-settings"}
RERUN_RULES = {"prefer-robust-stmts", "transaction-nesting",
               "ban-concurrent-index-creation-in-transaction"}  # fmt: skip


def corpus(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    for spec in args.git or []:
        name, rest = spec.split("=", 1)
        git_dir, prefix, suffix = rest.split(":")
        head = _git(git_dir, "rev-parse", "HEAD").strip()
        paths = [p for p in _git(git_dir, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
                 if p.startswith(prefix) and p.endswith(suffix)]  # fmt: skip
        target = root / name
        target.mkdir(parents=True, exist_ok=True)
        for number, path in enumerate(sorted(paths), 1):
            slug = re.sub(r"[^A-Za-z0-9]+", "_", path[len(prefix) : -len(suffix)]).strip("_")
            (target / f"{number:04d}_{slug[:80] or 'file'}.sql").write_text(
                _git(git_dir, "show", f"HEAD:{path}")
            )
        (target / "SOURCE").write_text(f"{git_dir} {head} {prefix}*{suffix} ({len(paths)})\n")
    for spec in args.sql or []:
        name, folder = spec.split("=", 1)
        target = root / name
        shutil.copytree(folder, target, dirs_exist_ok=True)
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()  # fmt: skip
        (target / "SOURCE").write_text(f"{folder} {head or '-'}\n")


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def _statement_at(statements: list[Any], line: int) -> Any:
    found = statements[0] if statements else None
    for s in statements:
        if s.line > line:
            break
        found = s
    return found


def _targets(statement: Any) -> list[str]:
    node = statement.node or {}
    names = []
    for key in ("relation",):
        rel = node.get(key)
        if isinstance(rel, dict) and rel.get("relname"):
            names.append(f"{rel['schemaname']}.{rel['relname']}" if rel.get("schemaname")
                         else rel["relname"])  # fmt: skip
    for obj in node.get("objects", []) if statement.kind == "DropStmt" else []:
        items = [i["String"]["sval"] for i in obj.get("List", {}).get("items", []) if "String" in i]
        names.append(".".join(items))
    return names


class Towerctl:
    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url, self.env = url, env

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "towerctl", "--database-url", self.url, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, check=False)


def compare_set(folder: Path, squawk: str, server: Any) -> dict[str, Any]:
    import psycopg

    files = sorted(folder.glob("*.sql"))
    tally: Counter[str] = Counter()
    notes: list[str] = []
    with server.fresh() as db:
        url = server.url(db)
        env = os.environ | {"TOWER_HOME": tempfile.mkdtemp(), "NO_COLOR": "1"}
        tower = Towerctl(url, env)
        prelude = folder / "PRELUDE"  # what the set's own runner creates first, if anything
        if prelude.exists():
            with psycopg.connect(url, autocommit=True) as c:
                c.execute(prelude.read_text())
        for path in files:
            version = path.name.split("_", 1)[0]
            statements = grammar.parse_script(path.read_text().removeprefix("\ufeff"))
            tally["statements"] += len(statements)
            linted = tower("migrate", "--dir", str(folder), "--to", version, "lint", "--json")
            if linted.returncode != 0:
                notes.append(f"{path.name}: towerctl refused it: {linted.stderr.strip()[:200]}")
                break
            ours = [f for f in json.loads(linted.stdout)["findings"]
                    if f["version"] == int(version)]  # fmt: skip
            tally["towerctl"] += len(ours)
            our_lines = {f["line"] for f in ours}
            with psycopg.connect(url) as c:

                def existed(name: str, c: Any = c) -> bool:
                    row = c.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
                    return bool(row and row[0])

                states = table_states(statements, existed)
                theirs = _squawk(squawk, path)
                existing_lines: set[int] = set()
                for v in theirs:
                    tally["squawk"] += 1
                    rule = v["rule_name"]
                    statement = _statement_at(statements, v["line"] + 1)
                    line = statement.line if statement else 0
                    where = f"{path.name}:{line} {rule}"
                    if rule in TIMEOUT_RULES:
                        tally["squawk timeout (towerctl sets one)"] += 1
                    elif rule in RERUN_RULES:
                        tally["squawk re-run (one transaction per file)"] += 1
                    elif rule not in LOCK_RULES:
                        tally["squawk style"] += 1
                    elif states.get(line) == "existing":
                        if line not in existing_lines:  # statements, not violations
                            existing_lines.add(line)
                            tally["squawk lock, existing table"] += 1
                            tally["… towerctl too"] += line in our_lines
                        if line not in our_lines:
                            notes.append(f"{where}: Squawk only ({_words(statement)})")
                    elif states.get(line) == "new":
                        tally["squawk lock, table new in the run"] += 1
                        if line in our_lines:
                            notes.append(f"{where}: both, on a table new in the run")
                    else:
                        tally["squawk lock, no table"] += 1
                        notes.append(f"{where}: Squawk only, no table named ({_words(statement)})")
                squawk_lines = {_statement_line(statements, v) for v in theirs
                                if v["rule_name"] in LOCK_RULES}  # fmt: skip
                for f in ours:
                    if f["line"] not in squawk_lines:
                        notes.append(f"{path.name}:{f['line']} {f['rule']}: towerctl only "
                                     f"(on {f['table']})")  # fmt: skip
            applied = tower("migrate", "--dir", str(folder), "--to", version)
            if applied.returncode != 0:
                notes.append(f"{path.name}: did not apply here: {applied.stderr.strip()[:200]}")
                break
            tally["files"] += 1
    return {"tally": dict(tally), "notes": list(dict.fromkeys(notes)), "files": len(files)}


def table_states(statements: list[Any], existed: Any) -> dict[int, str]:
    """Per statement line: "existing" when a table it names existed before the file (or is
    such a table under a name it was renamed to earlier in the file), "new" when every table
    it names was created (or dropped and created again) earlier in the file."""
    created: set[str] = set()
    renamed: dict[str, str] = {}
    states: dict[int, str] = {}
    for s in statements:
        names = [renamed.get(n, n) for n in _targets(s)]
        if names:
            old = [n for n in names if n not in created and existed(n)]
            states[s.line] = "existing" if old else "new"
        node = s.node or {}
        made = node.get("relation") if s.kind == "CreateStmt" else None
        if s.kind == "CreateTableAsStmt":
            made = (node.get("into") or {}).get("rel")
        if made and made.get("relname"):
            created.add(made["relname"])
        if s.kind == "RenameStmt" and node.get("renameType") in ("OBJECT_TABLE", "OBJECT_MATVIEW"):
            before = renamed.get(node["relation"]["relname"], node["relation"]["relname"])
            renamed[node["newname"]] = before
            if before in created:
                created.add(node["newname"])
    return states


def _statement_line(statements: list[Any], violation: dict[str, Any]) -> int:
    statement = _statement_at(statements, violation["line"] + 1)
    return statement.line if statement else 0


def _words(statement: Any) -> str:
    return " ".join(statement.text.split()[:8]) if statement is not None else "-"


def _squawk(squawk: str, path: Path) -> list[dict[str, Any]]:
    done = subprocess.run([squawk, "--reporter", "json", str(path)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    try:
        found = json.loads(done.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return [v for v in found if isinstance(v, dict) and "rule_name" in v]


COLUMNS = [
    ("files", "files linted"), ("statements", "statements"), ("squawk", "Squawk findings"),
    ("towerctl", "towerctl findings"),
    ("squawk lock, existing table", "Squawk: lock on an existing table (statements)"),
    ("… towerctl too", "… of them flagged by towerctl too"),
    ("squawk lock, table new in the run", "Squawk: lock on a table new in the run"),
    ("squawk timeout (towerctl sets one)", "Squawk: lock/statement timeout"),
    ("squawk re-run (one transaction per file)", "Squawk: re-run / transaction"),
    ("squawk style", "Squawk: style (types)"),
]  # fmt: skip


def compare(args: argparse.Namespace) -> None:
    from tools import Server

    root = Path(args.dir)
    work = Path(tempfile.mkdtemp(prefix="squawk-"))
    work.chmod(0o755)
    server = Server(work / "pgdata")
    results: dict[str, Any] = {}
    try:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            sys.stderr.write(f"[squawk] {folder.name}\n")
            results[folder.name] = compare_set(folder, args.squawk, server)
            results[folder.name]["source"] = (folder / "SOURCE").read_text().strip()
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    out = sys.stdout
    out.write("| set | " + " | ".join(title for _, title in COLUMNS) + " |\n")
    out.write("|---|" + "---:|" * len(COLUMNS) + "\n")
    for name, result in results.items():
        t = result["tally"]
        out.write(f"| {name} | " + " | ".join(str(t.get(k, 0)) for k, _ in COLUMNS) + " |\n")
    for name, result in results.items():
        out.write(f"\n{name} ({result['source']}):\n")
        for note in result["notes"]:
            out.write(f"- {note}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("corpus")
    make.add_argument("dir")
    make.add_argument("--git", action="append", help="NAME=GITDIR:PREFIX:SUFFIX")
    make.add_argument("--sql", action="append", help="NAME=FOLDER")
    run = sub.add_parser("compare")
    run.add_argument("dir", nargs="?", default=os.environ.get("TOWER_LINT_CORPUS"))
    run.add_argument("--squawk", default=os.environ.get("SQUAWK", "squawk"))
    run.add_argument("--json")
    args = parser.parse_args()
    if args.command == "corpus":
        corpus(args)
    else:
        if not args.dir:
            parser.error("compare needs the corpus folder (or TOWER_LINT_CORPUS)")
        compare(args)


if __name__ == "__main__":
    assert REPO.is_dir()
    main()
