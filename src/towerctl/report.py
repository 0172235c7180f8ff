"""What the store took over a window, per hour or day: deposits, top-ups and debits in
sats, and requests by state and by agent (SPEC 16). Periods start on UTC hours or days;
a period with nothing in it is reported with zeros, so a chart has no gaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from towerctl.errors import BadInput

if TYPE_CHECKING:
    import psycopg

PERIODS = ("hour", "day")
STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_PERIODS = 10_000  # a year by hour fits

# Each period is read as its own range of the created_at index: no row's period is
# computed, and nothing is sorted or hashed beyond a few groups per period. The covering
# indexes (sql/0026, sql/0027) hold every column read here, so a range is read from the
# index alone. A period's range is clipped to the window (`lo`, `hi`).
PERIOD_RANGES = "unnest(%(starts)s::timestamptz[], %(los)s::timestamptz[], %(his)s::timestamptz[])"
MONEY = f"""
SELECT p.start,
       coalesce(sum(l.amount_sats) FILTER (WHERE l.kind = 'deposit'), 0)::bigint,
       coalesce(sum(l.amount_sats) FILTER (WHERE l.kind = 'topup'), 0)::bigint,
       coalesce(sum(l.amount_sats) FILTER (WHERE l.kind = 'debit'), 0)::bigint
FROM {PERIOD_RANGES} AS p(start, lo, hi)
JOIN balance_ledger l ON l.created_at >= p.lo AND l.created_at < p.hi
GROUP BY p.start"""
# Counted by state and agent together, then summed each way here: the pairs are few,
# and a distributed store (Citus) cannot run GROUPING SETS across its nodes.
REQUESTS = f"""
SELECT p.start, r.state, r.agent, count(*)
FROM {PERIOD_RANGES} AS p(start, lo, hi)
JOIN session_requests r ON r.created_at >= p.lo AND r.created_at < p.hi
GROUP BY p.start, r.state, r.agent"""


@dataclass
class Period:
    start: datetime
    deposit_sats: int = 0
    topup_sats: int = 0
    debited_sats: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # by state
    agents: dict[str, int] = field(default_factory=dict)  # requests by agent

    def add(self, other: Period) -> None:
        self.deposit_sats += other.deposit_sats
        self.topup_sats += other.topup_sats
        self.debited_sats += other.debited_sats
        for mine, theirs in ((self.requests, other.requests), (self.agents, other.agents)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count

    def as_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "depositSats": self.deposit_sats,
            "topupSats": self.topup_sats,
            "debitedSats": self.debited_sats,
            "requests": dict(sorted(self.requests.items())),
            "agents": dict(sorted(self.agents.items())),
        }


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    by: str
    periods: tuple[Period, ...]
    totals: Period

    def as_json(self) -> dict[str, Any]:
        totals = self.totals.as_json()
        del totals["start"]
        return {
            "since": self.since,
            "until": self.until,
            "by": self.by,
            "periods": [p.as_json() for p in self.periods],
            "totals": totals,
        }


def _floor(moment: datetime, by: str) -> datetime:
    moment = moment.astimezone(UTC)
    if by == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def window(
    since: datetime | None, until: datetime | None, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The window asked for: by default the last day, up to now."""
    until = until or now or datetime.now(UTC)
    since = since or until - timedelta(days=1)
    if since >= until:
        raise BadInput("--since must be before --until")
    return since, until


def build_report(
    conn: psycopg.Connection,
    since: datetime | None = None,
    until: datetime | None = None,
    by: str = "hour",
) -> Report:
    """Deposits, top-ups, debits and requests from `since` (inclusive) to `until`
    (exclusive), one period per UTC hour or day; read in one snapshot."""
    if by not in PERIODS:
        raise BadInput(f"--by must be one of {', '.join(PERIODS)}")
    since, until = window(since, until)
    first = _floor(since, by)
    if (until - first) / STEP[by] > MAX_PERIODS:
        raise BadInput(f"the window holds more than {MAX_PERIODS:,} periods; use --by day")
    periods: dict[datetime, Period] = {}
    start = first
    while start < until:
        periods[start] = Period(start)
        start += STEP[by]
    starts = list(periods)
    params = {
        "starts": starts,
        "los": [max(start, since) for start in starts],
        "his": [min(start + STEP[by], until) for start in starts],
    }
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        money = conn.execute(MONEY, params).fetchall()
        counts = conn.execute(REQUESTS, params).fetchall()
    for start, deposit, topup, debit in money:
        p = periods[start.astimezone(UTC)]
        p.deposit_sats, p.topup_sats, p.debited_sats = int(deposit), int(topup), int(debit)
    for start, state, agent, count in counts:
        p = periods[start.astimezone(UTC)]
        p.requests[state] = p.requests.get(state, 0) + int(count)
        p.agents[agent] = p.agents.get(agent, 0) + int(count)
    totals = Period(first)
    for p in periods.values():
        totals.add(p)
    return Report(since, until, by, tuple(periods.values()), totals)
