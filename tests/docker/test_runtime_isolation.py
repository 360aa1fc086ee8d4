"""Job containers on the real engine are isolated as SECURITY.md §1 and §2 say.

The acceptance test reads a *running* job container back with the plain SDK (not with
the agent's own checker) and checks every row of the §1 table, then checks from inside
the container that the settings took effect. The egress test is §2: listeners on the
host's loopback and on the docker bridge gateway see no connection from a job that
tries both, while the same commands on the default bridge do reach the host.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from agent.errors import InvalidContainerSpec
from agent.runtime.base import ContainerSpec
from agent.runtime.docker import DockerRuntime
from agent.runtime.verify import verify_attrs
from tests.docker.conftest import JOB_UID, JobDirs, bridge_gateway
from tests.helpers.env import seconds

pytestmark = pytest.mark.docker

MIB = 1024 * 1024
SpecFactory = Callable[..., ContainerSpec]

PROBE = """
o=/opt/output/probe.txt
{
  echo "uid=$(id -u) gid=$(id -g)"
  grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
  echo "nofile=$(ulimit -n) core=$(ulimit -c)"
  echo "links=$(ls /sys/class/net | tr '\\n' ' ')"
  echo "pid1=$(cat /proc/1/comm)"
  echo "devices=$(ls /dev | tr '\\n' ' ')"
  touch /etc/x 2>/dev/null && echo rootfs=rw || echo rootfs=ro
  touch /opt/data/x 2>/dev/null && echo data=rw || echo data=ro
  touch /opt/model/x 2>/dev/null && echo model=rw || echo model=ro
  echo hi > /tmp/x && echo tmp=rw || echo tmp=ro
  cp /bin/busybox /tmp/bb && /tmp/bb true 2>/dev/null && echo tmpexec=yes || echo tmpexec=no
  echo "datafile=$(head -n 1 /opt/data/vitals.csv)"
  echo "env=$DATA_DIR,$OUTPUT_DIR,$MODEL_DIR,$JOB_ID,$NVIDIA_VISIBLE_DEVICES,$BATCH_SIZE"
  echo ready
} > $o 2>&1
exec sleep 600
"""


@pytest.fixture
def started(runtime: DockerRuntime) -> Iterator[Callable[[ContainerSpec], str]]:
    """Create (verified) and start a job container; removed afterwards in any case."""
    ids: list[str] = []

    def start(spec: ContainerSpec) -> str:
        cid = runtime.create(spec)
        ids.append(cid)
        runtime.start(cid)
        return cid

    try:
        yield start
    finally:
        for cid in ids:
            runtime.remove(cid)


def _wait_for_line(path: Path, line: str, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return path.read_text().splitlines()
        time.sleep(0.05)
    raise AssertionError(f"{path} never got {line!r}: {path.read_text() if path.exists() else '-'}")


def test_a_running_job_container_passes_every_row_of_the_checklist(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    job_spec: SpecFactory,
    job_dirs: JobDirs,
    started: Callable[[ContainerSpec], str],
) -> None:
    spec = job_spec(PROBE, env={"BATCH_SIZE": "64"})
    cid = started(spec)
    probe = _wait_for_line(job_dirs.output / "probe.txt", "ready", seconds(30))
    attrs = docker_client.api.inspect_container(cid)
    hc, cfg = attrs["HostConfig"], attrs["Config"]

    assert attrs["State"]["Running"] is True
    # no network (5.10)
    assert hc["NetworkMode"] == "none"
    assert set(attrs["NetworkSettings"]["Networks"]) == {"none"}
    # read-only root fs (5.13)
    assert hc["ReadonlyRootfs"] is True
    # no capabilities (5.4)
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    # no privilege gain (5.26) and the default seccomp profile (5.22)
    assert "no-new-privileges:true" in hc["SecurityOpt"]
    assert not any("unconfined" in opt or "seccomp" in opt for opt in hc["SecurityOpt"])
    # process limit (5.29)
    assert hc["PidsLimit"] == spec.pids > 0
    # memory, no swap (5.11)
    assert hc["Memory"] == 64 * MIB and hc["MemorySwap"] == hc["Memory"]
    # CPU (5.12)
    assert hc["NanoCpus"] == 500_000_000
    # non-root (4.1)
    assert cfg["User"] == f"{JOB_UID}:{JOB_UID}"
    # scratch
    assert hc["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size=16m,uid={JOB_UID},gid={JOB_UID}"}
    # mounts (5.6, 5.20): three binds, data and model read-only, rprivate, nothing else
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert set(mounts) == {"/opt/data", "/opt/model", "/opt/output"}
    assert {t: m["RW"] for t, m in mounts.items()} == {
        "/opt/data": False,
        "/opt/model": False,
        "/opt/output": True,
    }
    assert all(m["Type"] == "bind" and m["Propagation"] == "rprivate" for m in mounts.values())
    assert mounts["/opt/data"]["Source"] == str(job_dirs.data)
    assert not any("docker.sock" in m["Source"] for m in mounts.values())
    assert not hc["Binds"] and not hc["VolumesFrom"]
    # ulimits (5.19)
    assert sorted((u["Name"], u["Soft"], u["Hard"]) for u in hc["Ulimits"]) == [
        ("core", 0, 0),
        ("nofile", 1024, 1024),
    ]
    # private IPC (5.17)
    assert hc["IpcMode"] == "private" and hc["ShmSize"] == 64 * MIB
    # no host namespaces (5.16, 5.21, 5.31)
    assert hc["PidMode"] == hc["UTSMode"] == hc["UsernsMode"] == ""
    assert hc["CgroupnsMode"] == "private"
    # not privileged, no raw devices (5.5, 5.18)
    assert hc["Privileged"] is False and not hc["Devices"] and not hc["DeviceCgroupRules"]
    # only the leased GPUs: none leased, none requested, and the NVIDIA runtime told so
    assert not hc["DeviceRequests"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in cfg["Env"]
    # bounded logs
    assert hc["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}
    # no restart (5.15)
    assert hc["RestartPolicy"]["Name"] == "no"
    # init
    assert hc["Init"] is True
    # runtime
    assert hc["Runtime"] == "runc"
    # and the agent's own checker agrees with the engine
    assert verify_attrs(spec, attrs) == []

    # What the job sees: the settings are in force, not merely recorded.
    assert "uid=65534 gid=65534" in probe
    assert "CapEff:\t0000000000000000" in probe and "CapBnd:\t0000000000000000" in probe
    assert "NoNewPrivs:\t1" in probe
    assert "Seccomp:\t2" in probe  # filter mode: the default profile applies
    assert "nofile=1024 core=0" in probe
    assert "links=lo " in probe  # loopback only
    assert "pid1=docker-init" in probe
    devices = next(line for line in probe if line.startswith("devices=")).split("=", 1)[1].split()
    assert not [d for d in devices if d.startswith(("nvidia", "sd", "nvme", "vd", "kmsg", "mem"))]
    for line in ("rootfs=ro", "data=ro", "model=ro", "tmp=rw", "tmpexec=no", "datafile=hr,spo2"):
        assert line in probe
    assert "env=/opt/data,/opt/output,/opt/model,j-1,void,64" in probe

    # A host-side look that does not trust the container: its network namespace has lo only.
    pid = attrs["State"]["Pid"]
    links = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]

    runtime.stop(cid, grace_s=seconds(5))
    assert runtime.inspect(cid).running is False  # type: ignore[union-attr]


class Listener:
    """A TCP listener on the host that records who connected."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _egress_script(loopback: Listener, bridge: Listener) -> str:
    return (
        f"nc -w 2 127.0.0.1 {loopback.port} </dev/null; echo loopback_nc=$?; "
        f"wget -T 2 -q -O /dev/null http://127.0.0.1:{loopback.port}/; echo loopback_wget=$?; "
        f"nc -w 2 {bridge.host} {bridge.port} </dev/null; echo bridge_nc=$?; "
        f"wget -T 2 -q -O /dev/null http://{bridge.host}:{bridge.port}/; echo bridge_wget=$?; "
        "echo done"
    )


def test_a_job_cannot_reach_the_host_over_the_network(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    job_spec: SpecFactory,
    job_dirs: JobDirs,
    test_image: str,
    node_id: str,
) -> None:
    gateway = bridge_gateway(docker_client)
    loopback, bridge = Listener("127.0.0.1"), Listener(gateway)
    try:
        script = _egress_script(loopback, bridge)
        spec = job_spec(f"({script}) > /opt/output/egress.txt 2>&1")
        cid = runtime.create(spec)
        try:
            runtime.start(cid)
            state = runtime.wait(cid, seconds(60))
        finally:
            runtime.remove(cid)
        report = (job_dirs.output / "egress.txt").read_text()
        assert state.exit_code == 0, report
        results = dict(line.split("=", 1) for line in report.splitlines() if "=" in line)
        assert "done" in report.splitlines(), report  # the job really ran every attempt
        for attempt in ("loopback_nc", "loopback_wget", "bridge_nc", "bridge_wget"):
            assert results[attempt] != "0", f"{attempt} succeeded: {report}"
        assert "unreachable" in report  # the bridge address has no route at all
        time.sleep(seconds(0.5))
        assert loopback.peers == [] and bridge.peers == []

        # Control: on the default bridge the same commands do reach the host, so the
        # silence above is the isolation's doing, not the listeners'.
        control = docker_client.containers.create(
            test_image,
            ["sh", "-c", script],
            network_mode="bridge",
            labels={"cloudbender.node-id": node_id, "org.cloudbender.test": "egress-control"},
        )
        try:
            control.start()
            control.wait(timeout=seconds(60))
        finally:
            control.remove(force=True)
        time.sleep(seconds(0.5))
        assert bridge.peers, "the bridge listener is unreachable even from a networked container"
    finally:
        loopback.close()
        bridge.close()


def test_the_job_environment_cannot_be_overridden(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    job_spec: SpecFactory,
    job_dirs: JobDirs,
    test_image: str,
) -> None:
    with pytest.raises(InvalidContainerSpec, match="DATA_DIR is set by the agent"):
        runtime.create(job_spec(env={"DATA_DIR": "/etc"}))
    with pytest.raises(InvalidContainerSpec, match="NVIDIA_VISIBLE_DEVICES is set by the agent"):
        runtime.create(job_spec(env={"NVIDIA_VISIBLE_DEVICES": "all"}))

    # An image that declares them anyway does not win either.
    base = docker_client.containers.create(test_image, ["true"])
    image = base.commit(
        repository="cloudbender-test/env-override",
        tag=base.id[:12],
        changes=["ENV NVIDIA_VISIBLE_DEVICES=all", "ENV DATA_DIR=/etc", "ENV OUTPUT_DIR=/tmp"],
    )
    base.remove()
    try:
        spec = job_spec(
            'echo "$DATA_DIR $OUTPUT_DIR $NVIDIA_VISIBLE_DEVICES $JOB_ID" > /opt/output/env.txt',
            image_id=image.id,
        )
        cid = runtime.create(spec)
        try:
            runtime.start(cid)
            assert runtime.wait(cid, seconds(30)).exit_code == 0
        finally:
            runtime.remove(cid)
        assert (job_dirs.output / "env.txt").read_text().split() == [
            "/opt/data",
            "/opt/output",
            "void",
            spec.job_id,
        ]
    finally:
        docker_client.images.remove(image.id, force=True)


def test_data_is_read_only_and_output_is_the_jobs(
    runtime: DockerRuntime, job_spec: SpecFactory, job_dirs: JobDirs
) -> None:
    spec = job_spec(
        "rm /opt/data/vitals.csv; echo x >> /opt/data/vitals.csv; "
        "wc -l < /opt/data/vitals.csv > /opt/output/rows.txt"
    )
    cid = runtime.create(spec)
    try:
        runtime.start(cid)
        state = runtime.wait(cid, seconds(30))
    finally:
        runtime.remove(cid)
    assert state.exit_code == 0
    assert (job_dirs.data / "vitals.csv").read_text() == "hr,spo2\n80,97\n"
    result = job_dirs.output / "rows.txt"
    assert result.read_text().strip() == "2"
    assert (result.stat().st_uid, result.stat().st_gid) == (JOB_UID, JOB_UID)
