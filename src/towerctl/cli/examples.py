"""The "Examples" block in the help of the commands people run daily."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from towerctl.cli.typer_adapter import Command

EXAMPLES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("migrate",): (
        "towerctl migrate --dry-run            # what would run, every check made",
        "towerctl migrate                      # apply what is pending",
        "towerctl migrate status --check       # exit 7 unless up to date",
        "towerctl migrate new add_index --dir migrations  # your next numbered, empty file",
    ),
    ("session", "request"): (
        'towerctl session request "$SESSION" "Summarise this" --macaroon-file user.token',
        'echo "a long question" | towerctl session request "$SESSION" - --macaroon-file user.token',
        'towerctl session request "$SESSION" "hi" --idempotency-key k-1 --json '
        "--macaroon-file user.token",
        "jq -c '{message: .text}' questions.json | towerctl session request \"$SESSION\" --batch "
        "--macaroon-file user.token",
    ),
    ("session", "messages"): (
        'towerctl session messages "$SESSION" --macaroon-file user.token',
        "export TOWER_MACAROON_FILE=user.token    # for the lines below",
        'towerctl session messages "$SESSION" --format ndjson | jq -r .content',
        'towerctl session messages "$SESSION" --format json --limit 100 --after 250',
        'towerctl session messages "$SESSION" --format markdown -o ticket.md',
    ),
    ("macaroon", "mint"): (
        'towerctl macaroon mint "$SESSION"                      # read,request for 24h',
        'towerctl macaroon mint "$SESSION" --scope read --ttl 8h > support.token',
    ),
}


def add_examples(command: Command, path: tuple[str, ...]) -> None:
    """Put the examples of `path` and of every sub-command below it into their help."""
    lines = EXAMPLES.get(path)
    if lines:
        # "\b" keeps Click from re-wrapping the block.
        command.epilog = "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)
    for name, sub in getattr(command, "commands", {}).items():
        add_examples(sub, (*path, name))
