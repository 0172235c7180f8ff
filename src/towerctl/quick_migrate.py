"""`towerctl migrate`, alone on the command line, against a configured database that needs
nothing: the call a deploy makes on every start. It is answered without loading the
command-line parser (typer and click, about a tenth of that call's time), by the same
functions and with the same line as the full command. Anything else (a file to apply, a
refusal, an error other than an unreachable database, no database configured) is left
to the full command, which checks and says it all again."""

from __future__ import annotations

import sys

UP_TO_DATE = "up to date: nothing to apply"


def answered() -> bool:
    """True when the database was up to date and that was said; False: run the full command."""
    from towerctl import config
    from towerctl.errors import DatabaseUnreachable

    url = config.database_url(None)
    if not url:
        return False  # the embedded server: the full command starts it
    try:
        from towerctl import db
        from towerctl.migration_files import default_dir, discover
        from towerctl.migration_ledger import read_ledger
        from towerctl.migration_plan import plan_migrations

        files = discover(default_dir())
        with db.connect(url) as conn:
            pending = plan_migrations(files, read_ledger(conn)).steps
    except KeyboardInterrupt:
        sys.stderr.write("towerctl: interrupted\n")
        raise SystemExit(130) from None
    except DatabaseUnreachable as error:  # said here: the full command would try again
        from towerctl.sanitize import for_diagnostic

        sys.stderr.write(f"towerctl: {for_diagnostic(str(error))}\n")
        raise SystemExit(int(error.exit_code)) from None
    except Exception:  # said properly by the full command
        return False
    if pending:
        return False
    sys.stderr.write(UP_TO_DATE + "\n")
    return True
