"""``cloudbender-cp``: the command line of the reference control plane.

``serve`` runs the server (agents connect to it over WebSocket) and its local control
channel, a Unix socket only its owner can use (:mod:`agent.controlplane.control`).
The other commands talk to a running server over that socket: ``submit``, ``jobs``,
``watch``, ``cancel``, ``results``, ``nodes``. The only module of the package that
exits; exit statuses: 0 done, 1 failed (a rejected or failed job, a server error),
2 bad usage, 65 an invalid job file (nothing sent), 78 a bad token file or socket path.

An example of the protocol, not a production control plane: it keeps its records
in memory and schedules nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from agent import logs
from agent.controlplane.auth import ANY_NODE
from agent.controlplane.commands import Commands
from agent.controlplane.control import ControlChannel, ControlChannelError, default_path, request
from agent.controlplane.errors import ControlPlaneError
from agent.controlplane.jobfile import JobFileError, load_job_file, model_path
from agent.controlplane.mtls import server_context
from agent.controlplane.server import ControlPlane

EXIT_FAILED, EXIT_DATAERR, EXIT_CONFIG = 1, 65, 78
NOTICE = (
    "The reference control plane: an example of the cloudbender agent protocol, for "
    "trying the agent and for writing your own control plane. Not a production control "
    "plane: it keeps its records in memory and schedules nothing."
)
SUBCOMMANDS = ("serve", "submit", "jobs", "watch", "cancel", "results", "nodes")


def read_tokens(path: Path, node: str = ANY_NODE) -> dict[str, str]:
    """``token -> node_id`` from a token file: ``TOKEN [NODE_ID]`` a line, ``#`` comments.

    A line without a node id gets ``node`` (default ``*``, any). Raises ``OSError``,
    ``ValueError``; no text raised quotes a token.
    """
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            # Never quote the line: it holds a token.
            raise ValueError(f"{path}:{number}: expected 'TOKEN [NODE_ID]'")
        if len(words) == 2 and node != ANY_NODE and words[1] != node:
            raise ValueError(f"{path}:{number}: names another node than --node {node}")
        tokens[words[0]] = words[1] if len(words) == 2 else node
        logs.redact(words[0])
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudbender-cp", description=NOTICE)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    control = argparse.ArgumentParser(add_help=False)
    control.add_argument(
        "--control", type=Path, default=None, metavar="PATH",
        help=f"the server's control socket (default: {default_path()})",
    )  # fmt: skip
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the answer as JSON")

    serve = sub.add_parser("serve", parents=[control], help="run the server", description=NOTICE)
    serve.add_argument("--listen", default=None, metavar="HOST:PORT", help="default 127.0.0.1:8080")
    serve.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)  # before --listen
    serve.add_argument("--port", type=int, default=8080, help=argparse.SUPPRESS)
    serve.add_argument(
        "--token-file", type=Path, action="append", required=True, metavar="FILE",
        help="tokens agents may use, 'TOKEN [NODE_ID]' a line (repeatable)",
    )  # fmt: skip
    serve.add_argument(
        "--node", action="append", default=[], metavar="ID",
        help="the node the token file just before may be used by (one per --token-file)",
    )  # fmt: skip
    serve.add_argument("--results-dir", type=Path, default=Path("cloudbender-cp-results"))
    serve.add_argument("--heartbeat-s", type=float, default=15)
    serve.add_argument("--tls-cert", type=Path, help="serve wss:// with this PEM chain")
    serve.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    serve.add_argument(
        "--client-ca", type=Path,
        help="require client certificates signed by a CA in this PEM; the CN is the node id",
    )  # fmt: skip
    serve.add_argument("--log-format", choices=("console", "json"), default="console")

    submit = sub.add_parser("submit", parents=[control, as_json], help="assign a job file")
    submit.add_argument("job_file", type=Path, metavar="JOBFILE.yaml")
    submit.add_argument("--node", required=True, metavar="ID")
    sub.add_parser("jobs", parents=[control, as_json], help="every job and its state")
    watch = sub.add_parser(
        "watch", parents=[control], help="states as they arrive; exit 0 on succeeded"
    )
    watch.add_argument("--timeout", type=float, default=None, metavar="S")
    cancel = sub.add_parser("cancel", parents=[control, as_json], help="cancel a job")
    results = sub.add_parser("results", parents=[control, as_json], help="a job's result files")
    for one in (watch, cancel, results):
        one.add_argument("job_id", metavar="JOB")
        one.add_argument("--node", default=None, metavar="ID", help="when the id is not unique")
    sub.add_parser("nodes", parents=[control, as_json], help="nodes and their hello")
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `python -m agent.controlplane --token-file F` (no command) predates the commands.
    if args_list and args_list[0].startswith("--") and args_list[0] != "--help":
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    try:
        if args.command == "serve":
            return _serve(args)
        return _client(args)
    except KeyboardInterrupt:
        return 130


# -- serve ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    logs.configure("info", args.log_format)
    host, port = args.host, args.port
    if args.listen:
        host, _, port_text = args.listen.rpartition(":")
        if not host or not port_text.isdigit():
            print(f"error: --listen {args.listen}: expected HOST:PORT", file=sys.stderr)
            return 2
        host, port = host.strip("[]"), int(port_text)
    if args.node and len(args.node) != len(args.token_file):
        print("error: give one --node per --token-file, or none", file=sys.stderr)
        return 2
    tokens: dict[str, str] = {}
    try:
        for index, path in enumerate(args.token_file):
            tokens |= read_tokens(path, args.node[index] if args.node else ANY_NODE)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    context = None
    if args.client_ca and not args.tls_cert:
        print("error: --client-ca needs --tls-cert (mutual TLS is TLS)", file=sys.stderr)
        return EXIT_CONFIG
    if args.tls_cert:
        try:
            context = server_context(args.tls_cert, args.tls_key, args.client_ca)
        except (OSError, ssl.SSLError) as exc:
            print(f"error: TLS files: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    results_dir = args.results_dir.absolute()
    cp = ControlPlane(
        tokens, host, port, heartbeat_s=args.heartbeat_s, ssl=context,
        results_dir=results_dir, auto_ack=True,
    )  # fmt: skip
    control = ControlChannel(args.control or default_path(), Commands(cp).handle)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run(cp, control))
    except ControlChannelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _run(cp: ControlPlane, control: ControlChannel) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The socket first: a path that is taken fails before agents are listened for.
    await control.start()
    try:
        async with cp:
            # The URL first, alone on its line: scripts read it (the agent's control_plane.url).
            print(cp.url, flush=True)
            print(f"control: {control.path}", flush=True)
            print(f"results: {cp.results_dir}", flush=True)
            print(NOTICE, file=sys.stderr, flush=True)
            await stop.wait()
    finally:
        await control.stop()


# -- the client commands ----------------------------------------------------------------


def _client(args: argparse.Namespace) -> int:
    path = args.control or default_path()
    message: dict[str, Any] = {"op": args.command}
    if args.command == "submit":
        try:
            job = load_job_file(args.job_file)
        except JobFileError as exc:
            print(f"error: {exc.path}: invalid job file, nothing sent", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_DATAERR
        body = job.model_dump(exclude_none=True)
        model = model_path(job, args.job_file)
        if model is not None:
            body["model"]["file"] = str(model)
        message |= {"node": args.node, "job": body}
    elif args.command in ("watch", "cancel", "results"):
        message["job_id"] = args.job_id
        if args.node is not None:
            message["node"] = args.node
        if args.command == "watch" and args.timeout is not None:
            message["timeout_s"] = args.timeout
    try:
        # A watch may wait hours between two states; the others answer at once.
        lines = request(path, message, None if args.command == "watch" else 60.0)
        for line in lines:
            if "ok" not in line:
                _print_event(line)
            elif not line["ok"]:
                print(f"error: {line.get('error')}", file=sys.stderr)
                return EXIT_FAILED
            else:
                return _print_answer(args, line)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _print_event(event: dict[str, Any]) -> None:
    ts = event.get("ts")
    when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else ""
    print(f"{when:8}  {_describe(event)}", flush=True)


def _describe(state: dict[str, Any]) -> str:
    extra = [str(state[k]) for k in ("reason",) if state.get(k)]
    if state.get("exit_code") is not None:
        extra.append(f"exit code {state['exit_code']}")
    return str(state["state"]) + (f" ({', '.join(extra)})" if extra else "")


def _print_answer(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
    elif args.command == "submit":
        print(f"job {answer['job_id']} sent to {answer['node']}")
        if answer.get("model"):
            model = answer["model"]
            print(f"model {model['artifact']}: {model['size']} bytes, sha256 {model['sha256']}")
        if answer.get("answer") is None:
            print(f"no answer yet; follow it with: cloudbender-cp watch {answer['job_id']}")
        else:
            print(" ".join(str(answer[k]) for k in ("answer", "code", "detail") if answer.get(k)))
    elif args.command == "watch":
        print(f"{answer['job_id']}: {_describe(answer)}")
        if answer["state"] == "succeeded":
            print(f"its results: cloudbender-cp results {answer['job_id']}")
    elif args.command == "cancel":
        done = "cancel sent" if answer["sent"] else "already ended, nothing sent"
        print(f"{answer['job_id']} on {answer['node']}: {done} ({_describe(answer)})")
    elif args.command == "results":
        print(f"results of {answer['job_id']} from {answer['node']}: {answer['dir']}")
        for f in answer["files"]:
            print(f"  {f['sha256']}  {f['size']:>12}  {f['path']}")
    else:
        _print_table(args.command, answer)
    if args.command == "submit" and answer.get("answer") == "rejected":
        return EXIT_FAILED
    if args.command == "watch" and answer["state"] != "succeeded":
        return EXIT_FAILED
    return 0


def _print_table(command: str, answer: dict[str, Any]) -> None:
    rows: list[tuple[str, ...]]
    if command == "jobs":
        rows = [("JOB", "NODE", "STATE")]
        rows += [(j["job_id"], j["node"], _describe(j)) for j in answer["jobs"]]
    else:
        rows = [("NODE", "CONNECTED", "AGENT", "DATASTORES", "GPUS", "CPUS", "MEMORY_MIB")]
        for n in answer["nodes"]:
            cells = (n["agent_version"], ",".join(map(str, n["datastores"])) or "-")
            sizes = (str(len(n["gpus"])), str(n["cpus"]), str(n["memory_total_mib"]))
            rows.append((n["node_id"], "yes" if n["connected"] else "no", *map(str, cells), *sizes))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
