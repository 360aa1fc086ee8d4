"""``cloudbender-agent`` commands. The only module that turns errors into exit codes.

Exit codes: 0 success; 1 failure (the daemon stopped on an error, the node is
unhealthy for ``status``, the audit chain is broken or the ledger is unreadable for
``audit``, where a ledger not yet created is 0); 3 no daemon answers (as LSB's "program
is not running");
78 the configuration is invalid, or ``run`` found a state directory it cannot make
private (EX_CONFIG: systemd's RestartPreventExitStatus; a restart would fail the same way);
and 0 too when stdout's reader went away (``| head``): it took what it wanted.

``run`` and ``check-config`` validate the whole config. The local commands read only
what they need (``status``, ``jobs``: ``health``; ``gpus``: ``gpus``; ``audit``:
``state_dir``): a problem elsewhere is a note on stderr, a problem there exits 78.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import Config, default_config_path, load_config
from agent.config.loading import load_sections
from agent.errors import ConfigError, DaemonUnreachable, StateDirError

EX_OK, EX_FAIL, EX_NOT_RUNNING, EX_CONFIG = 0, 1, 3, 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudbender-agent",
        description="Node agent for federated inference: runs a provider's model container "
        "next to this site's data and sends back only the result files.",
        epilog="run and check-config validate the whole config and exit 78 on any problem. "
        "The local commands read only what they need (status, jobs: health; gpus: gpus; "
        "audit: state_dir), so a problem elsewhere, such as a token file's mode, is a note "
        "on stderr; status, jobs and gpus use the defaults when the file cannot be read.",
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
    gpus = with_config(sub.add_parser("gpus", help="this machine's GPUs as NVML reports them"))
    gpus.add_argument("--json", action="store_true", help="machine-readable output")
    status = with_config(sub.add_parser("status", help="ask the running daemon how the node is"))
    status.add_argument("--json", action="store_true", help="the daemon's /status document")
    status.add_argument(
        "--address", metavar="HOST:PORT", help="health server address (default: health.listen)"
    )
    jobs = with_config(sub.add_parser("jobs", help="jobs known to the running daemon"))
    jobs.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.add_argument(
        "--address", metavar="HOST:PORT", help="health server address (default: health.listen)"
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Output piped into ``head`` ends quietly: when the
    reader goes away, the command stops, without a traceback, and exits 0 (the reader
    took what it wanted; 141 would fail a ``set -o pipefail`` script for that)."""
    try:
        try:
            return _main(argv)
        finally:
            # Inside the guard: Python's own flush at exit would print "Exception
            # ignored ... BrokenPipeError" after the command had already returned.
            sys.stdout.flush()
    except BrokenPipeError:
        # Output the reader did not take is dropped; a second flush at exit must not
        # meet the closed pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_OK


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "gpus":
            return _gpus(args.config, as_json=args.json)
        if args.command == "status":
            return _status(args.config, args.address, as_json=args.json)
        if args.command == "jobs":
            return _jobs(args.config, args.address, as_json=args.json)
        if args.command == "audit":
            if args.reset_anchor:
                return _audit_reset_anchor(args.config)
            return _audit(args.config, args.job, as_json=args.json, verify=args.verify)
        if args.command == "demo":
            return _demo(args.workdir, keep=args.keep, seed=args.seed)
    except ConfigError as exc:
        _print_config_problems(args.config, exc)
        return EX_CONFIG
    except StateDirError as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DaemonUnreachable as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_NOT_RUNNING
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees one


def _print_config_problems(path: Path | None, exc: ConfigError) -> None:
    where = path or default_config_path()
    count = len(exc.problems)
    print(
        f"{where}: {count} problem{'s' if count != 1 else ''} in the configuration:",
        file=sys.stderr,
    )
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _run(path: Path | None) -> int:
    config = load_config(path)
    from agent.daemon import serve
    from agent.gpu.nvml import NvmlBackend
    from agent.runtime.docker import DockerRuntime

    return serve(
        config,
        gpu=NvmlBackend(),
        runtime=DockerRuntime(config.runtime.docker_host),
        config_path=path or default_config_path(),
    )


def _check_config(path: Path | None) -> int:
    config = load_config(path)
    where = path or default_config_path()
    cp = "not configured" if config.control_plane is None else config.control_plane.url
    print(
        f"{where}: OK (node {config.node.id}, control plane {cp}, "
        f"{len(config.datastores)} datastore(s))"
    )
    return EX_OK


def _local_config(
    path: Path | None, sections: Sequence[str], *, unreadable_ok: bool = False
) -> Config:
    # Local commands read only the sections they need: a problem elsewhere (a token
    # file with mode 0644) is a note, not a refusal, and never a reason to ask another
    # port or read another ledger. Problems in the sections they need still exit 78.
    config, ignored = load_sections(path, sections, unreadable_ok=unreadable_ok)
    where = str(path or default_config_path())
    if ignored and ignored[0].startswith(where):  # the file itself could not be read
        print(f"note: {ignored[0]}; using the defaults", file=sys.stderr)
    elif ignored:
        more = f" (and {len(ignored) - 1} more)" if len(ignored) > 1 else ""
        print(
            f"note: {where}: {ignored[0]}{more}; only {', '.join(sections)} is read here "
            "(run `cloudbender-agent check-config`)",
            file=sys.stderr,
        )
    return config


def _gpus(path: Path | None, *, as_json: bool) -> int:
    from agent.gpu.base import mark_allocatable
    from agent.gpu.nvml import NvmlBackend
    from agent.gpu.report import inventory_json, render_table

    config = _local_config(path, ["gpus"], unreadable_ok=True)
    backend = NvmlBackend()
    try:
        inventory = backend.snapshot()
    finally:
        backend.close()
    inventory = mark_allocatable(inventory, config.gpus.allow)
    print(inventory_json(inventory) if as_json else render_table(inventory))
    return EX_OK


def _health_address(path: Path | None, address: str | None) -> str:
    if address is not None:
        return address
    return _local_config(path, ["health"], unreadable_ok=True).health.listen


def _jobs(path: Path | None, address: str | None, *, as_json: bool) -> int:
    from agent.statuscmd import fetch_status, render_jobs

    jobs = fetch_status(_health_address(path, address)).get("jobs") or []
    print(json.dumps(jobs, indent=2, sort_keys=True) if as_json else render_jobs(jobs))
    return EX_OK


def _status(path: Path | None, address: str | None, *, as_json: bool) -> int:
    from agent.statuscmd import fetch_status, render_status

    document = fetch_status(_health_address(path, address))
    print(json.dumps(document, indent=2, sort_keys=True) if as_json else render_status(document))
    return EX_OK if document.get("healthy") else EX_FAIL


def _audit(path: Path | None, job: str | None, *, as_json: bool, verify: bool) -> int:
    from agent.audit import AuditError, ledger_path
    from agent.auditcmd import check, show
    from agent.jobs.store import StoreError, read_audit_anchor, store_path

    state_dir = _local_config(path, ["state_dir"]).state_dir
    ledger = ledger_path(state_dir)
    try:
        if verify:
            anchor = read_audit_anchor(store_path(state_dir))
            return EX_OK if check(ledger, anchor, as_json=as_json) else EX_FAIL
        show(ledger, job, as_json=as_json)
    except AuditError as exc:
        print(f"cloudbender-agent: {exc}; run `cloudbender-agent audit --verify`", file=sys.stderr)
        return EX_FAIL
    except StoreError as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_FAIL
    except OSError as exc:
        print(f"cloudbender-agent: cannot read {ledger}: {exc.strerror}", file=sys.stderr)
        return EX_FAIL
    return EX_OK


def _audit_reset_anchor(path: Path | None) -> int:
    from agent.audit import AuditError, AuditLedger, ledger_path
    from agent.jobs.store import AuditAnchor, StoreError, store_path

    state_dir = _local_config(path, ["state_dir"]).state_dir
    ledger = ledger_path(state_dir)
    try:
        # Holding the ledger's lock proves no agent is writing it; opening it without
        # the anchor creates an empty one where the lost one was.
        with AuditLedger(ledger) as writer:
            anchor = AuditAnchor(store_path(state_dir))
            try:
                lost = anchor.forget()
            finally:
                anchor.close()
            seq, _ = writer.head
    except (AuditError, StoreError) as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_FAIL
    if lost is None:
        print("no anchor to reset: the job store held none")
    else:
        print(
            f"anchor reset: the job store had recorded {lost[0]} entries (head {lost[1]}); "
            f"{ledger} has {seq}, and the agent continues from there"
        )
    return EX_OK


def _demo(workdir: Path | None, *, keep: bool, seed: int) -> int:
    try:
        from agent.demo import DemoError
        from agent.demo.run import run_demo
    except ImportError as exc:  # numpy or onnx: the optional `demo` extra
        print(
            f"cloudbender-agent demo: {exc.name} is missing; install the demo extra "
            "(pip install 'cloudbender-agent[demo]') or run `make demo`",
            file=sys.stderr,
        )
        return EX_FAIL
    import tempfile

    from agent.logs import configure

    configure(level="warning", fmt="console", stream=sys.stderr)  # the CP logs in this process
    where = workdir or Path(tempfile.mkdtemp(prefix="cloudbender-demo-"))
    try:
        run_demo(where, seed=seed, keep=keep)
    except DemoError as exc:
        print(
            f"\ncloudbender-agent demo: FAILED: {exc}\n(everything is in {where})", file=sys.stderr
        )
        return EX_FAIL
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
