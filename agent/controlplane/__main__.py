"""``python -m agent.controlplane``: run the reference control plane in the foreground.

The token file holds one token per line, optionally followed by the ``node_id`` it
may use (default ``*``, any); blank lines and ``#`` comments are skipped. The URL to
put in the agent's ``control_plane.url`` is printed on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from pathlib import Path

from agent import logs
from agent.controlplane.auth import ANY_NODE
from agent.controlplane.server import ControlPlane


def read_tokens(path: Path) -> dict[str, str]:
    """``token -> node_id`` from a token file. Raises ``OSError``/``ValueError``."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            # Never quote the line: it holds a token.
            raise ValueError(f"{path}:{number}: expected 'TOKEN [NODE_ID]'")
        tokens[words[0]] = words[1] if len(words) == 2 else ANY_NODE
        logs.redact(words[0])
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.controlplane", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--heartbeat-s", type=float, default=15)
    parser.add_argument("--tls-cert", type=Path, help="serve wss:// with this PEM chain")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    args = parser.parse_args(argv)
    logs.configure("info", args.log_format)
    try:
        tokens = read_tokens(args.token_file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 78
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    cp = ControlPlane(tokens, args.host, args.port, heartbeat_s=args.heartbeat_s, ssl=context)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(cp))
    return 0


async def _serve(cp: ControlPlane) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with cp:
        print(cp.url, flush=True)
        await stop.wait()


if __name__ == "__main__":
    sys.exit(main())
