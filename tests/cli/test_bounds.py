"""Every input bound at the bound and one past it; endless input; batch keys; a batch whose
reader goes away; secrets never echoed in usage errors (SPEC 11)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import typer
import typer.core
import typer.main

from agents_fixtures import TOWERCTL, exec_agent, run_measured
from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from towerctl import bounds
from towerctl.cli.typer_adapter import Command
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, ExitCode


def request(cli: CLI, s: OpenedSession, *args: str, input: str | bytes | None = None):  # type: ignore[no-untyped-def]
    return cli("session", "request", s.id, *args, "--macaroon", s.macaroon, input=input)


def requests_recorded(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM session_requests").fetchone()
    assert row is not None
    return int(row[0])


def debits(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM balance_ledger WHERE kind = 'debit'").fetchone()
    assert row is not None
    return int(row[0])


# --- environment numbers --------------------------------------------------------------

ENV_BOUNDS = [b for b in bounds.ALL if b.env is not None]


def _past(value: float, whole: bool, up: bool) -> str:
    step = 1 if whole else max(abs(value) * 0.001, 0.0001)
    return repr(value + step if up else value - step)


@pytest.mark.parametrize("bound", ENV_BOUNDS, ids=lambda b: b.env)
def test_every_environment_number_at_and_past_its_range(
    bound: bounds.Bound, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bound.env is not None
    for edge in (bound.minimum, bound.maximum):
        monkeypatch.setenv(bound.env, repr(edge))
        assert bound.value() == edge
        Pricing.from_env(), RequestLimits.from_env()
    for raw in (
        _past(bound.minimum, bound.whole, up=False),
        _past(bound.maximum, bound.whole, up=True),
        "1e400",
        "nan",
        "-inf",
        "ten",
    ):
        monkeypatch.setenv(bound.env, raw)
        with pytest.raises(BadInput) as refused:
            bound.value()
        assert bound.env in str(refused.value) and " to " in str(refused.value)
    monkeypatch.setenv(bound.env, "")
    assert bound.value() == bound.default


@pytest.mark.parametrize(
    ("name", "raw", "allowed"),
    [
        ("TOWER_AGENT_TIMEOUT", "3e6", "from 0.001 to 3,600"),
        ("TOWER_BUSY_WAIT", "1e7", "from 0 to 3,600"),
        ("TOWER_CONTEXT_MESSAGES", "1e20", "from 0 to 1,000"),
        ("TOWER_MAX_MESSAGE_CHARS", "2.5", "from 1 to 1,000,000"),
    ],
)
def test_environment_numbers_out_of_range_exit_2_with_one_line(
    cli: CLI, monkeypatch: pytest.MonkeyPatch, name: str, raw: str, allowed: str
) -> None:
    s = open_session(cli, 500)
    monkeypatch.setenv(name, raw)
    result = request(cli, s, "hi")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert name in result.stderr and allowed in result.stderr
    assert result.stderr.count("\n") == 1


# --- message, token, batch line, nesting -----------------------------------------------------


def test_message_at_and_past_its_bound(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_MAX_MESSAGE_CHARS", "100")
    s = open_session(cli, 100_000)
    assert request(cli, s, "a" * 100).exit_code == ExitCode.OK
    assert request(cli, s, "a" * 101).exit_code == ExitCode.BAD_INPUT
    # stdin: 100 characters of 4 bytes and a newline is the byte bound exactly (401)
    assert request(cli, s, "-", input="\U0001f600" * 100 + "\n").exit_code == ExitCode.OK
    assert request(cli, s, "-", input="\U0001f600" * 101).exit_code == ExitCode.BAD_INPUT
    past = request(cli, s, "-", input=b"a" * 402)
    assert past.exit_code == ExitCode.BAD_INPUT and "longer than 401 bytes" in past.stderr
    assert requests_recorded(db_url) == 2


def test_token_at_and_past_its_bound(cli: CLI, tmp_path: Path) -> None:
    s = open_session(cli, 500)
    at, past = tmp_path / "at", tmp_path / "past"
    at.write_bytes(b"A" * bounds.TOKEN_BYTES.whole_value() + b"\n")
    past.write_bytes(b"A" * (bounds.TOKEN_BYTES.whole_value() + 1) + b"\n")
    read = cli("session", "request", s.id, "hi", "--macaroon-file", str(at))
    assert read.exit_code == ExitCode.UNAUTHORIZED  # read in full, then found malformed
    refused = cli("session", "request", s.id, "hi", "--macaroon-file", str(past))
    assert refused.exit_code == ExitCode.BAD_INPUT and "65,536 bytes" in refused.stderr
    on_stdin = cli("session", "messages", s.id, "--macaroon-file", "-", input="A" * 70_000)
    assert on_stdin.exit_code == ExitCode.BAD_INPUT


def test_batch_line_at_and_past_its_bound(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_MAX_MESSAGE_CHARS", "10")
    limit = bounds.batch_line_bytes(10)
    assert limit == 4_216
    s = open_session(cli, 100_000)
    line = '{"message": "hello"}'
    at = line[:-1] + " " * (limit - len(line)) + "}"
    assert len(at.encode()) == limit
    assert request(cli, s, "--batch", input=at + "\n").exit_code == ExitCode.OK
    past = request(cli, s, "--batch", input=at[:-1] + " }\n")
    assert past.exit_code == ExitCode.BAD_INPUT
    assert "line 1: longer than 4,216 bytes" in past.stderr
    assert requests_recorded(db_url) == 1


def test_nesting_at_and_past_its_bound(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 500)
    depth = bounds.JSON_DEPTH.whole_value()
    at = request(cli, s, "--batch", input="[" * depth + "]" * depth + "\n")
    assert at.exit_code == ExitCode.BAD_INPUT and "expected an object" in at.stderr
    past = request(cli, s, "--batch", input="[" * (depth + 1) + "]" * (depth + 1) + "\n")
    assert past.exit_code == ExitCode.BAD_INPUT and "nested deeper than 64" in past.stderr
    deep = request(cli, s, "--batch", input='{"message": ' + "[" * 300_000 + "\n")
    assert deep.exit_code == ExitCode.BAD_INPUT and "nested deeper" in deep.stderr
    brackets_in_text = json.dumps({"message": "[" * 1000 + "{" * 1000})
    assert request(cli, s, "--batch", input=brackets_in_text + "\n").exit_code == ExitCode.OK
    assert requests_recorded(db_url) == 1


def test_depth_scan_agrees_with_the_parser() -> None:
    for text in (b'["a]", [[]]]', b'{"k": "\\"[[["}', b'"[[[[', b"[[[]]][]"):
        assert bounds.json_depth_within(text, 3)
    assert not bounds.json_depth_within(b'[["]"], [[[]]]]', 3)
    assert bounds.json_depth_within(b"[" * 4, 4) and not bounds.json_depth_within(b"[" * 5, 4)


def test_bounded_lines_never_read_past_a_long_line() -> None:
    stream = io.BytesIO(b"ab\n" + b"c" * 100 + b"\nnever")
    lines = bounds.BoundedLines(stream, 5)
    assert next(lines) == b"ab\n"
    with pytest.raises(bounds.LineTooLong):
        next(lines)
    assert stream.tell() == 3 + 7


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["--macaroon-file", "/dev/zero"], None),
        (["-", "--macaroon", "{token}"], "/dev/zero"),
        (["--batch", "--macaroon", "{token}"], "/dev/zero"),
    ],
    ids=["macaroon-file", "request -", "batch"],
)
def test_dev_zero_exits_2_in_bounded_memory(
    tower_env: dict[str, str], cli: CLI, db_url: str, args: list[str], stdin: str | None
) -> None:
    s = open_session(cli, 500)
    argv = ["session", "request", s.id, *(a.replace("{token}", s.macaroon) for a in args)]
    if args[0] == "--macaroon-file":
        argv.insert(3, "hi")
    code, peak_mb, _out, err = run_measured(argv, stdin=stdin)
    assert code == ExitCode.BAD_INPUT, err
    assert peak_mb < 200, peak_mb
    assert err.count("\n") == 0 and len(err) < 500
    assert requests_recorded(db_url) == 0


# --- batch keys ---------------------------------------------------------------------------


def test_misspelt_idempotency_key_twice_charges_nothing(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 500)
    line = '{"message": "x", "idempotency_key": "k-1"}\n'
    for _ in range(2):
        result = request(cli, s, "--batch", input=line)
        assert result.exit_code == ExitCode.BAD_INPUT
        assert "line 1: unknown key 'idempotency_key'" in result.stderr
        [error] = [json.loads(line) for line in result.stdout.splitlines()]
        assert error["error"]["line"] == 1 and error["error"]["exitCode"] == 2
    assert (requests_recorded(db_url), debits(db_url)) == (0, 0)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"message": "x", "idempotencyKey": 7}', "idempotencyKey must be a string"),
        ('{"message": "x", "IdempotencyKey": "k"}', "unknown key 'IdempotencyKey'"),
        (
            '{"message": "x", "idempotencyKey": "a", "idempotencyKey": "b"}',
            "the key 'idempotencyKey' appears twice",
        ),
        ('{"message": "x", "extra": null}', "unknown key 'extra'"),
    ],
)
def test_batch_lines_with_other_keys_run_nothing(
    cli: CLI, db_url: str, line: str, words: str
) -> None:
    s = open_session(cli, 500)
    result = request(cli, s, "--batch", input='{"message": "ok"}\n' + line + "\n")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert f"line 2: {words}" in result.stderr
    assert requests_recorded(db_url) == 1


# --- a batch whose reader goes away -------------------------------------------------------


def _batch_process(s: OpenedSession, agent: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [TOWERCTL, "session", "request", s.id, "--batch", "--agent", agent,
         "--macaroon", s.macaroon],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _first_line(stream: io.BufferedReader | None) -> bytes:
    assert stream is not None
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(stream.fileno(), 1)
        assert byte, "no output"
        line += byte
    return line


@pytest.mark.timeout(60)
def test_batch_reader_gone_records_the_request_in_flight_and_exits_10(
    tower_env: dict[str, str], cli: CLI, db_url: str, tmp_path: Path
) -> None:
    slow = exec_agent(
        tmp_path, "slow.py", "import time; time.sleep(1); print(conv['messages'][-1]['content'])"
    )
    s = open_session(cli, 1_000_000)
    proc = _batch_process(s, slow)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"".join(b'{"message": "m%d"}\n' % n for n in range(50)))
    proc.stdin.close()
    assert json.loads(_first_line(proc.stdout))["result"] == "m0"
    time.sleep(0.3)  # line 2 is with the agent (for 1 s) when the reader goes
    proc.stdout.close()
    assert proc.wait(timeout=30) == ExitCode.WRITE_FAILED
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert "1 line answered; one more was recorded" in err and "no further line was run" in err
    assert err.count("\n") == 1
    assert requests_recorded(db_url) == 2  # the answered line and the one in flight
    assert_store_consistent(db_url)


@pytest.mark.timeout(60)
def test_batch_runs_no_line_once_its_reader_is_gone(
    tower_env: dict[str, str], cli: CLI, db_url: str
) -> None:
    """The next line arrives after the reader left: it is not run at all."""
    s = open_session(cli, 1_000_000)
    proc = _batch_process(s, "echo")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"message": "first"}\n')
    proc.stdin.flush()
    assert json.loads(_first_line(proc.stdout))["result"] == "first"
    proc.stdout.close()
    time.sleep(0.2)
    proc.stdin.write(b'{"message": "second"}\n{"message": "third"}\n')
    proc.stdin.close()
    assert proc.wait(timeout=30) == ExitCode.WRITE_FAILED
    assert proc.stderr is not None
    assert "1 line answered; no further line was run" in proc.stderr.read().decode()
    assert requests_recorded(db_url) == 1


# --- secrets in usage errors --------------------------------------------------------------

TOKEN = (
    "AgELdGltbXktdG93ZXICJGtleS0xOjNmMmExYjJjLTExMTEtMjIyMi0zMzMzLTQ0NDQ1NTU1NjY2NgACG3Nlc3Np"
    "b25faWQgPSAzZjJhMWIyYy0xMTExAAIaZXhwaXJlcyA8IDIwMjYtMTEtMjdUMTM6MDA6MDBaAAAGIHVgY2Vv_Q3dRw"
)
SESSION_ID = "3f2a1b2c-1111-2222-3333-444455556666"


def _commands() -> list[tuple[list[str], Command]]:
    from towerctl.cli import app

    root = typer.main.get_command(app)
    found: list[tuple[list[str], Command]] = [([], root)]
    todo: list[tuple[list[str], Command]] = [([], root)]
    while todo:
        path, command = todo.pop()
        if isinstance(command, typer.core.TyperGroup):
            ctx = typer.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                found.append(([*path, name], sub))
                todo.append(([*path, name], sub))
    return [(p, c) for p, c in found if not isinstance(c, typer.core.TyperGroup) or p == []]


REQUIRED_VALUES = {"--deposit": "100", "--sats": "100", "--expired-for": "1d", "--to": "1"}


ARGUMENT_VALUES = {"shell": "bash"}  # arguments that take one of a few words


def _positionals(command: Command, session_id: str = SESSION_ID) -> list[str]:
    """Values for a command's arguments, and its required options, that parse."""
    values = []
    for param in command.params:
        if isinstance(param, typer.core.TyperArgument) and param.name in ARGUMENT_VALUES:
            values += [ARGUMENT_VALUES[param.name]]
        elif isinstance(param, typer.core.TyperArgument):
            names = (param.metavar or param.name or "").upper()
            values += [session_id if "ID" in names else "7" if "VERSION" in names else "x"]
        elif isinstance(param, typer.core.TyperOption) and param.required and not param.is_flag:
            option = max(param.opts, key=len)
            values += [option, REQUIRED_VALUES.get(option, "1")]
    return values


def _value_options(command: Command) -> list[str]:
    return [
        max(p.opts, key=len)
        for p in command.params
        if isinstance(p, typer.core.TyperOption)
        and not p.is_flag
        and not p.count
        and not p.required
    ]


CASES = [
    (path, option, command) for path, command in _commands() for option in _value_options(command)
]
# Options whose value is free text: a token there is not a usage error. Everything else
# on the line is valid (a real session, its macaroon in TOWER_MACAROON), so what follows
# is the command's own answer, whose output must not echo the token either.
FREE_TEXT_CODES = {
    "--macaroon": ExitCode.UNAUTHORIZED,  # its right place: this one is not valid
    "--database-url": ExitCode.UNREACHABLE,
    "--read-database-url": ExitCode.UNREACHABLE,  # doctor reads from it: not a URL
    "--model": ExitCode.OK,  # the echo agent takes no model
    "--idempotency-key": ExitCode.OK,
    "--output": ExitCode.OK,  # a file by that name, in the test's folder
}
KNOWN_LEAKS: dict[tuple[str, str], str] = {}


@pytest.fixture
def real_session(cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OpenedSession:
    s = open_session(cli, 10_000)
    monkeypatch.setenv("TOWER_MACAROON", s.macaroon)
    monkeypatch.chdir(tmp_path)
    return s


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "option", "command"),
    CASES,
    ids=lambda v: " ".join(v) if isinstance(v, list) else v if isinstance(v, str) else "",
)
def test_a_token_as_any_option_value_is_never_echoed(
    request: pytest.FixtureRequest,
    cli: CLI,
    real_session: OpenedSession,
    path: list[str],
    option: str,
    command: Command,
) -> None:
    leak = KNOWN_LEAKS.get((" ".join(path), option))
    if leak:
        request.applymarker(pytest.mark.xfail(reason=leak, strict=True))
    positionals = _positionals(command, real_session.id)
    for args in ([*path, *positionals, option, TOKEN], [*path, *positionals, f"{option}={TOKEN}"]):
        if not path:  # a global option: in front of a command that needs nothing else
            args = [option, TOKEN, "doctor"] if args[-1] == TOKEN else [args[-1], "doctor"]
        result = cli(*args)
        shown = result.stdout + result.stderr
        assert TOKEN not in shown and TOKEN[:40] not in shown, (args, shown[:300])
        expected = FREE_TEXT_CODES.get(option, ExitCode.BAD_INPUT)
        assert result.exit_code == expected, (args, result.stderr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "command"),
    [c for c in _commands() if c[0]],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_token_as_an_extra_argument_is_never_echoed(
    cli: CLI, real_session: OpenedSession, path: list[str], command: Command
) -> None:
    result = cli(*path, *_positionals(command, real_session.id), TOKEN)
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    if any(isinstance(p, typer.core.TyperArgument) and p.nargs == -1 for p in command.params):
        return  # `help WORDS...` takes any number of words: the token is one, unknown
    assert "unexpected extra argument" in result.stderr and "(<hidden>)" in result.stderr
