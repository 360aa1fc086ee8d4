"""``cloudbender-agent audit``: the egress ledger, for a person or a script.

Rendering only; reading and checking the chain are :mod:`agent.audit`'s, exit codes are
:mod:`agent.cli`'s. Every line for a person passes through
:func:`agent.escaping.escape` as a whole: image refs, job ids, result paths and reasons
were chosen by a provider, a control plane or a job, and an escape sequence in one of
them must not move the cursor over the line above (``--json`` is escaped by JSON).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.audit import VerifyResult, read, verify
from agent.escaping import escape

_COMMON = frozenset({"seq", "ts", "kind", "job_id", "prev"})


def _when(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "?" * 20
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(digest: object, keep: int = 12) -> str:
    """``sha256:0123456789ab…`` (a prefix is enough for a person to match by eye)."""
    if not isinstance(digest, str):
        return "—"
    algo, _, hexpart = digest.rpartition(":")
    return f"{algo or 'sha256'}:{hexpart[:keep]}…" if len(hexpart) > keep else digest


def _size(n: object) -> str:
    # Exact bytes: this is a record of egress, not a dashboard.
    return f"{n} bytes" if isinstance(n, int) else "? bytes"


def _assigned(e: Mapping[str, Any]) -> str:
    image = e.get("image_ref")
    if e.get("image_digest"):
        image = f"{image} ({_short(e['image_digest'])})"
    model = _short(e["model_sha256"]) if e.get("model_sha256") else "none"
    return f"image {image}, model {model}, datastore {e.get('datastore') or 'none'}"


def _started(e: Mapping[str, Any]) -> str:
    iso = e.get("isolation") or {}
    hc = iso.get("host_config") or {}
    mounts = ", ".join(
        f"{m.get('target')}:{'rw' if m.get('rw') else 'ro'}" for m in iso.get("mounts") or []
    )
    return (
        f"container {str(e.get('container_id'))[:12]}, network {hc.get('NetworkMode')}, "
        f"user {iso.get('user')}, read-only rootfs {hc.get('ReadonlyRootfs')}, "
        f"cap_drop {hc.get('CapDrop')}, mounts [{mounts}]"
    )


def _sent(e: Mapping[str, Any]) -> str:
    return f"{e.get('path')} {_size(e.get('size'))} {_short(e.get('sha256'))}"


def _resent(e: Mapping[str, Any]) -> str:
    start, end = e.get("start"), e.get("end")
    if not isinstance(start, int) or not isinstance(end, int):
        return f"{e.get('path')} bytes ? again ({e.get('why')})"
    return f"{e.get('path')} bytes {start}-{end - 1} again, {_size(end - start)} ({e.get('why')})"


def _accepted(e: Mapping[str, Any]) -> str:
    return f"{e.get('files')} file(s), {_size(e.get('total_bytes'))}"


def _ended(e: Mapping[str, Any]) -> str:
    text = str(e.get("state"))
    if e.get("reason"):
        text += f" ({e['reason']})"
    if e.get("exit_code") is not None:
        text += f", exit code {e['exit_code']}"
    return text


def _operator(e: Mapping[str, Any]) -> str:
    # Who did what on the node: the uid the control socket's kernel check saw.
    return f"{e.get('command')} by uid {e.get('uid')} (pid {e.get('pid')})"


def _other(e: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(e.items()) if k not in _COMMON
    )


def _held(e: Mapping[str, Any]) -> str:
    # The airlock (docs/airlock.md): what waited for review, file by file.
    found = e.get("files")
    files: list[Any] = found if isinstance(found, list) else []
    listed = ", ".join(
        f"{f.get('path')} ({_size(f.get('size'))}, sha256 {_short(f.get('sha256'))})"
        for f in files
        if isinstance(f, dict)
    )
    return f"held for review: {len(files)} file(s), {_size(e.get('total_bytes'))}: {listed}"


def _reviewer(e: Mapping[str, Any]) -> str:
    who = e.get("reviewer")
    who = f"uid {who} (pid {e.get('pid')})" if isinstance(who, int) else str(who)
    text = e.get("text")
    return who + (f": {text}" if text else "")


def _released(e: Mapping[str, Any]) -> str:
    found = e.get("reviewers")
    reviewers: list[Any] = found if isinstance(found, list) else []
    return "released by " + ", ".join(f"uid {r}" if str(r).isdigit() else str(r) for r in reviewers)


_FACTS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "result_held": _held,
    "result_approved": lambda e: "approved by " + _reviewer(e),
    "result_refused": lambda e: "refused by " + _reviewer(e),
    "result_released": _released,
    "review_command_undecided": lambda e: f"review_command undecided: {e.get('why')}",
    "job_assigned": _assigned,
    "container_started": _started,
    "result_file_sent": _sent,
    "result_range_resent": _resent,
    "result_accepted": _accepted,
    "job_ended": _ended,
    "operator_action": _operator,
}


class Egress:
    """What left the site for one job, added up from its entries as they stream by.

    Each file counts once, at its size, however many ``result_file_sent`` an agent
    older than ``result_range_resent`` wrote for it; ``result_range_resent`` ranges
    count apart, as bytes sent again. Their sum is what left, at most (docs/audit.md).
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, object]] = {}
        self._records: dict[str, int] = {}
        self._again: dict[str, list[tuple[int, int, object]]] = {}

    def add(self, entry: Mapping[str, Any]) -> None:
        path = str(entry.get("path"))
        if entry.get("kind") == "result_file_sent" and isinstance(entry.get("size"), int):
            self._files.setdefault(path, (entry["size"], entry.get("sha256")))
            self._records[path] = self._records.get(path, 0) + 1
        elif entry.get("kind") == "result_range_resent":
            start, end = entry.get("start"), entry.get("end")
            if isinstance(start, int) and isinstance(end, int) and end > start:
                self._again.setdefault(path, []).append((start, end, entry.get("why")))

    def lines(self, job_id: str) -> list[str]:
        """A blank line, the job's totals, then one line per file (escaped)."""
        once = sum(size for size, _ in self._files.values())
        again = sum(end - start for ranges in self._again.values() for start, end, _ in ranges)
        if not self._files and not again:
            return ["", escape(f"job {job_id}: no result bytes left this site")]
        head = (
            f"job {job_id}: {len(self._files)} result file(s), {_size(once)} sent once, "
            f"{_size(again)} sent again, at most {_size(once + again)} left this site"
        )
        out = ["", escape(head)]
        for path in sorted(self._files.keys() | self._again.keys()):
            size, digest = self._files.get(path, (None, None))
            text = f"  {path}  {_size(size)} {_short(digest)}"
            if self._records.get(path, 0) > 1:
                text += f", recorded {self._records[path]} times by an older agent"
            for start, end, why in self._again.get(path, []):
                text += f"; again bytes {start}-{end - 1} ({why})"
            out.append(escape(text))
        return out


def render_entry(entry: Mapping[str, Any]) -> str:
    """One line: time (UTC), seq, kind, job, and the entry's key facts; printable
    (every control or format character escaped, so nothing in it moves the cursor)."""
    kind = str(entry.get("kind"))
    facts = _FACTS.get(kind, _other)(entry)
    return escape(
        f"{_when(entry.get('ts'))}  #{entry.get('seq'):<5} {kind:<17} "
        f"{entry.get('job_id') or '-'}  {facts}"
    )


def render_entries(entries: Iterable[Mapping[str, Any]], *, as_json: bool) -> Iterable[str]:
    """The lines to print, lazily: JSON lines (canonical, as in the file) or for a person."""
    for entry in entries:
        if as_json:
            yield json.dumps(entry, sort_keys=True, separators=(",", ":"))
        else:
            yield render_entry(entry)


def verify_json(result: VerifyResult) -> str:
    """The outcome of ``--verify`` as one JSON document."""
    return json.dumps(
        {
            "ok": result.ok,
            "entries": result.entries,
            "first_bad_line": result.first_bad_line,
            "problem": result.problem,
            "head": result.head,
        },
        sort_keys=True,
    )


def show(ledger: Path, job_id: str | None, *, as_json: bool) -> None:
    """Print the entries (only ``job_id``'s when given), or say on stderr that there are
    none. With ``job_id`` and not ``as_json``, end with what left for that job
    (:class:`Egress`). Raises :class:`AuditError` or ``OSError`` from :func:`read`."""
    if not ledger.exists():
        print(f"audit ledger {ledger}: no entries yet", file=sys.stderr)
        return
    shown = 0
    # With --job, a person also gets the bytes that left, added up (scripts add up --json).
    egress = Egress() if job_id is not None and not as_json else None
    try:
        for entry in read(ledger, job_id):
            if egress is not None:
                egress.add(entry)
            print(next(iter(render_entries([entry], as_json=as_json))))
            shown += 1
        if egress is not None and shown:
            for line in egress.lines(str(job_id)):
                print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # `audit | head` closed the pipe: not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again (Python docs, "SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if not shown:
        which = f"for job {job_id}" if job_id else "yet"
        print(f"audit ledger {ledger}: no entries {which}", file=sys.stderr)


def check(ledger: Path, anchor: tuple[int, str] | None, *, as_json: bool) -> bool:
    """Verify the chain against ``anchor`` (the job store's ``(seq, head)``, ``None``
    when it has none) and print the outcome: ``OK``/``FAILED`` on stdout, the first bad
    line and why on stderr. ``True`` when intact, or when there is no ledger yet and no
    anchor says there should be one. Raises ``OSError``."""
    if not ledger.exists() and (anchor is None or anchor[0] == 0):
        print(f"audit ledger {ledger}: no ledger yet")
        return True
    result = verify(ledger, anchor)
    if as_json:
        print(verify_json(result))
    elif result.ok:
        print(f"OK: {result.entries} entries, chain intact (head {result.head})")
    else:
        print(f"FAILED: {result.problem}")
    if not result.ok:
        where = f"line {result.first_bad_line}: {result.problem}"
        print(f"audit ledger {ledger}: {where}", file=sys.stderr)
    return result.ok
