"""Workloads c and d: the project's migrations and generated ones, against dbmate, yoyo
and psql (the server floor)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from common import (
    PROJECT_SQL,
    Sample,
    ToolFailed,
    Workload,
    alternate,
    run_timed,
)
from harness import BenchBase
from towerctl.migrations.files import NO_TRANSACTION_MARK


class MigrationWorkloads(BenchBase):
    # migrations in three formats -------------------------------------------------------------

    def write_migrations(self, name: str, files: Sequence[tuple[str, str]]) -> dict[str, Path]:
        """The same SQL files for towerctl, dbmate (`-- migrate:up`) and yoyo (directives)."""
        dirs = {tool: self.work / f"{name}-{tool}" for tool in ("towerctl", "dbmate", "yoyo")}
        for folder in dirs.values():
            folder.mkdir()
        for filename, sql in files:
            no_tx = sql.startswith(NO_TRANSACTION_MARK)
            (dirs["towerctl"] / filename).write_text(sql)
            up = "-- migrate:up transaction:false" if no_tx else "-- migrate:up"
            (dirs["dbmate"] / filename).write_text(f"{up}\n{sql}\n-- migrate:down\n")
            (dirs["yoyo"] / filename).write_text(
                ("-- transactional: false\n" if no_tx else "") + sql
            )
        return dirs

    def migrate_contenders(
        self, dirs: dict[str, Path], tools: Sequence[str], check: Callable[[str], None]
    ) -> list[tuple[str, Callable[[], Sample]]]:
        def towerctl() -> Sample:
            with self.server.fresh() as db:
                sample = run_timed(
                    self.towerctl("migrate", "--dir", dirs["towerctl"]), self.tower_env(db)
                )
                check(db)
            return sample

        def dbmate() -> Sample:
            with self.server.fresh() as db:
                url = self.server.dbmate_url(db)
                cmd: list[str | Path] = [self.tools.dbmate, "--no-dump-schema", "--url", url]
                cmd += ["--migrations-dir", dirs["dbmate"], "migrate"]
                sample = run_timed(cmd, self.base_env(), cwd=dirs["dbmate"])
                check(db)
            return sample

        def yoyo() -> Sample:
            with self.server.fresh() as db:
                url = self.server.yoyo_url(db)
                cmd: list[str | Path] = [self.tools.yoyo, "apply", "--batch", "--no-config-file"]
                cmd += ["--database", url, dirs["yoyo"]]
                sample = run_timed(cmd, self.base_env(), cwd=dirs["yoyo"])
                check(db)
            return sample

        runs = {"towerctl": towerctl, "dbmate": dbmate, "yoyo": yoyo}
        return [(tool, runs[tool]) for tool in tools]

    # c: the project's migrations ---------------------------------------------------------------

    def project_migrations(self) -> None:
        files = [(p.name, p.read_text()) for p in sorted(PROJECT_SQL.glob("*.sql"))]
        dirs = self.write_migrations("project", files)
        expected = {"sessions", "session_requests", "balance_ledger", "session_messages"}
        expected |= {"macaroon_revocations", "session_history_clears"}
        expected_indexes = {"sessions_state_expires_idx", "session_messages_request_role_idx"}

        def check(db: str) -> None:
            rows = self.server.query(
                db,
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind IN ('r', 'i')",
            )
            names = {r[0] for r in rows}
            missing = (expected | expected_indexes) - names
            if missing:
                raise ToolFailed(f"schema incomplete after migrating: {sorted(missing)}")

        def run(w: Workload) -> None:
            contenders = self.migrate_contenders(dirs, ("towerctl", "dbmate", "yoyo"), check)
            w.series.extend(alternate(contenders, self.profile.fresh_reps))

        title = f"the project's {len(files)} migrations on a fresh database"
        self.add(Workload("c.project", title, len(files), "migrations"), run)

    # d: many generated migrations ---------------------------------------------------------------

    def many_migrations(self, count: int, reps: int, key: str, floor: bool = False) -> Workload:
        """towerctl against dbmate; with `floor`, also psql running the same files, each in
        its own transaction, with no ledger: what the server alone needs for this SQL."""
        files = generated_migrations(count)
        dirs = self.write_migrations(f"gen{count}", files)
        script = self.work / f"gen{count}-floor.sql"
        script.write_text("".join(f"BEGIN;\n{sql}COMMIT;\n" for _, sql in files))

        def psql() -> Sample:
            with self.server.fresh() as db:
                cmd: list[str | Path] = [
                    self.tools.psql,
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-f",
                    script,
                ]
                sample = run_timed(cmd, self.pg_env(db))
                check(db)
            return sample

        def check(db: str) -> None:
            rows = self.server.query(
                db,
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind = 'r' AND relname LIKE 'bench_t%'",
            )
            if rows[0][0] != count:
                raise ToolFailed(f"{rows[0][0]} of {count} generated tables exist after migrating")

        def run(w: Workload) -> None:
            contenders = self.migrate_contenders(dirs, ("towerctl", "dbmate"), check)
            if floor:
                contenders.append(("psql (server floor)", psql))
            w.series.extend(alternate(contenders, reps))

        title = f"{count} generated migrations on a fresh database"
        return self.add(Workload(key, title, count, "migrations"), run)


def generated_migrations(count: int) -> list[tuple[str, str]]:
    """`count` migrations of the usual kinds: tables with keys and checks, indexes,
    added columns, comments, and now and then a dollar-quoted function."""
    files: list[tuple[str, str]] = []
    for i in range(1, count + 1):
        t = f"bench_t{i:04d}"
        sql = [
            f"-- generated migration {i}: a table, its index and a comment",
            f"CREATE TABLE IF NOT EXISTS {t} (",
            "    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,",
            "    owner      uuid        NOT NULL,",
            "    label      text        NOT NULL CHECK (label <> ''),",
            "    amount     bigint      NOT NULL DEFAULT 0 CHECK (amount >= 0),",
            "    created_at timestamptz NOT NULL DEFAULT now()",
            ");",
            f"CREATE INDEX IF NOT EXISTS {t}_owner_idx ON {t} (owner, created_at);",
            f"COMMENT ON TABLE {t} IS 'generated table {i}; not a real one';",
        ]
        if i > 1 and i % 3 == 0:
            sql.append(f"ALTER TABLE bench_t{i - 1:04d} ADD COLUMN IF NOT EXISTS note_{i} text;")
        if i % 10 == 0:
            sql += [
                f"CREATE OR REPLACE FUNCTION bench_f{i:04d}(x bigint) RETURNS bigint",
                "LANGUAGE plpgsql AS $$",
                "BEGIN",
                f"    RETURN x + {i}; -- a semicolon; in a comment",
                "END;",
                "$$;",
            ]
        files.append((f"{i:04d}_generated_{i}.sql", "\n".join(sql) + "\n"))
    return files
