"""The one sanitiser for text that came from outside towerctl (SPEC 11).

Messages, agent replies and errors, caveats and file names may hold escape
sequences, C1 controls, DEL, bidirectional overrides and zero-width characters.
None of them reaches a terminal or stderr raw, and JSON escapes them:

- `for_terminal(text)` shows each hidden character visibly (`\\x1b`, `\\u202e`),
  keeping newlines and tabs, for content printed to a person;
- `for_diagnostic(text)` is one bounded line for stderr (newlines shown too);
- `escape_json_text` / `escape_json_bytes` turn the same characters into JSON
  `\\uXXXX` escapes inside an already encoded JSON document (the parsed text is
  unchanged: JSON's structure is ASCII, so every such character is inside a string).

The hidden set is every code point of Unicode's categories Cc (controls), Cf
(format: bidi overrides and isolates, zero-width, soft hyphen, BOM, tags), Zl and
Zp (line and paragraph separators), and of its Default_Ignorable_Code_Point property:
what a terminal draws as nothing (Hangul fillers, variation selectors, the combining
grapheme joiner, Mongolian free variation selectors, the reserved E0000..E0FFF).
It is written out as ranges so that building it costs nothing at start-up; a test
checks it against `unicodedata` and the standard's DerivedCoreProperties.txt.
"""

from __future__ import annotations

import re

# (first, last) inclusive; Cc, Cf, Zl and Zp as of Unicode 15, and Default_Ignorable_Code_Point
# (DerivedCoreProperties.txt: Other_Default_Ignorable_Code_Point + Cf + Variation_Selector
# - White_Space - FFF9..FFFB - 13430..1343F - prepended concatenation marks).
HIDDEN_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x001F),
    (0x007F, 0x009F),
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)

DIAGNOSTIC_CHARS = 400  # one stderr line never grows past this (plus the prefix)


def _character_class(ranges: tuple[tuple[int, int], ...]) -> re.Pattern[str]:
    parts = [
        re.escape(chr(first))
        if first == last
        else f"{re.escape(chr(first))}-{re.escape(chr(last))}"
        for first, last in ranges
    ]
    # Lone surrogates (text decoded with surrogateescape) are hidden as well.
    return re.compile("[" + "".join(parts) + "\ud800-\udfff]")


_HIDDEN = _character_class(HIDDEN_RANGES)
# On a screen, newline and tab are kept: every other hidden character is shown.
_HIDDEN_ON_SCREEN = _character_class(((0x00, 0x08), (0x0B, 0x1F), *HIDDEN_RANGES[1:]))
# In an encoded JSON document C0 controls are escaped already, and outside strings
# there is structural whitespace (newlines of an indented document) to keep.
_HIDDEN_IN_JSON = _character_class(HIDDEN_RANGES[1:])


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else (
        f"\\U{code:08x}")  # fmt: skip


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def is_clean(text: str) -> bool:
    """True when `text` holds no hidden character at all (newlines and tabs included)."""
    return _HIDDEN.search(text) is None


def for_terminal(text: str) -> str:
    """`text` with every hidden character but newline and tab shown visibly.

    A carriage return is shown too (`\\x0d`): it would let text overwrite a line.
    """
    return _HIDDEN_ON_SCREEN.sub(_shown, text)


def one_line(text: str) -> str:
    """`text` with every hidden character shown, newlines and tabs included (a field value)."""
    return _HIDDEN.sub(_shown, text)


def for_diagnostic(text: str, limit: int = DIAGNOSTIC_CHARS) -> str:
    """One line for stderr: every hidden character shown, cut to `limit` characters."""
    if len(text) > limit * 4:
        text = text[: limit * 4]  # never scan megabytes for one line
    shown = _HIDDEN.sub(_shown, text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def escape_json_text(document: str) -> str:
    """An encoded JSON document with every hidden character written as `\\uXXXX`.

    C0 controls are escaped by any JSON encoder already; this adds DEL, C1 and the
    format characters that `json.dumps(..., ensure_ascii=False)` leaves raw.
    """
    return _HIDDEN_IN_JSON.sub(_json_escape, document)


def escape_json_bytes(document: bytes) -> bytes:
    """`escape_json_text` for UTF-8 bytes (COPY output): ASCII without DEL passes as it
    is; anything else is decoded once and escaped with the same character class."""
    if document.isascii() and b"\x7f" not in document:
        return document
    try:
        text = document.decode("utf-8")
    except UnicodeDecodeError:  # never from a UTF-8 server; escape what decodes
        text = document.decode("utf-8", "replace")
    return escape_json_text(text).encode("utf-8")
