"""The argument parser of ``cloudbender-agent``: every command, option and help text.

Kept apart from :mod:`agent.cli`, which dispatches the parsed command and is the only
place that turns errors into exit codes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.jobs.model import State


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudbender-agent",
        description="Node agent for federated inference: runs a provider's model container "
        "next to this site's data and sends back only the result files.",
        epilog="run and check-config validate the whole config and exit 78 on any problem. "
        "The local commands read only what they need (status: health; jobs: health and "
        "state_dir; gpus: gpus; audit, logs: state_dir; drain, undrain, cancel, reconnect: "
        "control), so a problem elsewhere, such as a token file's mode, is a note on "
        "stderr; status, jobs, gpus and the control commands use the defaults when the "
        "file cannot be read.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="config file (default: $CLOUDBENDER_AGENT_CONFIG or "
            "/etc/cloudbender-agent/config.yaml)",
        )
        return p

    with_config(sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)"))
    with_config(
        sub.add_parser("check-config", help="validate the config; exit 78 listing every problem")
    )
    doctor = with_config(
        sub.add_parser(
            "doctor",
            help="preflight: engine, datastores readable by the job user, GPU runtime, disk, "
            "control plane and token, the unit; exit 1 if any check fails",
        )
    )
    doctor.add_argument(
        "--unit",
        type=Path,
        default=None,
        help="the systemd unit to compare with the config (default: the installed one)",
    )
    gpus = with_config(sub.add_parser("gpus", help="this machine's GPUs as NVML reports them"))
    gpus.add_argument("--json", action="store_true", help="machine-readable output")
    status = with_config(sub.add_parser("status", help="ask the running daemon how the node is"))
    status.add_argument("--json", action="store_true", help="the daemon's /status document")
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C, like nvidia-smi -l",
    )
    status.add_argument(
        "--address", metavar="HOST:PORT", help="health server address (default: health.listen)"
    )
    jobs = with_config(
        sub.add_parser(
            "jobs",
            help="the running daemon's jobs, and those acknowledged in the last hour; "
            "--all: every job in the job store (root)",
        )
    )
    jobs.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.add_argument(
        "--all",
        action="store_true",
        help="ended jobs too (kept 7 days, or results.retention_h when longer), read from "
        "the state directory: works with the daemon stopped",
    )
    # An unknown state is refused with the list, never answered "No jobs." (a typo).
    jobs.add_argument(
        "--state",
        metavar="STATE",
        choices=[s.value for s in State],
        help="only jobs in STATE (implies --all): " + ", ".join(s.value for s in State),
    )
    jobs.add_argument(
        "--since",
        metavar="WHEN",
        help="only jobs running at or after WHEN: 30m, 2h, 7d or an ISO 8601 time (implies --all)",
    )
    jobs.add_argument(
        "--address", metavar="HOST:PORT", help="health server address (default: health.listen)"
    )
    logs = with_config(
        sub.add_parser("logs", help="the tail of a job's own stdout/stderr, kept on this node")
    )
    logs.add_argument("job", metavar="JOB", help="the job's id")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    _operator_commands(sub, with_config)
    audit = with_config(sub.add_parser("audit", help="the egress ledger: what left this site"))
    audit.add_argument("--job", metavar="ID", help="only this job's entries")
    audit.add_argument("--json", action="store_true", help="JSON lines, as in the ledger")
    audit.add_argument(
        "--verify",
        action="store_true",
        help="check the hash chain, and that no entry the job store counted is missing; "
        "exit 1 if not",
    )
    audit.add_argument(
        "--reset-anchor",
        action="store_true",
        help="forget the job store's record of the ledger's head, so that the agent starts "
        "a new ledger after one was lost (stop the agent first; see docs/audit.md)",
    )
    demo = sub.add_parser(
        "demo",
        help="run one real inference job end to end on this machine (root, Docker; "
        "see docs/demo.md)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the agent and control plane running until Ctrl-C, to try status, jobs, audit",
    )
    demo.add_argument(
        "--seed", type=int, default=7, help="seed of the synthetic dataset (default: 7)"
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to put everything (default: a new /tmp/cloudbender-demo-* directory)",
    )
    return parser


def _operator_commands(sub: Any, with_config: Callable[[Any], Any]) -> None:
    # Over the control socket (root or control.group); exit 77 when refused, 69 when
    # no agent listens.
    with_config(sub.add_parser("drain", help="stop taking new jobs; running ones finish"))
    with_config(sub.add_parser("undrain", help="take new jobs again after drain"))
    cancel = with_config(sub.add_parser("cancel", help="stop a job on this node now"))
    cancel.add_argument("job", metavar="JOB", help="the job's id")
    with_config(sub.add_parser("reconnect", help="close the control-plane link and redial now"))
    review = sub.add_parser(
        "review", help="the airlock: held results, and releasing or refusing them (docs/airlock.md)"
    )
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    with_config(actions.add_parser("list", help="jobs whose results wait for review"))
    for name, words in (
        ("show", "what a held job would send: its files, hashes and a safe preview"),
        ("release", "approve a held job's results (review_approvals distinct operators)"),
        ("refuse", "refuse a held job's results: the job fails result_refused, they are deleted"),
    ):
        action = with_config(actions.add_parser(name, help=words))
        action.add_argument("job", metavar="JOB", help="the job's id")
    refuse = actions.choices["refuse"]
    refuse.add_argument("--why", required=True, metavar="TEXT", help="why (kept in the ledger)")
