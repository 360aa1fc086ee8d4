"""``cloudbender-agent jobs --all`` and ``logs JOB``: what happened on this node.

Both read the state directory, read-only, rather than ask the daemon: they answer
after the agent stopped or crashed (when a person most wants to know why a job
failed), and job history and job output stay off the health server, which
``health.allow_remote`` can open to the network. So both need root, as ``audit`` does.

History comes from the job store (ended jobs are kept 7 days, or
``results.retention_h`` when that is longer); bytes sent from the audit ledger, where each
result file is recorded once per job and resends as byte ranges (docs/audit.md).
Every cell shown passes through :func:`agent.escaping.escape` (``--json`` is escaped
by JSON).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.audit import read
from agent.audit.egress import RESENT, SENT
from agent.escaping import escape
from agent.jobs.store import JobRecord
from agent.statuscmd import _duration

# `jobs` (without --all) also shows jobs the control plane acknowledged this long ago.
RECENT_S = 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``30m``, ``2h``, ``7d``) or an
    ISO 8601 time (UTC unless it names a zone). Raises ``ValueError`` saying which."""
    now = time.time() if now is None else now
    if match := _DURATION.fullmatch(text.strip()):
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a duration (30m, 2h, 7d) or an ISO 8601 time"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def bytes_sent(ledger: Path) -> dict[str, int]:
    """Per job, the result bytes that left at most: each file once at its size, plus
    every range sent again. Empty when there is no ledger. Raises ``AuditError`` or
    ``OSError`` as :func:`agent.audit.read` does."""
    if not ledger.exists():
        return {}
    files: dict[tuple[str, str], int] = {}
    sent: dict[str, int] = {}
    for entry in read(ledger):
        job, kind = str(entry.get("job_id")), entry.get("kind")
        if kind == SENT and isinstance(entry.get("size"), int):
            if (job, str(entry.get("path"))) not in files:  # an older agent's repeats
                files[(job, str(entry.get("path")))] = entry["size"]
                sent[job] = sent.get(job, 0) + entry["size"]
        elif kind == RESENT and isinstance(entry.get("start"), int):
            again = max(int(entry.get("end") or 0) - entry["start"], 0)
            sent[job] = sent.get(job, 0) + again
    return sent


def history_row(record: JobRecord, sent: dict[str, int], now: float) -> dict[str, Any]:
    """One job as ``jobs --all --json`` shows it."""
    end = record.ended_at if record.ended_at is not None else now
    return {
        "job_id": record.job_id,
        "state": record.state.value,
        "reason": record.reason,
        "exit_code": record.exit_code,
        "accepted_at": record.created_at,
        "ended_at": record.ended_at,
        "acked_at": record.acked_at,
        "duration_s": round(end - record.created_at, 1),
        "bytes_sent": sent.get(record.job_id, 0),
        "image": record.assignment.get("image", {}).get("ref"),
    }


def recent_rows(records: list[JobRecord], shown: set[str], now: float) -> list[dict[str, Any]]:
    """Acknowledged jobs that ended within :data:`RECENT_S` and are not in ``shown``,
    shaped as the daemon's ``/status`` jobs, for ``jobs`` without ``--all``."""
    out = []
    for r in records:
        if r.job_id in shown or r.acked_at is None or (r.ended_at or 0) < now - RECENT_S:
            continue
        image = r.assignment.get("image", {}).get("ref")
        out.append(
            {
                "job_id": r.job_id,
                "state": r.state.value,
                "reason": r.reason,
                "exit_code": r.exit_code,
                "created_at": r.created_at,
                "age_s": round(now - r.created_at, 1),
                "image": image,
                "gpus": list(r.gpu_uuids),
            }
        )
    return out


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def render_history(rows: list[dict[str, Any]]) -> str:
    """A table: job, state (reason, exit code), accepted (UTC), duration, bytes sent,
    image; each cell escaped before the columns are measured."""
    if not rows:
        return "No jobs."
    table: list[tuple[str, ...]] = [("JOB", "STATE", "ACCEPTED (UTC)", "DURATION", "SENT", "IMAGE")]
    for row in rows:
        state = str(row["state"])
        if row.get("reason"):
            exit_code = row.get("exit_code")
            state += f" ({row['reason']}" + (
                f", exit {exit_code})" if exit_code is not None else ")"
            )
        accepted = datetime.fromtimestamp(float(row["accepted_at"]), UTC)
        cells = (
            str(row["job_id"]),
            state,
            accepted.strftime("%Y-%m-%d %H:%M:%S"),
            _duration(float(row["duration_s"])),
            _size(int(row["bytes_sent"])),
            str(row.get("image") or "—"),
        )
        table.append(tuple(escape(cell) for cell in cells))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:5])) + "  " + r[5]
        for r in table
    )
