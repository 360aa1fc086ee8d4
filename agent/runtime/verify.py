"""Check a created container, as the engine reports it, against docs/runtime.md.

Pure: it reads ``container.attrs`` (the engine's inspect answer) and never trusts
what was asked for. :func:`verify_attrs` returns every difference in words, one row
of the table per check, so that ``DockerRuntime.create`` can refuse to start a
container that is not what the spec says, whatever the cause (an engine that
ignores an option, a daemon default, an image's ``VOLUME``, a bug here).
:func:`isolation_summary` is the same settings, JSON-ready, for the audit ledger.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from agent.runtime.base import ContainerSpec
from agent.runtime.spec import (
    CDI_KIND,
    LOG_OPTS,
    LOG_TYPE,
    MIB,
    MIN_NANO_CPUS,
    NO_NEW_PRIVILEGES,
    PROPAGATION,
    STOP_SIGNAL,
    ULIMITS,
    container_name,
    expected_mounts,
    job_env,
    job_labels,
    nano_cpus,
    tmpfs_options,
)

Attrs = Mapping[str, Any]
_TMPFS_SIZE = re.compile(r"(?:^|,)size=0*[1-9][0-9]*[kmg]?(?:,|$)")
_ENGINE_SOCKETS = ("docker.sock", "containerd.sock")
# The HostConfig fields the audit ledger records, as the engine names them.
_AUDITED = (
    "NetworkMode",
    "ReadonlyRootfs",
    "CapAdd",
    "CapDrop",
    "SecurityOpt",
    "Privileged",
    "Devices",
    "DeviceCgroupRules",
    "DeviceRequests",
    "PidsLimit",
    "Memory",
    "MemorySwap",
    "NanoCpus",
    "Ulimits",
    "IpcMode",
    "ShmSize",
    "PidMode",
    "UTSMode",
    "UsernsMode",
    "CgroupnsMode",
    "Tmpfs",
    "LogConfig",
    "RestartPolicy",
    "Init",
    "Runtime",
)


def _empty(value: object) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _hc(attrs: Attrs) -> Mapping[str, Any]:
    return attrs.get("HostConfig") or {}


def _cfg(attrs: Attrs) -> Mapping[str, Any]:
    return attrs.get("Config") or {}


def _env(attrs: Attrs) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in _cfg(attrs).get("Env") or []:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def _identity(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    p = []
    if attrs.get("Image") != spec.image_id:
        p.append(f"image: the container runs {attrs.get('Image')!r}, not {spec.image_id}")
    name = container_name(spec.node_id, spec.job_id)
    if attrs.get("Name", "").lstrip("/") != name:
        p.append(f"name: {attrs.get('Name')!r} is not {name}")
    labels = _cfg(attrs).get("Labels") or {}
    for key, value in job_labels(spec).items():
        if labels.get(key) != value:
            p.append(f"labels: {key} is {labels.get(key)!r}, must be {value!r}")
    env = _env(attrs)
    for key, value in {**spec.env, **job_env(spec)}.items():
        if env.get(key) != value:
            p.append(f"env: {key} is {env.get(key)!r}, must be {value!r}")
    return p


def _network(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    p = []
    if _hc(attrs).get("NetworkMode") != "none":
        p.append(f"no network: NetworkMode is {_hc(attrs).get('NetworkMode')!r}, must be 'none'")
    networks = set((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    if networks - {"none"}:
        p.append(f"no network: attached to {sorted(networks)}, must be only 'none'")
    return p


def _rootfs_caps_privileges(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    hc, p = _hc(attrs), []
    if hc.get("ReadonlyRootfs") is not True:
        p.append("read-only root fs: ReadonlyRootfs is not true")
    if hc.get("CapDrop") != ["ALL"]:
        p.append(f"no capabilities: CapDrop is {hc.get('CapDrop')!r}, must be ['ALL']")
    if not _empty(hc.get("CapAdd")):
        p.append(f"no capabilities: CapAdd is {hc.get('CapAdd')!r}, must be empty")
    opts = list(hc.get("SecurityOpt") or [])
    if NO_NEW_PRIVILEGES not in opts:
        p.append(f"no privilege gain: SecurityOpt {opts!r} lacks {NO_NEW_PRIVILEGES}")
    for opt in opts:
        if "unconfined" in opt:
            p.append(f"default seccomp: SecurityOpt {opt!r} switches a security profile off")
        elif opt != NO_NEW_PRIVILEGES:
            p.append(f"default seccomp: SecurityOpt {opt!r} is not one the agent sets")
    if hc.get("Privileged") is not False:
        p.append(f"not privileged: Privileged is {hc.get('Privileged')!r}, must be false")
    for key in ("Devices", "DeviceCgroupRules"):
        if not _empty(hc.get(key)):
            p.append(f"no raw devices: {key} is {hc.get(key)!r}, must be empty")
    return p


def _positive(value: object, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _limits(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    # Each limit must be what the spec says *and* a real limit: to the engine 0 (or -1)
    # means none at all, so a spec that asked for 0 must not pass by being matched.
    hc, p = _hc(attrs), []
    pids = hc.get("PidsLimit")
    if not _positive(pids) or pids != spec.pids:
        p.append(f"process limit: PidsLimit is {pids!r}, must be {spec.pids}")
    memory = spec.memory_mib * MIB
    if not _positive(hc.get("Memory")):
        p.append(f"memory: Memory is {hc.get('Memory')!r}, must be a positive limit")
    elif hc.get("Memory") != memory:
        p.append(f"memory: Memory is {hc.get('Memory')!r}, must be {memory}")
    if hc.get("MemorySwap") != hc.get("Memory"):
        p.append(f"no swap: MemorySwap {hc.get('MemorySwap')!r} differs from Memory")
    if hc.get("OomKillDisable"):
        p.append("memory: OomKillDisable is set; the job would hang instead of being killed")
    cpus = hc.get("NanoCpus")
    if not _positive(cpus, MIN_NANO_CPUS):
        p.append(f"CPU: NanoCpus is {cpus!r}, must be a limit of at least {MIN_NANO_CPUS}")
    elif cpus != nano_cpus(spec):
        p.append(f"CPU: NanoCpus is {cpus!r}, must be {nano_cpus(spec)}")
    ulimits = {(u.get("Name"), u.get("Soft"), u.get("Hard")) for u in hc.get("Ulimits") or []}
    want = {(u["name"], u["soft"], u["hard"]) for u in ULIMITS}
    if ulimits != want or len(hc.get("Ulimits") or []) != len(want):
        p.append(f"ulimits: {hc.get('Ulimits')!r}, must be nofile 1024 and core 0 only")
    if not _positive(hc.get("ShmSize")) or hc.get("ShmSize") != spec.shm_mib * MIB:
        p.append(f"private IPC: ShmSize is {hc.get('ShmSize')!r}, must be {spec.shm_mib * MIB}")
    return p


def _user(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    user = _cfg(attrs).get("User") or ""
    p = []
    if user.split(":")[0] in ("", "0", "root"):
        p.append(f"non-root: User is {user!r}, the job would run as root")
    if user != spec.user:
        p.append(f"non-root: User is {user!r}, must be {spec.user}")
    if not _empty(_hc(attrs).get("GroupAdd")):
        p.append(f"non-root: GroupAdd is {_hc(attrs).get('GroupAdd')!r}, must be empty")
    return p


def _filesystems(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    hc, p = _hc(attrs), []
    tmpfs = {"/tmp": tmpfs_options(spec)}
    if hc.get("Tmpfs") != tmpfs:
        p.append(f"scratch: Tmpfs is {hc.get('Tmpfs')!r}, must be {tmpfs!r}")
    elif not _TMPFS_SIZE.search(str((hc.get("Tmpfs") or {}).get("/tmp"))):
        # size=0 is no limit to tmpfs: the job could fill the node's memory through /tmp.
        p.append("scratch: /tmp has no positive size= limit")
    want = expected_mounts(spec)
    for key in ("Binds", "VolumesFrom"):
        if not _empty(hc.get(key)):
            p.append(f"mounts: {key} is {hc.get(key)!r}, must be empty")
    asked = {m.get("Target"): m for m in hc.get("Mounts") or []}
    if len(asked) != len(hc.get("Mounts") or []):
        p.append("mounts: HostConfig.Mounts names a target twice")
    actual = {m.get("Destination"): m for m in attrs.get("Mounts") or []}
    for target, mount in actual.items():
        source = str(mount.get("Source") or mount.get("Name") or "")
        if any(source.endswith(s) or str(target).endswith(s) for s in _ENGINE_SOCKETS):
            p.append(f"mounts: {source} at {target} exposes the container engine")
        if target not in want:
            hint = " (a VOLUME in the image?)" if mount.get("Type") == "volume" else ""
            p.append(f"mounts: {mount.get('Type')} mount at {target} is not the job's{hint}")
            continue
        w_source, w_ro = want[target]
        if mount.get("Type") != "bind" or mount.get("Source") != w_source:
            p.append(f"mounts: {target} is {mount.get('Type')} {source!r}, must bind {w_source}")
        if mount.get("RW") is not (not w_ro):
            p.append(f"mounts: {target} must be {'read-only' if w_ro else 'read-write'}")
        if mount.get("Propagation") != PROPAGATION:
            p.append(f"mounts: {target} propagation is {mount.get('Propagation')!r}, not rprivate")
    for target in want:
        if target not in actual or target not in asked:
            p.append(f"mounts: {target} is missing")
    for target, mount in asked.items():
        propagation = (mount.get("BindOptions") or {}).get("Propagation")
        if target in want and propagation != PROPAGATION:
            p.append(f"mounts: {target} is asked with propagation {propagation!r}")
    return p


def _namespaces(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    hc, p = _hc(attrs), []
    if hc.get("IpcMode") != "private":
        p.append(f"private IPC: IpcMode is {hc.get('IpcMode')!r}, must be 'private'")
    for key in ("PidMode", "UTSMode", "UsernsMode"):
        if not _empty(hc.get(key)):
            p.append(f"no host namespaces: {key} is {hc.get(key)!r}, must be empty")
    if hc.get("CgroupnsMode") != "private":
        p.append(f"no host namespaces: CgroupnsMode is {hc.get('CgroupnsMode')!r}, not 'private'")
    return p


def _gpus(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    requests = _hc(attrs).get("DeviceRequests") or []
    if not spec.gpu_uuids:
        if requests:
            return [f"only the leased GPUs: DeviceRequests is {requests!r}, no GPU is leased"]
        return []
    if len(requests) != 1:
        return [f"only the leased GPUs: {len(requests)} DeviceRequests, must be exactly 1"]
    req, p = requests[0], []
    # Either path of agent.runtime.gpupath: the nvidia driver with the UUIDs (and the
    # gpu capability), or the cdi driver with their CDI names (no capabilities).
    driver = req.get("Driver")
    caps: tuple[Any, ...]
    if driver == "cdi":
        want, caps = [f"{CDI_KIND}={u}" for u in spec.gpu_uuids], (None, [])
    else:
        want, caps = list(spec.gpu_uuids), ([["gpu"]],)
        if driver != "nvidia":
            p.append(f"only the leased GPUs: driver is {driver!r}, must be 'nvidia' or 'cdi'")
    if list(req.get("DeviceIDs") or []) != want:
        p.append(f"only the leased GPUs: DeviceIDs {req.get('DeviceIDs')!r}, leased {want}")
    if req.get("Count") not in (0, None):
        p.append(f"only the leased GPUs: Count is {req.get('Count')!r}, must be 0")
    if req.get("Capabilities") not in caps:
        p.append(f"only the leased GPUs: Capabilities {req.get('Capabilities')!r}, not {caps[0]}")
    return p


def _lifecycle(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    hc, cfg, p = _hc(attrs), _cfg(attrs), []
    log = hc.get("LogConfig") or {}
    if log.get("Type") != LOG_TYPE or log.get("Config") != LOG_OPTS:
        p.append(f"bounded logs: LogConfig is {log!r}, must be json-file 1m x 2")
    restart = (hc.get("RestartPolicy") or {}).get("Name")
    if restart != "no":
        p.append(f"no restart: RestartPolicy is {restart!r}, must be 'no'")
    if hc.get("AutoRemove"):
        p.append("no restart: AutoRemove is set; the exit code would be lost")
    if hc.get("Init") is not True:
        p.append("init: Init is not true")
    if hc.get("Runtime") != spec.runtime:
        p.append(f"runtime: Runtime is {hc.get('Runtime')!r}, must be {spec.runtime!r}")
    if cfg.get("StopSignal") != STOP_SIGNAL:
        p.append(f"stop: StopSignal is {cfg.get('StopSignal')!r}, must be {STOP_SIGNAL}")
    if (cfg.get("Healthcheck") or {}).get("Test") != ["NONE"]:
        p.append("healthcheck: the image's HEALTHCHECK is not switched off")
    return p


ROWS: tuple[Callable[[ContainerSpec, Attrs], list[str]], ...] = (
    _identity,
    _network,
    _rootfs_caps_privileges,
    _limits,
    _user,
    _filesystems,
    _namespaces,
    _gpus,
    _lifecycle,
)


def verify_attrs(spec: ContainerSpec, attrs: Attrs) -> list[str]:
    """Every way ``attrs`` (a container's inspect answer) differs from what ``spec`` and
    docs/runtime.md require, in words; empty when the container may be started."""
    return [problem for row in ROWS for problem in row(spec, attrs)]


def isolation_summary(attrs: Attrs) -> dict[str, Any]:
    """The isolation settings of a container as the engine reports them, JSON-ready.

    For the audit ledger: mounts are listed by target with their mode, never by host
    path (no datastore location leaves the node, not even into the ledger).
    """
    hc, cfg = _hc(attrs), _cfg(attrs)
    env = _env(attrs)
    return {
        "image_id": attrs.get("Image"),
        "user": cfg.get("User"),
        "networks": sorted((attrs.get("NetworkSettings") or {}).get("Networks") or {}),
        "mounts": [
            {
                "target": m.get("Destination"),
                "type": m.get("Type"),
                "rw": m.get("RW"),
                "propagation": m.get("Propagation"),
            }
            # The engine lists mounts in no fixed order; the ledger wants a stable one.
            for m in sorted(attrs.get("Mounts") or [], key=lambda m: str(m.get("Destination")))
        ],
        "nvidia_visible_devices": env.get("NVIDIA_VISIBLE_DEVICES"),
        "host_config": {key: hc.get(key) for key in _AUDITED},
    }
