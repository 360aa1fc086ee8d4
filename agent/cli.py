"""``cloudbender-agent`` commands. The only module that turns errors into exit codes.

Exit codes: 0 success; 1 failure (the daemon stopped on an error, the node is
unhealthy for ``status``, the audit chain is broken or the ledger is unreadable for
``audit``, where a ledger not yet created is 0); 3 no daemon answers (as LSB's "program
is not running"); for ``drain``, ``undrain``, ``cancel``, ``reconnect``, ``review``: 69 no agent
listens on the control socket (EX_UNAVAILABLE), 77 the socket refused the caller
(EX_NOPERM), 1 the agent refused the command (an unknown job);
78 the configuration is invalid, or ``run`` found a state directory it cannot make
private (EX_CONFIG: systemd's RestartPreventExitStatus; a restart would fail the same way);
and 0 too when stdout's reader went away (``| head``): it took what it wanted.

``run`` and ``check-config`` validate the whole config. The local commands read only
what they need (``status``, ``jobs``: ``health``; ``gpus``: ``gpus``; ``audit``:
``state_dir``): a problem elsewhere is a note on stderr, a problem there exits 78.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.cliparser import build_parser
from agent.config import Config, default_config_path, load_config
from agent.config.loading import load_sections
from agent.control.client import ControlError
from agent.errors import ConfigError, DaemonUnreachable, StateDirError

EX_OK, EX_FAIL, EX_NOT_RUNNING, EX_CONFIG = 0, 1, 3, 78


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
    from agent.journal_stderr import install

    install()  # under systemd, `journalctl -p err` must see the lines printed below
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "doctor":
            return _doctor(args.config, args.unit)
        if args.command == "gpus":
            return _gpus(args.config, as_json=args.json)
        if args.command == "status":
            return _status(args.config, args.address, as_json=args.json, watch_s=args.watch)
        if args.command == "jobs" and (args.all or args.state or args.since):
            return _jobs_all(args.config, args.state, args.since, as_json=args.json)
        if args.command == "jobs":
            return _jobs(args.config, args.address, as_json=args.json)
        if args.command == "logs":
            return _logs(args.config, args.job, args.tail)
        if args.command in ("drain", "undrain", "cancel", "reconnect"):
            return _control(args.config, args.command, getattr(args, "job", None))
        if args.command == "review":  # agent.airlock.review
            job, why = getattr(args, "job", None), getattr(args, "why", None)
            return _control(args.config, f"review_{args.action}", job, why=why)
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
    except ControlError as exc:  # 77 refused, 69 no agent, 1 the agent said no
        print(f"cloudbender-agent {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
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
    from agent.gpu.nvml import NvmlBackend
    from agent.runtime.docker import DockerRuntime
    from agent.service import serve

    return serve(
        config,
        gpu=NvmlBackend(watch_xids=True),
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
    _warn_unreadable_datastores(config)
    _warn_host_limits(config)
    return EX_OK


def _warn_host_limits(config: Config) -> None:
    # Settings this machine will not honour as written (issue 12, check-config slice):
    # warnings, so the exit code stays 0; `run` logs the same ones.
    from agent.config.host_warnings import host_warnings

    for line in host_warnings(config):
        print(f"warning: {line}", file=sys.stderr)


def _warn_unreadable_datastores(config: Config) -> None:
    # A warning, not a problem: the exit code stays 0. A file the job user cannot read
    # is skipped by the job, which then "succeeds" on part of the data.
    from agent.datastore_access import check_readable, describe

    for store in config.datastores:
        found = check_readable(store.path, config.runtime.job_user)
        if found.checked and not found.ok:
            line = describe(store.name, store.path, found, config.runtime.job_user)
            print(f"warning: {line} (run `cloudbender-agent doctor` for the fix)", file=sys.stderr)


def _doctor(path: Path | None, unit: Path | None) -> int:
    from agent.doctor import run_doctor
    from agent.logs import configure

    configure(level="warning", fmt="console", stream=sys.stderr)  # the report is stdout's
    return EX_OK if run_doctor(path, sys.stdout, unit=unit) else EX_FAIL


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
    import time

    from agent.historycmd import recent_rows
    from agent.jobs.store import StoreError, read_history, store_path
    from agent.statuscmd import fetch_status, render_jobs

    jobs = fetch_status(_health_address(path, address)).get("jobs") or []
    # The daemon shows jobs until their job.ack; the store adds those acknowledged in
    # the last hour, so a failure does not vanish the moment the control plane saw it.
    now = time.time()
    state_dir = _local_config(path, ["state_dir"], unreadable_ok=True).state_dir
    try:
        records = read_history(store_path(state_dir), since=now - 3600)
        jobs += recent_rows(records, {str(j.get("job_id")) for j in jobs}, now)
    except StoreError:
        print("note: jobs acknowledged by the control plane: `jobs --all` as root", file=sys.stderr)
    print(json.dumps(jobs, indent=2, sort_keys=True) if as_json else render_jobs(jobs))
    return EX_OK


def _jobs_all(path: Path | None, state: str | None, since: str | None, *, as_json: bool) -> int:
    import time

    from agent.audit import AuditError, ledger_path
    from agent.historycmd import bytes_sent, history_row, parse_since, render_history
    from agent.jobs.store import StoreError, read_history, store_path

    state_dir = _local_config(path, ["state_dir"]).state_dir
    now = time.time()
    try:
        after = parse_since(since, now) if since is not None else None
    except ValueError as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_FAIL
    try:
        records = read_history(store_path(state_dir), since=after, state=state)
        sent = bytes_sent(ledger_path(state_dir))
    except (StoreError, AuditError) as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_FAIL
    except OSError as exc:
        print(f"cloudbender-agent: {exc}", file=sys.stderr)
        return EX_FAIL
    rows = [history_row(r, sent, now) for r in records]
    print(json.dumps(rows, indent=2, sort_keys=True) if as_json else render_history(rows))
    return EX_OK


def _logs(path: Path | None, job: str, tail: int | None) -> int:
    from agent.jobs.joblogs import logs_dir, read_log, render_log
    from agent.paths import UnsafeName

    state_dir = _local_config(path, ["state_dir"]).state_dir
    try:
        data = read_log(logs_dir(state_dir), job)
    except (OSError, UnsafeName) as exc:
        print(f"cloudbender-agent: cannot read the log of that job: {exc}", file=sys.stderr)
        return EX_FAIL
    if data is None:
        print(
            "cloudbender-agent: no log kept for that job (it never had a container, has not "
            "ended yet, or was forgotten after 7 days or results.retention_h)",
            file=sys.stderr,
        )
        return EX_FAIL
    for line in render_log(data, tail):
        print(line)
    return EX_OK


def _control(path: Path | None, command: str, job_id: str | None, **extra: str | None) -> int:
    from agent.control.client import send

    # Lenient: an operator in the group usually cannot read the root-only config, and the
    # defaults name the socket the unit makes.
    control = _local_config(path, ["control"], unreadable_ok=True).control
    print(send(control.socket, command, job_id, group=control.group, **extra))
    return EX_OK


def _status(
    path: Path | None, address: str | None, *, as_json: bool, watch_s: float | None = None
) -> int:
    from agent.statuscmd import fetch_status, render_status

    if watch_s is not None:
        from agent.statuswatch import watch

        where = _health_address(path, address)
        show = (lambda d: json.dumps(d, indent=2, sort_keys=True)) if as_json else render_status
        watch(lambda: fetch_status(where), show, watch_s, sys.stdout)
        return EX_OK  # Ctrl-C is how a watch ends
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
