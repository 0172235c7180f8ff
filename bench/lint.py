"""Workload l: `towerctl migrate --dry-run` of one big data migration (parse, checks, lint).

    python bench/run.py --only l

One file of 50,000 statements, 50 MB (INSERTs of about 1 KB, a comment above each, and an
index built in place on a table of the live database at each end, which the lint names), and
the same file at a quarter of the size: the time and peak memory of the whole process, fork
to exit, against a database holding that table. Targets: the full file in at most 10 s and
300 MB, and a quarter of it in more than a quarter of that time (linear growth).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from common import Sample, Workload, alternate, run_timed

LETTER = "l"
STATEMENTS = 50_000
SIZE = 50_000_000
LIVE_ROWS = 100_000
INDEX = "CREATE INDEX live_rows_note_ix ON live_rows (note);\n"


def write_big_file(path: Path, statements: int, size: int) -> None:
    """`statements` INSERTs of about size/statements bytes each, between two findings."""
    pad = "x" * max(size // statements - 110, 1)
    with path.open("w") as out:
        out.write("CREATE TABLE bulk (id bigint, label text, payload text);\n" + INDEX)
        for i in range(statements - 3):
            out.write(f"-- row {i}\nINSERT INTO bulk VALUES ({i}, 'label;{i}', '{pad}');\n")
        out.write(INDEX.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))


def seed(server_url: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute("CREATE TABLE live_rows (id bigint PRIMARY KEY, note text)")
        c.execute(
            "INSERT INTO live_rows SELECT g, 'note ' || g FROM generate_series(1, %s) g",
            (LIVE_ROWS,),
        )
        c.execute("ANALYZE live_rows")


def run(bench: Any) -> None:
    reps = 3 if bench.profile.name == "quick" else 5
    for divisor in (1, 4):
        statements, size = STATEMENTS // divisor, SIZE // divisor
        folder = bench.work / f"lint-{divisor}"
        folder.mkdir()
        write_big_file(folder / "0001_data.sql", statements, size)
        key = "l.dryrun" if divisor == 1 else "l.dryrun/4"
        title = f"migrate --dry-run of one {size / 1e6:.1f} MB file of {statements:,} statements"
        workload = Workload(key, title, statements, "statements")

        def measure(w: Workload, folder: Path = folder) -> None:
            with bench.server.fresh() as db:
                seed(bench.server.url(db))
                cmd = bench.towerctl("migrate", "--dir", folder, "--dry-run")

                def towerctl() -> Sample:
                    return run_timed(cmd, bench.tower_env(db))

                w.series.extend(alternate([("towerctl", towerctl)], reps))

        bench.add(workload, measure)
    full, quarter = bench.get("l.dryrun", "towerctl"), bench.get("l.dryrun/4", "towerctl")
    if full and quarter:
        w = bench.workload("l.dryrun")
        w.notes.append(
            f"50 MB: median {full.median:.2f} s (target ≤ 10 s), peak {full.peak_mb:.0f} MB "
            f"(target ≤ 300 MB); 4x the size took {full.median / quarter.median:.2f}x the time"
        )
