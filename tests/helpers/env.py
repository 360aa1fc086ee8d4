"""Valid configs on disk, free ports, and the one scaled time constant of the tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import yaml

# Every wait in the tests is a multiple of this; raise it on a slow machine.
TIME_SCALE = float(os.environ.get("CLOUDBENDER_TEST_TIME_SCALE", "1.0"))


def seconds(n: float) -> float:
    return n * TIME_SCALE


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def valid_config(tmp_path: Path, *, control_plane: bool = True) -> dict[str, Any]:
    """A config dict that validates: real datastore dir, 0600 token file, free port."""
    data_dir = tmp_path / "data" / "vitals"
    data_dir.mkdir(parents=True, exist_ok=True)
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-for-tests-0123456789\n")
    token.chmod(0o600)
    config: dict[str, Any] = {
        "node": {"id": "test-node", "labels": {"site": "test"}},
        "state_dir": str(tmp_path / "state"),
        "datastores": [{"name": "vitals", "path": str(data_dir), "description": "ICU vitals"}],
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        # Each daemon its own control socket (a Unix socket path is at most 107 bytes).
        "control": {"socket": str(tmp_path / "control.sock")},
        "logging": {"level": "info", "format": "json"},
    }
    if len(str(tmp_path / "control.sock")) > 100:
        del config["control"]  # the default's directory is missing outside the unit
    if control_plane:
        # A loopback port where nothing listens: a daemon started with it never leaves the machine.
        url = f"wss://127.0.0.1:{free_port()}/agent/v1"
        config["control_plane"] = {"url": url, "token_file": str(token)}
    return config


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
