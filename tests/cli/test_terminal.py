"""What reaches a person's terminal: outside text is shown visibly, never obeyed (SPEC 11).

`macaroon inspect` is the command one runs on a token of unknown origin, so its
caveats, identifier and location are hostile by assumption. The one error line
on stderr quotes outside text too (a session id, a file name): it stays one
bounded line. Checked on a real pseudo-terminal, not only on a pipe.
"""

from __future__ import annotations

import json
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import faults
from conftest import CLI, ROOT_KEY_HEX
from terminal import raw_hidden, run_on_pty
from towerctl import sanitize
from towerctl.errors import ExitCode

HOSTILE_PIECES = [
    "\x1b]0;pwned title\x07",  # OSC: set the window title
    "\x1b[31;1m",  # colour
    "\x1b[2J",  # clear the screen
    "\x1bP+q\x1b\\",  # DCS
    "\x9b31m",  # C1 CSI
    "\x85",  # C1 next line
    "\x7f",  # DEL
    "\r",  # overwrite the line
    "\x08",  # backspace
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\u200b",  # zero-width space
    "\u200d",  # zero-width joiner
    "\ufeff",  # byte order mark
    "\u2028",  # line separator
    "\U000e0041",  # tag character
]
hostile_text = st.lists(
    st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(min_size=1, max_size=5)),
    min_size=1,
    max_size=12,
).map("".join)


def hostile_token(caveat: str, location: str = "timmy-tower") -> str:
    from pymacaroons import Macaroon
    from pymacaroons.macaroon import MACAROON_V2

    m = Macaroon(
        location=location,
        identifier="towerctl1 key=abc nonce=00",
        key=bytes.fromhex(ROOT_KEY_HEX),
        version=MACAROON_V2,
    )
    m.add_first_party_caveat(caveat)
    return str(m.serialize()).rstrip("=")


def test_the_hidden_set_covers_every_control_format_and_separator_character() -> None:
    wanted = {
        c
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp")
    }
    covered = {c for first, last in sanitize.HIDDEN_RANGES for c in range(first, last + 1)}
    assert wanted - covered == set()


# Default_Ignorable_Code_Point as DerivedCoreProperties.txt (Unicode 15.1) lists it.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)  # fmt: skip


def test_the_hidden_set_covers_every_default_ignorable_code_point() -> None:
    listed = {c for first, last in DEFAULT_IGNORABLE for c in range(first, last + 1)}
    # The property's derivation, where unicodedata can follow it: every Cf but the
    # exclusions, and every variation selector, is in the list written above.
    excluded = {*range(0xFFF9, 0xFFFC), *range(0x13430, 0x13440), 0x0600, 0x0601, 0x0602,
                0x0603, 0x0604, 0x0605, 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x110BD,
                0x110CD}  # fmt: skip
    format_chars = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}
    assert format_chars - excluded <= listed
    assert {*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0), *range(0x180B, 0x180E)} <= listed
    covered = {c for first, last in sanitize.HIDDEN_RANGES for c in range(first, last + 1)}
    assert listed - covered == set()
    for code in [*sorted(listed)[:: max(1, len(listed) // 200)], 0x3164, 0xFFA0, 0x115F]:
        shown = sanitize.for_terminal(f"a{chr(code)}b")
        assert shown.isascii() and shown.startswith("a\\"), (hex(code), shown)
    assert sanitize.for_terminal("a\nb\tc") == "a\nb\tc"  # newline and tab as today


@given(text=hostile_text)
def test_sanitised_text_holds_no_hidden_character_and_json_parses_back(text: str) -> None:
    assert raw_hidden(sanitize.for_terminal(text).replace("\n", "")) == []
    assert raw_hidden(sanitize.one_line(text)) == []
    line = sanitize.for_diagnostic(text * 500)
    assert raw_hidden(line) == [] and len(line) <= sanitize.DIAGNOSTIC_CHARS
    document = sanitize.escape_json_text(json.dumps({"t": text}, ensure_ascii=False))
    assert raw_hidden(document) == []
    assert json.loads(document) == {"t": text}
    encoded = sanitize.escape_json_bytes(json.dumps({"t": text}, ensure_ascii=False).encode())
    assert json.loads(encoded) == {"t": text}


@pytest.mark.timeout(120)
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(caveat=hostile_text)
def test_inspect_on_a_terminal_shows_hostile_caveats_visibly(
    caveat: str, tower_env: dict[str, str]
) -> None:
    token = hostile_token(f"note = {caveat}", location=f"at {caveat}")
    screen = run_on_pty(["macaroon", "inspect", token], faults.process_env(tower_env))
    assert screen.exit_code == ExitCode.OK, screen.text
    assert raw_hidden(screen.text) == [], screen.text
    assert f"note = {sanitize.one_line(caveat)}" in screen.text.replace("\r\n", "\n")


def test_inspect_json_escapes_hidden_characters_and_keeps_the_text(cli: CLI) -> None:
    caveat = "note = " + "".join(HOSTILE_PIECES)
    done = cli("macaroon", "inspect", hostile_token(caveat), "--json")
    assert done.exit_code == ExitCode.OK, done.stderr
    assert raw_hidden(done.stdout.replace("\n", "")) == []
    assert json.loads(done.stdout)["caveats"] == [caveat]


@pytest.mark.timeout(60)
def test_an_error_quoting_outside_text_is_one_visible_bounded_line(
    tower_env: dict[str, str],
) -> None:
    hostile_id = "\x1b]0;pwned\x07\u202e" + "x" * 5000
    screen = run_on_pty(["session", "show", hostile_id], faults.process_env(tower_env))
    assert screen.exit_code == ExitCode.BAD_INPUT
    assert raw_hidden(screen.text) == [], screen.text
    lines = screen.text.strip("\r\n").split("\r\n")
    assert len(lines) == 1 and lines[0].startswith("towerctl: ")
    assert len(lines[0]) <= len("towerctl: ") + sanitize.DIAGNOSTIC_CHARS
