"""The run's report as text: a table per fault, the figures, and every promise broken."""

from __future__ import annotations

from collections import Counter

from tests.chaos.checker import Report, Row
from tests.chaos.cluster import PER_HOUR, PER_MIN

HEADER = (
    "fault",
    "requests",
    "in time",
    "excused",
    "503",
    "dups allowed",
    "dups found",
    "unexplained",
    f"budget peak/{PER_MIN}",
    "evictions seen",
)


def render(report: Report) -> str:
    data = report.data
    lines = [f"chaos run, seed {data.seed}: {len(data.faults)} faults"]
    table: list[tuple[str, ...]] = [HEADER]
    for row in report.rows:
        table.append(_cells(row, data.chaos_start))
    total = Row("total", data.chaos_start, data.chaos_end)
    for row in report.rows:
        for name in ("requests", "in_time", "excused", "status_503", "evictions", "evictions_seen"):
            setattr(total, name, getattr(total, name) + getattr(row, name))
        total.dups_explained += row.dups_explained
        total.dups_unexplained += row.dups_unexplained
        total.budget_peak = max(total.budget_peak, row.budget_peak)
    table.append(_cells(total, data.chaos_start, total_row=True))
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for n, cells in enumerate(table):
        lines.append(
            "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        )
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    figures = dict(report.figures)
    lines.append(
        f"budget peak: {figures.pop('budget_peak_60s', 0)}/{PER_MIN} in any 60 s, "
        f"{figures.pop('budget_peak_3600s', 0)}/{PER_HOUR} in any 3600 s"
    )
    lines.append("figures: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    reasons = Counter(reason for _, reason in report.duplicates)
    if reasons:
        lines.append(
            "ids fetched again, by reason: "
            + ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        )
    for record in data.faults:
        if record.note:
            lines.append(f"note: {record.fault.describe()}: {record.note}")
    if report.broken:
        lines.append(f"BROKEN: {len(report.broken)} promise violations")
        shown = Counter[str]()
        for broken in report.broken:
            shown[broken.promise] += 1
            if shown[broken.promise] <= 10:
                lines.append(f"  - {broken.promise}: {broken.detail}")
        for promise, count in shown.items():
            if count > 10:
                lines.append(f"  ({count - 10} more of {promise!r})")
    else:
        lines.append("every promise held")
    return "\n".join(lines)


def _cells(row: Row, origin: float, *, total_row: bool = False) -> tuple[str, ...]:
    if total_row:
        name, allowed = "total", ""
    elif row.fault is None:
        name, allowed = row.name, "no"
    else:
        name, allowed = (
            f"{row.fault.start - origin:5.1f}s {row.name.split(' at ')[0]}",
            ("yes" if row.dups_allowed else "no"),
        )
    return (
        name,
        str(row.requests),
        str(row.in_time),
        str(row.excused),
        str(row.status_503),
        allowed,
        str(row.dups_explained + row.dups_unexplained),
        str(row.dups_unexplained),
        str(row.budget_peak),
        f"{row.evictions_seen}/{row.evictions}",
    )
