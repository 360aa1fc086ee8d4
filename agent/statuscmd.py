"""``cloudbender-agent status``: fetch the daemon's ``/status`` and show it to a person.

Job ids, image refs, reasons and a control plane's error texts in the document were
chosen by peers: every line shown passes through :func:`agent.escaping.escape` once,
so that none of them can move the cursor or forge a line (``--json`` is escaped by
JSON).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from agent.config import split_host_port
from agent.errors import DaemonUnreachable
from agent.escaping import escape
from agent.health.node_rows import render_node_rows
from agent.health.server import LOOPBACK_HTTP

TIMEOUT_S = 5.0


def fetch_status(address: str) -> dict[str, Any]:
    """GET ``/status`` from the health server at ``HOST:PORT``.

    Raises :class:`DaemonUnreachable` naming the address and the cause when nothing
    answers, or when what answers is not the agent.
    """
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        raise DaemonUnreachable(f"health address {address!r}: {exc}") from exc
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{netloc}/status"
    hint = "is the agent running? (systemctl status cloudbender-agent)"
    try:
        with LOOPBACK_HTTP.open(url, timeout=TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise DaemonUnreachable(f"{url} answered HTTP {exc.code}; {hint}") from exc
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
        raise DaemonUnreachable(f"no daemon answers on {netloc} ({reason}); {hint}") from exc
    except TimeoutError as exc:
        raise DaemonUnreachable(f"no answer from {netloc} within {TIMEOUT_S:.0f} s") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise DaemonUnreachable(f"{url} did not answer with the agent's JSON status") from exc
    if not isinstance(document, dict) or "node_id" not in document:
        raise DaemonUnreachable(f"{url} did not answer with the agent's status")
    return document


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _ago(ts: float | None) -> str:
    return "never" if ts is None else f"{_duration(time.time() - ts)} ago"


def _dash(value: object, unit: str = "") -> str:
    return "—" if value is None else f"{value}{unit}"


def render_status(doc: dict[str, Any]) -> str:
    """A screenful for a person; every fact of the JSON document, none invented."""
    verdict = "healthy" if doc.get("healthy") else "UNHEALTHY"
    lines = [
        f"cloudbender-agent {doc.get('agent_version')} on node {doc.get('node_id')}: "
        f"{verdict} (up {_duration(float(doc.get('uptime_s') or 0))})"
    ]
    for problem in doc.get("problems") or []:
        lines.append(f"  ! {problem.get('detail')}")
    lines.extend(_control_plane_lines(doc.get("control_plane") or {}))
    lines.extend(render_node_rows(doc))
    lines.extend(_gpu_lines(doc.get("gpus") or {}))
    host = doc.get("host") or {}
    if host:
        cpu = host.get("cpu") or {}
        lines.append(
            f"{'Host':<14} {cpu.get('logical')} CPUs ({cpu.get('model') or 'unknown model'}), "
            f"CPU {_dash(host.get('cpu_pct'), '%')}, memory "
            f"{host.get('memory_used_mib')}/{host.get('memory_total_mib')} MiB, "
            f"state dir free {_dash(host.get('state_dir_free_mib'), ' MiB')}"
        )
    stores = doc.get("datastores") or []
    if not stores:
        lines.append(f"{'Datastores':<14} none configured")
    for i, store in enumerate(stores):
        label = "Datastores" if i == 0 else ""
        desc = f"  {store['description']}" if store.get("description") else ""
        lines.append(f"{label:<14} {store.get('name')}{desc}")
    jobs = doc.get("jobs") or []
    lines.append(f"{'Jobs':<14} {len(jobs) or 'none'}")
    lines = [escape(line) for line in lines]  # the jobs table below is escaped already
    if jobs:
        lines.extend("  " + line for line in render_jobs(jobs).splitlines())
    return "\n".join(lines)


def render_jobs(jobs: list[dict[str, Any]]) -> str:
    """A table of jobs: id, state (with reason and exit code), age, GPUs, image; each
    cell escaped before the columns are measured."""
    if not jobs:
        return "No jobs."
    rows: list[tuple[str, ...]] = [("JOB", "STATE", "AGE", "GPUS", "IMAGE")]
    for job in jobs:
        state = str(job.get("state"))
        if job.get("reason"):
            state += f" ({job['reason']}"
            state += f", exit {job['exit_code']})" if job.get("exit_code") is not None else ")"
        gpus = ",".join(str(g)[:12] for g in job.get("gpus") or []) or "—"
        age = _duration(float(job.get("age_s") or 0))
        cells = (str(job.get("job_id")), state, age, gpus, str(job.get("image") or "—"))
        rows.append(tuple(escape(cell) for cell in cells))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]
        for row in rows
    )


def _control_plane_lines(cp: dict[str, Any]) -> list[str]:
    state = str(cp.get("state"))
    if not cp.get("url"):
        return [f"{'Control plane':<14} {state}"]
    since = cp.get("since")
    head = f"{state} since {_ago(since)}" if since else state
    lines = [f"{'Control plane':<14} {head}  {cp['url']}"]
    if cp.get("session_id") and state == "connected":
        lines.append(f"{'':<14} session {cp['session_id']}")
    lines.append(f"{'':<14} last contact {_ago(cp.get('last_contact'))}")
    if cp.get("last_error"):
        lines.append(f"{'':<14} last error: {cp['last_error']}")
    if state != "connected" and cp.get("next_attempt_at"):
        wait = max(float(cp["next_attempt_at"]) - time.time(), 0.0)
        lines.append(
            f"{'':<14} next attempt in {_duration(wait)} (backoff {cp.get('backoff_s')} s, "
            f"{cp.get('attempts')} attempts)"
        )
    return lines


def _gpu_lines(gpus: dict[str, Any]) -> list[str]:
    devices = gpus.get("gpus") or []
    if not devices:
        return [f"{'GPUs':<14} none ({gpus.get('reason') or 'NVML reports no devices'})"]
    lines = []
    for i, gpu in enumerate(devices):
        label = "GPUs" if i == 0 else ""
        lines.append(
            f"{label:<14} {gpu.get('index')}  {gpu.get('name') or '—'}  {gpu.get('health')}"
            f"{'' if gpu.get('allocatable') else ' (not offered to jobs)'}  "
            f"util {_dash(gpu.get('utilization_pct'), '%')}  "
            f"mem {_dash(gpu.get('memory_used_mib'))}/{_dash(gpu.get('memory_total_mib'))} MiB  "
            f"{_dash(gpu.get('temperature_c'), '°C')}  {_dash(gpu.get('power_w'), ' W')}"
        )
    return lines
