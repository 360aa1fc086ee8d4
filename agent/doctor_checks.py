"""The checks of ``cloudbender-agent doctor``, one function each (``agent.doctor`` runs them).

Each returns :class:`Check` values and never raises for what it finds: a check that
cannot be made is a finding too. No check prints the token or any of its characters.
"""

from __future__ import annotations

import asyncio
import grp
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from agent import __version__
from agent.config import ControlPlaneConfig, DatastoreConfig
from agent.datastore_access import check_readable, describe, fix_command, parse_job_user
from agent.hostinfo import free_mib
from agent.runtime.base import RuntimeInfo
from agent.tls_expiry import expiring, when

Mark = Literal["ok", "fail", "warn", "skip"]
CONTROL_PLANE_TIMEOUT_S = 5.0  # a person is waiting; the daemon's own dial allows 15 s
NVIDIA_PCI_VENDOR = "0x10de"


@dataclass(frozen=True)
class Check:
    """One line of the report: ``fail`` makes ``doctor`` exit non-zero; ``fix`` says how."""

    mark: Mark
    what: str
    fix: str | None = None


def token_file(path: Path) -> Check:
    """The token file is a regular file, owner-only (0600 or stricter), owned by root.

    Takes the path alone, not the section: doctor checks the path written in the YAML
    even when the ``control_plane`` section does not validate (a 0644 mode is the usual
    reason it does not)."""
    try:
        st = path.stat()
    except OSError as exc:
        return Check("fail", f"token file {path}: {exc.strerror}", "write the token there")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return Check("fail", f"token file {path} is not a regular file", "write the token there")
    if mode & 0o077:
        return Check(
            "fail",
            f"token file {path} has mode {mode:04o}: others on this machine can read it",
            f"chmod 600 {path}",
        )
    if st.st_uid != 0:
        return Check(
            "warn",
            f"token file {path} has mode {mode:04o} but uid {st.st_uid} owns it",
            f"chown root: {path}",
        )
    return Check("ok", f"token file {path} has mode {mode:04o}, owned by root")


def control_group(group: str) -> Check:
    """Whether ``control.group`` exists: without it only root may drain or cancel. A
    ``⚠``, not a ``✗``: a node that root alone runs needs no group."""
    try:
        grp.getgrnam(group)
    except KeyError:
        return Check(
            "warn",
            f"control group {group} does not exist: only root may use drain, undrain, "
            "cancel and reconnect",
            f"groupadd --system {group}, then usermod -aG {group} NAME",
        )
    return Check("ok", f"control group {group} exists: its members may use the controls")


def free_space(state_dir: Path, min_free_mib: int) -> Check:
    """Free space where the state directory is (or will be) against ``limits.min_free_mib``."""
    free = free_mib(state_dir)
    where = f"state directory {state_dir}" + ("" if state_dir.exists() else " (not created yet)")
    if free is None:
        return Check("fail", f"{where}: free space cannot be read", "check the mount")
    if free < min_free_mib:
        return Check(
            "fail",
            f"{where}: {free} MiB free, under limits.min_free_mib ({min_free_mib}): "
            "new jobs are refused no_space",
            "free space on that file system, or lower limits.min_free_mib",
        )
    return Check("ok", f"{where}: {free} MiB free (floor {min_free_mib} MiB)")


def datastores(stores: tuple[DatastoreConfig, ...], job_user: str) -> list[Check]:
    """Each datastore walked as the job user (``agent.datastore_access``)."""
    if not stores:
        return [Check("warn", "no datastores configured: jobs get an empty /opt/data")]
    uid, _ = parse_job_user(job_user)
    checks = []
    for store in stores:
        found = check_readable(store.path, job_user)
        line = describe(store.name, store.path, found, job_user)
        if found.ok:
            checks.append(Check("ok", line))
        elif not found.checked:
            checks.append(Check("warn", line, "run doctor as root"))
        else:
            checks.append(Check("fail", line, fix_command(store.path, uid)))
    return checks


def engine(info: RuntimeInfo, docker_host: str) -> Check:
    """The engine answers (``DockerRuntime.info``), and its version."""
    if not info.reachable:
        return Check(
            "fail",
            f"the Docker engine does not answer on {docker_host}: {info.error}",
            "start it (systemctl start docker), or set runtime.docker_host",
        )
    return Check("ok", f"Docker engine {info.version} answers on {docker_host}")


def nvidia_on_pci_bus(root: Path = Path("/sys/bus/pci/devices")) -> int:
    """How many NVIDIA display/3D controllers the PCI bus shows, without the driver."""
    count = 0
    try:
        devices = list(root.iterdir())
    except OSError:
        return 0
    for device in devices:
        try:
            vendor = (device / "vendor").read_text().strip()
            klass = (device / "class").read_text().strip()
        except OSError:
            continue
        count += vendor == NVIDIA_PCI_VENDOR and klass.startswith("0x03")
    return count


def gpu_runtime(gpus_by_nvml: int, nvml_reason: str | None, info: RuntimeInfo) -> Check:
    """GPUs (NVML's, else the PCI bus's) need the engine's NVIDIA support."""
    on_bus = nvidia_on_pci_bus()
    if nvml_reason is not None and on_bus:
        return Check(
            "fail",
            f"{on_bus} NVIDIA GPU(s) on the PCI bus, but NVML cannot be used: {nvml_reason}",
            "install or load the NVIDIA driver (nvidia-smi must work)",
        )
    if gpus_by_nvml == 0 and not on_bus:
        path = f" (the engine: {_gpu_path(info)})" if info.reachable else ""
        return Check("ok", f"no NVIDIA GPU on this machine: no GPU runtime needed{path}")
    if not info.reachable:
        return Check("fail", "GPUs present; the engine's GPU support is unknown (no engine)")
    if not info.gpu_support:
        return Check(
            "fail",
            f"{max(gpus_by_nvml, on_bus)} GPU(s), but the Docker engine {_gpu_path(info)}",
            "see docs/gpus.md: install the NVIDIA container toolkit (CDI spec, or the "
            'hook with mode = "auto") and restart docker',
        )
    return Check("ok", f"{gpus_by_nvml} GPU(s), {_gpu_path(info)}")


def _gpu_path(info: RuntimeInfo) -> str:
    # agent.runtime.gpupath's words: the path GPU jobs take and why, or why none.
    if info.gpu_path is None:
        return f"cannot give GPUs: {info.gpu_why or 'no NVIDIA support'}"
    return f"gives GPUs through {info.gpu_path}: {info.gpu_why}"


def control_plane(cp: ControlPlaneConfig | None) -> Check:
    """One dial through ``agent.connection.dial``: TCP, TLS, the upgrade with the token.

    No ``hello`` is sent: on a node whose agent runs, a session of doctor's would
    replace the agent's (4409). So whether the token may use this ``node.id``
    (checked at ``hello``) is not checked, and the line says so.
    """
    if cp is None:
        return Check("warn", "no control_plane configured: this node will never get a job")
    try:
        failure = asyncio.run(_probe(cp))
    except Exception as exc:  # a bug of ours must not hide the other lines
        failure = f"doctor could not dial ({type(exc).__name__})"
    if failure is not None:
        return Check(
            "fail",
            f"control plane {cp.url}: {failure}",
            "check control_plane.url, the network path and the token with the provider",
        )
    return Check(
        "ok",
        f"control plane {cp.url} answers and accepts the token "
        "(node id not checked: that needs a session)",
    )


async def _probe(cp: ControlPlaneConfig) -> str | None:
    from agent.connection import dial
    from agent.protocol import SUBPROTOCOL
    from agent.protocol.retry import Cause, Ended, classify

    try:
        ws = await dial(
            cp, f"cloudbender-agent/{__version__} doctor", open_timeout_s=CONTROL_PLANE_TIMEOUT_S
        )
    except Ended as exc:
        words = classify(exc.cause, http_status=exc.http_status).words
        return words + (f": {exc.detail}" if exc.detail else "")
    try:
        if ws.subprotocol != SUBPROTOCOL:
            words = classify(Cause.NO_SUBPROTOCOL).words
            return f"{words} (not a cloudbender control plane, or a proxy in the way)"
        return None
    finally:
        await ws.close(1000, "doctor: upgrade check only")


def certificate_expiry(cp: ControlPlaneConfig | None) -> list[Check]:
    """A line per ``control_plane`` certificate that expires within 14 days (``⚠``) or
    has expired (``✗``); one ``✓`` line when TLS files are set and none does."""
    if cp is None or (cp.ca_file is None and cp.client_cert is None):
        return []
    now = datetime.now(UTC)
    found = expiring(cp, now)
    if not found:
        return [Check("ok", "control_plane certificates: none expires within 14 days")]
    return [
        Check(
            "fail" if end <= now else "warn",
            f"control_plane.{key}: {when(path, end, now)}",
            "ask whoever issued it (the provider, your PKI) for a new certificate",
        )
        for key, path, end in found
    ]
