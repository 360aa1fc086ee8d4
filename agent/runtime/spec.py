"""A :class:`ContainerSpec` → the Docker SDK's ``containers.create`` arguments.

Pure: no Docker import, no I/O. Every row of docs/runtime.md is set here, and
``agent.runtime.verify`` checks each of them on the container the engine created.
The arguments are plain JSON-ready values (dicts, not ``docker.types`` objects; the
SDK turns them into the same request), so that tests can compare and print them.

Environment: the job gets ``DATA_DIR``, ``OUTPUT_DIR``, ``JOB_ID``, ``MODEL_DIR`` (when
a model is mounted) and ``NVIDIA_VISIBLE_DEVICES``, which the assignment's ``env``
cannot override. An assignment that tries (any name in :data:`RESERVED_ENV` or
starting with ``NVIDIA_``) is refused, not silently corrected: the provider learns
why instead of running with a value it did not expect. All of ``NVIDIA_*`` is
reserved because those variables steer the NVIDIA container runtime (which GPUs,
which driver capabilities, MIG devices), and GPU access is the agent's to grant.
``NVIDIA_VISIBLE_DEVICES`` is always set: to the leased GPU UUIDs, or to ``void``
when none is leased, so that an image declaring ``NVIDIA_VISIBLE_DEVICES=all`` (or a
legacy CUDA image, which the runtime treats as "all" when the variable is unset)
gets no GPU on a node whose default runtime is ``nvidia``.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agent.errors import InvalidContainerSpec
from agent.runtime.base import (
    DATA_TARGET,
    LABEL_JOB_ID,
    LABEL_MANAGED,
    LABEL_NODE_ID,
    MODEL_TARGET,
    OUTPUT_TARGET,
    ContainerSpec,
)

MIB = 1024 * 1024
RESERVED_ENV = ("DATA_DIR", "OUTPUT_DIR", "JOB_ID", "MODEL_DIR")
RESERVED_ENV_PREFIX = "NVIDIA_"
NO_GPU = "void"
CDI_KIND = "nvidia.com/gpu"

NO_NEW_PRIVILEGES = "no-new-privileges:true"
PROPAGATION = "rprivate"
ULIMITS = ({"name": "nofile", "soft": 1024, "hard": 1024}, {"name": "core", "soft": 0, "hard": 0})
LOG_TYPE = "json-file"
LOG_OPTS = {"max-size": "1m", "max-file": "2"}
STOP_SIGNAL = "SIGTERM"
# Docker refuses a memory limit below 6 MiB.
MIN_MEMORY_MIB = 6
# 0.01 CPU (docs/protocol.md 1.1's minimum). NanoCpus 0 is "no limit" to Docker, and any
# value under this one gives a CFS quota under the kernel's 1 ms minimum.
MIN_NANO_CPUS = 10_000_000

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_USER = re.compile(r"([0-9]+):([0-9]+)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_GPU_UUID = re.compile(r"(GPU|MIG)-[A-Za-z0-9][A-Za-z0-9/-]*")
_RUNTIME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_NAME = 128

# A mount at, above or below any of these hands the job the engine itself (a unix
# socket accepts connections through a read-only bind mount) or its state.
ENGINE_PATHS = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/var/lib/docker",
    "/run/containerd",
    "/var/run/containerd",
)


def container_name(node_id: str, job_id: str) -> str:
    """``cb-<node>-<job>``, with anything Docker refuses in a name replaced by ``_``;
    over-long names are shortened and made unique with a hash of the full one."""
    name = _NAME_UNSAFE.sub("_", f"cb-{node_id}-{job_id}")
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[: _MAX_NAME - 13]}-{digest}"
    return name


def env_problems(env: Mapping[str, str]) -> list[str]:
    """What is wrong with an assignment's ``env``: reserved or malformed names,
    NUL bytes. For admission (``bad_spec``) as well as for :func:`spec_problems`."""
    problems = []
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            problems.append(f"env: {name!r} is not a valid variable name")
        elif name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
            problems.append(f"env: {name} is set by the agent and cannot be overridden")
        if not isinstance(value, str) or "\0" in value:
            problems.append(f"env: the value of {name!r} must be a string without NUL bytes")
    return problems


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _dir_problems(spec: ContainerSpec) -> list[str]:
    problems = []
    dirs = {"data_dir": spec.data_dir, "model_dir": spec.model_dir, "output_dir": spec.output_dir}
    normal: dict[str, str] = {}
    for key, path in dirs.items():
        if path is None:
            continue
        text = str(path)
        if not posixpath.isabs(text) or "\0" in text:
            problems.append(f"{key}: {text!r} is not an absolute path")
            continue
        norm = posixpath.normpath(text)
        normal[key] = norm
        for engine_path in ENGINE_PATHS:
            if _inside(engine_path, norm) or _inside(norm, engine_path):
                problems.append(f"{key}: {norm} would expose the container engine ({engine_path})")
                break
    out = normal.get("output_dir")
    for key in ("data_dir", "model_dir"):
        other = normal.get(key)
        if out is not None and other is not None and (_inside(out, other) or _inside(other, out)):
            problems.append(f"output_dir: {out} overlaps {key} {other}; the job could write to it")
    return problems


def spec_problems(spec: ContainerSpec) -> list[str]:
    """Every rule ``spec`` breaks, in words; empty when it can be used."""
    problems = []
    for key in ("job_id", "node_id"):
        if not _ID.fullmatch(getattr(spec, key)):
            problems.append(f"{key}: {getattr(spec, key)!r} must match [A-Za-z0-9._-]{{1,128}}")
    if not spec.image:
        problems.append("image: the image reference is empty")
    if not _IMAGE_ID.fullmatch(spec.image_id):
        problems.append(f"image_id: {spec.image_id!r} is not a local image id (sha256:<64 hex>)")
    if spec.command is not None and (
        isinstance(spec.command, str)
        or not spec.command
        or any(not isinstance(a, str) or "\0" in a for a in spec.command)
    ):
        problems.append("command: must be a non-empty list of strings without NUL bytes")
    problems += env_problems(spec.env)
    user = _USER.fullmatch(spec.user)
    if user is None:
        problems.append(f"user: {spec.user!r} must be numeric UID:GID")
    elif int(user.group(1)) == 0:
        problems.append("user: job containers must not run as root (uid 0)")
    problems += _dir_problems(spec)
    if not (math.isfinite(spec.cpus) and nano_cpus(spec) >= MIN_NANO_CPUS):
        problems.append(f"cpus: {spec.cpus} must be a number of at least 0.01")
    if spec.memory_mib < MIN_MEMORY_MIB:
        problems.append(f"memory_mib: {spec.memory_mib} is below Docker's minimum of 6 MiB")
    for key in ("pids", "tmp_mib", "shm_mib"):
        if getattr(spec, key) < 1:
            problems.append(f"{key}: {getattr(spec, key)} must be at least 1")
    for uuid in spec.gpu_uuids:
        if not _GPU_UUID.fullmatch(uuid):
            problems.append(f"gpu_uuids: {uuid!r} is not a GPU or MIG UUID")
    if len(set(spec.gpu_uuids)) != len(spec.gpu_uuids):
        problems.append("gpu_uuids: a GPU is listed twice")
    if not _RUNTIME.fullmatch(spec.runtime):
        problems.append(f"runtime: {spec.runtime!r} is not a runtime name")
    return problems


def job_env(spec: ContainerSpec) -> dict[str, str]:
    """The environment the agent sets, which the assignment's ``env`` cannot change."""
    env = {"DATA_DIR": DATA_TARGET, "OUTPUT_DIR": OUTPUT_TARGET, "JOB_ID": spec.job_id}
    if spec.model_dir is not None:
        env["MODEL_DIR"] = MODEL_TARGET
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(spec.gpu_uuids) if spec.gpu_uuids else NO_GPU
    return env


def job_labels(spec: ContainerSpec) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_NODE_ID: spec.node_id, LABEL_JOB_ID: spec.job_id}


def tmpfs_options(spec: ContainerSpec) -> str:
    # mode=1777 is ignored when the image has a /tmp; uid/gid make it the job's.
    uid, gid = spec.user.split(":")
    return f"rw,noexec,nosuid,nodev,size={spec.tmp_mib}m,uid={uid},gid={gid}"


def expected_mounts(spec: ContainerSpec) -> dict[str, tuple[str, bool]]:
    """Target → (host source, read-only) for the job's bind mounts, and nothing else."""
    mounts = {DATA_TARGET: (posixpath.normpath(str(spec.data_dir)), True)}
    if spec.model_dir is not None:
        mounts[MODEL_TARGET] = (posixpath.normpath(str(spec.model_dir)), True)
    mounts[OUTPUT_TARGET] = (posixpath.normpath(str(spec.output_dir)), False)
    return mounts


def nano_cpus(spec: ContainerSpec) -> int:
    return round(spec.cpus * 1e9)


def gpu_request(uuids: Sequence[str], gpu_path: str) -> dict[str, Any]:
    """The one device request for the leased GPUs on ``gpu_path`` (``agent.runtime.gpupath``):
    Docker's ``nvidia`` driver with the UUIDs (legacy hook), or its ``cdi`` driver with
    the CDI names ``nvidia.com/gpu=<UUID>``."""
    if gpu_path == "cdi":
        return {"driver": "cdi", "device_ids": [f"{CDI_KIND}={u}" for u in uuids]}
    return {"driver": "nvidia", "device_ids": list(uuids), "capabilities": [["gpu"]]}


def create_kwargs(spec: ContainerSpec, gpu_path: str = "legacy") -> dict[str, Any]:
    """Keyword arguments for ``DockerClient.containers.create``; leased GPUs are requested
    the ``gpu_path`` way (``legacy`` or ``cdi``, see :func:`gpu_request`).

    Raises :class:`~agent.errors.InvalidContainerSpec` listing every problem of
    ``spec``. Never anything a pull could follow: the image is the local id.
    """
    problems = spec_problems(spec)
    if problems:
        raise InvalidContainerSpec(problems)
    memory = spec.memory_mib * MIB
    env = {**spec.env, **job_env(spec)}
    kwargs: dict[str, Any] = {
        "image": spec.image_id,
        "command": list(spec.command) if spec.command is not None else None,
        "name": container_name(spec.node_id, spec.job_id),
        "labels": job_labels(spec),
        "environment": [f"{k}={v}" for k, v in env.items()],
        "user": spec.user,
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": [NO_NEW_PRIVILEGES],
        "pids_limit": spec.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": nano_cpus(spec),
        "tmpfs": {"/tmp": tmpfs_options(spec)},
        "mounts": [
            {
                "Target": target,
                "Source": source,
                "Type": "bind",
                "ReadOnly": read_only,
                "BindOptions": {"Propagation": PROPAGATION},
            }
            for target, (source, read_only) in expected_mounts(spec).items()
        ],
        "ulimits": [dict(u) for u in ULIMITS],
        "ipc_mode": "private",
        "shm_size": spec.shm_mib * MIB,
        "cgroupns": "private",
        "privileged": False,
        "log_config": {"type": LOG_TYPE, "config": dict(LOG_OPTS)},
        "restart_policy": {"Name": "no"},
        "init": True,
        "runtime": spec.runtime,
        # The protocol promises SIGTERM, whatever STOPSIGNAL the image declares.
        "stop_signal": STOP_SIGNAL,
        # An image HEALTHCHECK would exec commands in the job on the engine's timer.
        "healthcheck": {"test": ["NONE"]},
    }
    if spec.gpu_uuids:
        kwargs["device_requests"] = [gpu_request(spec.gpu_uuids, gpu_path)]
    return kwargs
