"""The control socket's ``review`` commands (docs/airlock.md): what a held job wants to
send, and the decisions. Called by :class:`agent.control.commands.Operator`, after the
socket's access check (root or ``control.group``: the same rule for looking as for
deciding, since looking shows data).

Requests: ``review_list``; ``review_show`` / ``review_release`` with ``job_id``;
``review_refuse`` with ``job_id`` and ``why``. The reply's message is text ready to
print: everything a job or a control plane chose (ids, image, file names, contents) is
escaped (:mod:`agent.airlock.preview`).

A decision is written to the audit ledger (``result_approved`` / ``result_refused``,
with the caller's uid and pid and the refusal's words) before it takes effect: one
that cannot be recorded is refused ``not_recorded`` and changes nothing. The same uid
releasing twice counts once and is not recorded again. Errors: ``not_held`` (no such
held job), ``bad_request``, ``unavailable`` (review is off and nothing is held).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from agent.airlock.hold import Airlock, HeldJob
from agent.airlock.preview import cut, preview
from agent.control.peer import Peer
from agent.control.server import Reply, error_reply
from agent.errors import AgentError
from agent.escaping import escape

log = structlog.get_logger(__name__)

REVIEW_COMMANDS = ("review_list", "review_show", "review_release", "review_refuse")
MAX_JOB_ID = 128
MAX_WHY = 2000


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _age(seconds: float) -> str:
    minutes = int(max(0.0, seconds) // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _approvals(airlock: Airlock, job_id: str) -> str:
    votes = [v for v in airlock.store.votes(job_id) if v.decision == "release"]
    who = ", ".join(v.reviewer if not v.reviewer.isdigit() else f"uid {v.reviewer}" for v in votes)
    return f"{len(votes)}/{airlock.needed()}" + (f" ({who})" if who else "")


def render_list(airlock: Airlock, now: float) -> str:
    held = airlock.held()
    if not held:
        off = "" if airlock.required() else " (results.review is none: results are not held)"
        return "no job is held for review" + off
    rows = [("JOB", "IMAGE", "DATASTORE", "FILES", "BYTES", "WAITING SINCE", "APPROVALS")]
    for h in held:
        mf = h.manifest
        rows.append(
            (
                cut(h.job_id, 40),
                cut(h.image, 50),
                escape(h.datastore),
                str(len(mf.files)),
                str(mf.total_bytes),
                f"{_when(h.held_since)} ({_age(now - h.held_since)})",
                _approvals(airlock, h.job_id),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render_show(airlock: Airlock, h: HeldJob, now: float, approvals: str) -> str:
    """``review show``'s text; reads the spool (run it in a thread), not the store."""
    mf = h.manifest
    out = [
        f"job {cut(h.job_id)}: image {cut(h.image)}, datastore {escape(h.datastore)}",
        f"held since {_when(h.held_since)} ({_age(now - h.held_since)} ago); "
        f"refused by default at {_when(airlock.deadline(h))}",
        f"approvals: {approvals}",
        f"{len(mf.files)} file(s), {mf.total_bytes} bytes:",
    ]
    for f in mf.files:
        out.append(f"  {cut(f.path)}  {f.size} bytes  sha256 {f.sha256}")
        p = preview(airlock.spool, mf, f)
        if p.kind == "csv":
            rows = "?" if p.rows is None else str(p.rows)
            out.append(f"    CSV: {rows} row(s); columns: {', '.join(p.columns) or '(none)'}")
        if p.kind in ("binary", "empty", "unreadable"):
            out.append(f"    ({p.kind}: not shown)")
        out.extend(f"    | {line}" for line in p.lines)
    return "\n".join(out)


async def handle_review(airlock: Airlock | None, peer: Peer, request: dict[str, Any]) -> Reply:
    """Answer one ``review_*`` request (see the module doc). Never raises for input."""
    command = request["command"]
    if airlock is None:
        return error_reply("unavailable", "this agent has no airlock")
    now = time.time()
    if command == "review_list":
        return {"ok": True, "message": render_list(airlock, now)}
    job_id = request.get("job_id")
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID:
        return error_reply("bad_request", f"{command.replace('_', ' ')} needs a job id")
    held = airlock.get(job_id)
    if held is None:
        return error_reply("not_held", f"job {cut(job_id, 60)} is not held for review")
    if command == "review_show":
        message = await asyncio.to_thread(
            render_show, airlock, held, now, _approvals(airlock, job_id)
        )
        return {"ok": True, "message": message}
    why = request.get("why")
    if command == "review_refuse" and (not isinstance(why, str) or not why.strip()):
        return error_reply("bad_request", "review refuse needs --why TEXT")
    if isinstance(why, str) and len(why) > MAX_WHY:
        return error_reply("bad_request", f"--why is at most {MAX_WHY} characters")
    return await _decide(
        airlock, peer, held, "release" if command == "review_release" else "refuse", why
    )


async def _decide(airlock: Airlock, peer: Peer, held: HeldJob, decision: str, why: object) -> Reply:
    job_id, reviewer = held.job_id, str(peer.uid)
    already = any(
        v.reviewer == reviewer and v.decision == decision for v in airlock.store.votes(job_id)
    )
    if decision == "release" and already:
        return {
            "ok": True,
            "message": f"uid {peer.uid} had already released it (counted once); "
            f"approvals {_approvals(airlock, job_id)}",
        }
    kind = "result_approved" if decision == "release" else "result_refused"
    text = why if isinstance(why, str) else ""
    if airlock.audit is not None:
        try:
            await asyncio.to_thread(
                airlock.audit.append, kind, job_id, reviewer=peer.uid, pid=peer.pid, text=text
            )
        except (AgentError, OSError) as exc:
            log.error("review_not_recorded", job_id=job_id, error=str(exc))
            return error_reply("not_recorded", f"the audit ledger cannot record it: {exc}")
    airlock.vote(job_id, reviewer, "release" if decision == "release" else "refuse")
    log.info("review_decision", job_id=job_id, uid=peer.uid, decision=decision)
    if decision == "refuse":
        return {
            "ok": True,
            "message": f"refused: {cut(job_id, 60)} ends result_refused; its results are deleted",
        }
    if airlock.outcome(airlock.store.votes(job_id)) == "release":
        return {"ok": True, "message": f"released: {cut(job_id, 60)} is uploading its results"}
    return {
        "ok": True,
        "message": f"approval recorded ({_approvals(airlock, job_id)}); "
        "another operator must release it too",
    }
