"""The job container's create arguments, and the check of what the engine created.

`engine_attrs` builds the inspect answer Docker gives for a container created from
`create_kwargs(spec)` (the shape tests/docker checks on the real engine, where
`verify_attrs` of a real container is empty); each deviation test breaks one row of
SECURITY.md §1 in it and expects `verify_attrs` to name that row.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ImageDigestMismatch, ImageRefInvalid, InvalidContainerSpec
from agent.runtime.base import ContainerSpec, ContainerState
from agent.runtime.images import parse_ref, pinned_digest, repo_digests, scrub
from agent.runtime.pull import PullProgress, encode_auth, json_objects
from agent.runtime.spec import (
    container_name,
    create_kwargs,
    env_problems,
    spec_problems,
    tmpfs_options,
)
from agent.runtime.verify import isolation_summary, verify_attrs

IMAGE_ID = "sha256:" + "ab" * 32
GPU_A = "GPU-5a1c3f0e-1111-2222-3333-444455556666"
GPU_B = "GPU-9b2d4e1f-7777-8888-9999-000011112222"
MIB = 1024 * 1024


def make_spec(**changes: Any) -> ContainerSpec:
    fields: dict[str, Any] = {
        "job_id": "j-1",
        "node_id": "node-a",
        "image": "registry.example/provider/sepsis:1.4",
        "image_id": IMAGE_ID,
        "command": ["python", "/opt/model/predict.py"],
        "env": {"BATCH_SIZE": "64"},
        "user": "65534:65534",
        "data_dir": Path("/srv/data/vitals"),
        "model_dir": Path("/var/lib/cloudbender/models/mdl-9"),
        "output_dir": Path("/var/lib/cloudbender/jobs/j-1/output"),
        "cpus": 2.5,
        "memory_mib": 512,
        "pids": 256,
        "tmp_mib": 128,
    }
    fields.update(changes)
    return ContainerSpec(**fields)


def engine_attrs(spec: ContainerSpec) -> dict[str, Any]:
    """What `docker inspect` reports for a container created from `create_kwargs(spec)`."""
    kw = create_kwargs(spec)
    requests = None
    if "device_requests" in kw:
        requests = [
            {
                "Driver": r["driver"],
                "Count": 0,
                "DeviceIDs": r["device_ids"],
                "Capabilities": r["capabilities"],
                "Options": {},
            }
            for r in kw["device_requests"]
        ]
    host_mounts = copy.deepcopy(kw["mounts"])
    for mount in host_mounts:
        if not mount["ReadOnly"]:
            del mount["ReadOnly"]  # the engine omits a false ReadOnly
    return {
        "Id": "c0ffee" * 10 + "abcd",
        "Name": "/" + kw["name"],
        "Image": kw["image"],
        "State": {"Status": "created", "Running": False, "OOMKilled": False, "ExitCode": 0},
        "HostConfig": {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "CapAdd": None,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges:true"],
            "PidsLimit": kw["pids_limit"],
            "Memory": kw["mem_limit"],
            "MemorySwap": kw["memswap_limit"],
            "OomKillDisable": False,
            "NanoCpus": kw["nano_cpus"],
            "Tmpfs": dict(kw["tmpfs"]),
            "Binds": None,
            "VolumesFrom": None,
            "Mounts": host_mounts,
            "Ulimits": [
                {"Name": u["name"], "Hard": u["hard"], "Soft": u["soft"]} for u in kw["ulimits"]
            ],
            "IpcMode": "private",
            "ShmSize": kw["shm_size"],
            "PidMode": "",
            "UTSMode": "",
            "UsernsMode": "",
            "CgroupnsMode": "private",
            "Privileged": False,
            "Devices": None,
            "DeviceCgroupRules": None,
            "DeviceRequests": requests,
            "GroupAdd": None,
            "LogConfig": {"Type": "json-file", "Config": {"max-file": "2", "max-size": "1m"}},
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "AutoRemove": False,
            "Init": True,
            "Runtime": kw["runtime"],
        },
        "Mounts": [
            {
                "Type": "bind",
                "Source": m["Source"],
                "Destination": m["Target"],
                "Mode": "",
                "RW": not m["ReadOnly"],
                "Propagation": "rprivate",
            }
            for m in kw["mounts"]
        ],
        "Config": {
            "User": kw["user"],
            "Env": [*kw["environment"], "PATH=/usr/bin:/bin"],
            "Cmd": kw["command"],
            "Image": kw["image"],
            "Labels": {**kw["labels"], "org.example.from-image": "x"},
            "StopSignal": "SIGTERM",
            "Healthcheck": {"Test": ["NONE"]},
        },
        "NetworkSettings": {"Networks": {"none": {"NetworkID": "n"}}},
    }


# --- create_kwargs: every row of SECURITY.md §1 -------------------------------------


def test_create_kwargs_set_every_row_of_the_checklist() -> None:
    kw = create_kwargs(make_spec())

    assert kw["image"] == IMAGE_ID  # the local id: nothing a pull could follow
    assert kw["network_mode"] == "none"
    assert kw["read_only"] is True
    assert kw["cap_drop"] == ["ALL"] and "cap_add" not in kw
    assert kw["security_opt"] == ["no-new-privileges:true"]
    assert kw["pids_limit"] == 256
    assert kw["mem_limit"] == kw["memswap_limit"] == 512 * MIB
    assert kw["nano_cpus"] == 2_500_000_000
    assert kw["user"] == "65534:65534"
    assert kw["tmpfs"] == {"/tmp": "rw,noexec,nosuid,nodev,size=128m,uid=65534,gid=65534"}
    assert kw["mounts"] == [
        {
            "Target": "/opt/data",
            "Source": "/srv/data/vitals",
            "Type": "bind",
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        },
        {
            "Target": "/opt/model",
            "Source": "/var/lib/cloudbender/models/mdl-9",
            "Type": "bind",
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        },
        {
            "Target": "/opt/output",
            "Source": "/var/lib/cloudbender/jobs/j-1/output",
            "Type": "bind",
            "ReadOnly": False,
            "BindOptions": {"Propagation": "rprivate"},
        },
    ]
    assert kw["ulimits"] == [
        {"name": "nofile", "soft": 1024, "hard": 1024},
        {"name": "core", "soft": 0, "hard": 0},
    ]
    assert kw["ipc_mode"] == "private" and kw["shm_size"] == 64 * MIB
    assert kw["cgroupns"] == "private"
    for unset in ("pid_mode", "uts_mode", "userns_mode", "devices", "device_cgroup_rules"):
        assert unset not in kw
    assert kw["privileged"] is False
    assert "device_requests" not in kw
    assert kw["log_config"] == {"type": "json-file", "config": {"max-size": "1m", "max-file": "2"}}
    assert kw["restart_policy"] == {"Name": "no"}
    assert kw["init"] is True
    assert kw["runtime"] == "runc"
    assert kw["labels"] == {
        "cloudbender.managed": "true",
        "cloudbender.node-id": "node-a",
        "cloudbender.job-id": "j-1",
    }
    assert kw["name"] == "cb-node-a-j-1"
    assert kw["stop_signal"] == "SIGTERM"
    assert kw["healthcheck"] == {"test": ["NONE"]}
    json.dumps(kw)  # plain data: printable, comparable


def test_environment_is_the_assignments_then_the_agents() -> None:
    kw = create_kwargs(make_spec())
    assert kw["environment"] == [
        "BATCH_SIZE=64",
        "DATA_DIR=/opt/data",
        "OUTPUT_DIR=/opt/output",
        "JOB_ID=j-1",
        "MODEL_DIR=/opt/model",
        "NVIDIA_VISIBLE_DEVICES=void",
    ]


def test_without_a_model_there_is_no_model_mount_nor_model_dir() -> None:
    kw = create_kwargs(make_spec(model_dir=None))
    assert [m["Target"] for m in kw["mounts"]] == ["/opt/data", "/opt/output"]
    assert not any(e.startswith("MODEL_DIR=") for e in kw["environment"])


def test_leased_gpus_are_requested_by_uuid_and_named_in_the_environment() -> None:
    kw = create_kwargs(make_spec(gpu_uuids=(GPU_A, GPU_B)))
    assert kw["device_requests"] == [
        {"driver": "nvidia", "device_ids": [GPU_A, GPU_B], "capabilities": [["gpu"]]}
    ]
    assert f"NVIDIA_VISIBLE_DEVICES={GPU_A},{GPU_B}" in kw["environment"]
    assert "devices" not in kw and "device_cgroup_rules" not in kw


@pytest.mark.parametrize(
    "name",
    [
        "DATA_DIR",
        "OUTPUT_DIR",
        "JOB_ID",
        "MODEL_DIR",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
    ],
)
def test_the_assignment_cannot_override_the_agents_environment(name: str) -> None:
    with pytest.raises(InvalidContainerSpec, match=f"{name} is set by the agent"):
        create_kwargs(make_spec(env={name: "/etc"}))


def test_env_problems_names_bad_names_and_nul_bytes() -> None:
    assert env_problems({"OK_1": "x", "a.b-c": "y"}) == []
    problems = env_problems({"1BAD": "x", "A=B": "y", "NUL": "a\0b"})
    assert len(problems) == 3


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"user": "0:0"}, "must not run as root"),
        ({"user": "root"}, "numeric UID:GID"),
        ({"user": "nobody:nogroup"}, "numeric UID:GID"),
        ({"data_dir": Path("srv/data")}, "not an absolute path"),
        ({"output_dir": Path("/srv/data/vitals/out")}, "overlaps data_dir"),
        ({"output_dir": Path("/srv")}, "overlaps data_dir"),
        ({"output_dir": Path("/var/lib/cloudbender/models/mdl-9")}, "overlaps model_dir"),
        ({"data_dir": Path("/var/run")}, "would expose the container engine"),
        ({"data_dir": Path("/")}, "would expose the container engine"),
        ({"model_dir": Path("/var/lib/docker/volumes")}, "would expose the container engine"),
        ({"job_id": "j 1"}, "job_id"),
        ({"node_id": ""}, "node_id"),
        ({"image_id": "busybox:latest"}, "not a local image id"),
        ({"command": []}, "command"),
        ({"command": "python predict.py"}, "command"),
        ({"cpus": 0.0}, "cpus"),
        ({"cpus": 1e-10}, "at least 0.01"),  # NanoCpus 0: no limit to Docker
        ({"cpus": 0.009}, "at least 0.01"),
        ({"cpus": float("nan")}, "cpus"),
        ({"cpus": float("inf")}, "cpus"),
        ({"memory_mib": 4}, "minimum of 6 MiB"),
        ({"pids": 0}, "pids"),
        ({"tmp_mib": 0}, "tmp_mib"),
        ({"shm_mib": 0}, "shm_mib"),
        ({"gpu_uuids": ("all",)}, "not a GPU or MIG UUID"),
        ({"gpu_uuids": (f"{GPU_A},{GPU_B}",)}, "not a GPU or MIG UUID"),
        ({"gpu_uuids": (GPU_A, GPU_A)}, "listed twice"),
        ({"runtime": "run c"}, "not a runtime name"),
    ],
)
def test_a_spec_that_breaks_a_rule_is_refused(changes: dict[str, Any], words: str) -> None:
    spec = make_spec(**changes)
    assert any(words in p for p in spec_problems(spec)), spec_problems(spec)
    with pytest.raises(InvalidContainerSpec) as info:
        create_kwargs(spec)
    assert words in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    spec = make_spec(user="0:0", pids=0, env={"JOB_ID": "x"})
    with pytest.raises(InvalidContainerSpec) as info:
        create_kwargs(spec)
    assert len(info.value.problems) == 3


def test_mig_uuids_are_accepted() -> None:
    assert spec_problems(make_spec(gpu_uuids=("MIG-GPU-5a1c3f0e/1/0", "MIG-4f1e2d3c-aaaa"))) == []


def test_container_names_are_safe_and_bounded() -> None:
    assert container_name("node-a", "j-1") == "cb-node-a-j-1"
    assert container_name("node a", "j/1") == "cb-node_a-j_1"
    long_a, long_b = container_name("n" * 128, "a" * 128), container_name("n" * 128, "b" * 128)
    assert len(long_a) == 128 and long_a != long_b


# --- verify_attrs: each single deviation is caught ----------------------------------


def test_a_container_as_created_passes() -> None:
    assert verify_attrs(make_spec(), engine_attrs(make_spec())) == []
    gpu_spec = make_spec(gpu_uuids=(GPU_A,))
    assert verify_attrs(gpu_spec, engine_attrs(gpu_spec)) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(attrs: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = attrs
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _extra_mount(source: str, target: str, rw: bool = True) -> Callable[[dict[str, Any]], None]:
    def mutate(attrs: dict[str, Any]) -> None:
        attrs["Mounts"].append(
            {
                "Type": "bind",
                "Source": source,
                "Destination": target,
                "RW": rw,
                "Propagation": "rprivate",
            }
        )
        attrs["HostConfig"]["Mounts"].append(
            {
                "Type": "bind",
                "Source": source,
                "Target": target,
                "BindOptions": {"Propagation": "rprivate"},
            }
        )

    return mutate


def _anonymous_volume(attrs: dict[str, Any]) -> None:
    attrs["Mounts"].append(
        {
            "Type": "volume",
            "Name": "3f2a",
            "Source": "/var/lib/docker/volumes/3f2a/_data",
            "Destination": "/vol",
            "RW": True,
            "Propagation": "",
        }
    )


def _mount_field(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(attrs: dict[str, Any]) -> None:
        attrs["Mounts"][index][key] = value

    return mutate


def _env(name: str, value: str) -> Callable[[dict[str, Any]], None]:
    def mutate(attrs: dict[str, Any]) -> None:
        attrs["Config"]["Env"] = [e for e in attrs["Config"]["Env"] if not e.startswith(f"{name}=")]
        attrs["Config"]["Env"].append(f"{name}={value}")

    return mutate


def _drop_label(attrs: dict[str, Any]) -> None:
    del attrs["Config"]["Labels"]["cloudbender.job-id"]


DEVIATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("network bridge", _set("HostConfig.NetworkMode", "bridge"), "no network"),
    ("attached to bridge", _set("NetworkSettings.Networks", {"bridge": {}}), "no network"),
    ("host network", _set("HostConfig.NetworkMode", "host"), "no network"),
    ("writable rootfs", _set("HostConfig.ReadonlyRootfs", False), "read-only root fs"),
    ("CapAdd", _set("HostConfig.CapAdd", ["SYS_ADMIN"]), "CapAdd"),
    ("CapDrop missing", _set("HostConfig.CapDrop", None), "CapDrop"),
    ("CapDrop partial", _set("HostConfig.CapDrop", ["NET_RAW"]), "CapDrop"),
    ("no no-new-privileges", _set("HostConfig.SecurityOpt", []), "no privilege gain"),
    (
        "seccomp unconfined",
        _set("HostConfig.SecurityOpt", ["no-new-privileges:true", "seccomp=unconfined"]),
        "switches a security profile off",
    ),
    (
        "apparmor unconfined",
        _set("HostConfig.SecurityOpt", ["no-new-privileges:true", "apparmor=unconfined"]),
        "switches a security profile off",
    ),
    (
        "custom seccomp",
        _set("HostConfig.SecurityOpt", ["no-new-privileges:true", "seccomp={}"]),
        "not one the agent sets",
    ),
    ("PidsLimit 0", _set("HostConfig.PidsLimit", 0), "process limit"),
    ("PidsLimit unlimited", _set("HostConfig.PidsLimit", -1), "process limit"),
    ("PidsLimit None", _set("HostConfig.PidsLimit", None), "process limit"),
    ("Memory 0", _set("HostConfig.Memory", 0), "memory"),
    ("MemorySwap != Memory", _set("HostConfig.MemorySwap", 1024 * MIB), "no swap"),
    ("MemorySwap unlimited", _set("HostConfig.MemorySwap", -1), "no swap"),
    ("OOM killer off", _set("HostConfig.OomKillDisable", True), "OomKillDisable"),
    ("NanoCpus 0", _set("HostConfig.NanoCpus", 0), "CPU"),
    ("user empty", _set("Config.User", ""), "root"),
    ("user 0", _set("Config.User", "0"), "root"),
    ("user root", _set("Config.User", "root"), "root"),
    ("user 0:0", _set("Config.User", "0:0"), "root"),
    ("other user", _set("Config.User", "1000:1000"), "must be 65534:65534"),
    ("GroupAdd", _set("HostConfig.GroupAdd", ["999"]), "GroupAdd"),
    ("no tmpfs", _set("HostConfig.Tmpfs", None), "scratch"),
    ("exec tmpfs", _set("HostConfig.Tmpfs", {"/tmp": "rw,size=128m"}), "scratch"),
    ("extra mount", _extra_mount("/etc", "/host-etc", rw=False), "not the job's"),
    (
        "docker.sock",
        _extra_mount("/var/run/docker.sock", "/var/run/docker.sock"),
        "exposes the container engine",
    ),
    ("image VOLUME", _anonymous_volume, "a VOLUME in the image"),
    ("Binds", _set("HostConfig.Binds", ["/:/host"]), "Binds"),
    ("VolumesFrom", _set("HostConfig.VolumesFrom", ["other"]), "VolumesFrom"),
    ("data writable", _mount_field(0, "RW", True), "/opt/data must be read-only"),
    ("output read-only", _mount_field(2, "RW", False), "/opt/output must be read-write"),
    ("propagation shared", _mount_field(0, "Propagation", "rshared"), "propagation"),
    ("wrong source", _mount_field(0, "Source", "/srv"), "must bind /srv/data/vitals"),
    ("mount missing", _set("Mounts", []), "/opt/data is missing"),
    (
        "no nofile ulimit",
        _set("HostConfig.Ulimits", [{"Name": "core", "Soft": 0, "Hard": 0}]),
        "ulimits",
    ),
    (
        "core dumps",
        _set(
            "HostConfig.Ulimits",
            [
                {"Name": "nofile", "Soft": 1024, "Hard": 1024},
                {"Name": "core", "Soft": -1, "Hard": -1},
            ],
        ),
        "ulimits",
    ),
    ("IpcMode host", _set("HostConfig.IpcMode", "host"), "private IPC"),
    ("IpcMode shareable", _set("HostConfig.IpcMode", "shareable"), "private IPC"),
    ("ShmSize", _set("HostConfig.ShmSize", 0), "ShmSize"),
    ("PidMode host", _set("HostConfig.PidMode", "host"), "PidMode"),
    ("UTSMode host", _set("HostConfig.UTSMode", "host"), "UTSMode"),
    ("UsernsMode host", _set("HostConfig.UsernsMode", "host"), "UsernsMode"),
    ("cgroupns host", _set("HostConfig.CgroupnsMode", "host"), "CgroupnsMode"),
    ("privileged", _set("HostConfig.Privileged", True), "not privileged"),
    (
        "devices",
        _set(
            "HostConfig.Devices",
            [
                {
                    "PathOnHost": "/dev/nvidia0",
                    "PathInContainer": "/dev/nvidia0",
                    "CgroupPermissions": "rwm",
                }
            ],
        ),
        "no raw devices",
    ),
    ("device cgroup rule", _set("HostConfig.DeviceCgroupRules", ["c 195:* rmw"]), "no raw devices"),
    (
        "GPU without lease",
        _set(
            "HostConfig.DeviceRequests",
            [{"Driver": "nvidia", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]]}],
        ),
        "no GPU is leased",
    ),
    ("NVIDIA_VISIBLE_DEVICES=all", _env("NVIDIA_VISIBLE_DEVICES", "all"), "NVIDIA_VISIBLE_DEVICES"),
    (
        "no log limit",
        _set("HostConfig.LogConfig", {"Type": "json-file", "Config": {}}),
        "bounded logs",
    ),
    (
        "other log driver",
        _set("HostConfig.LogConfig", {"Type": "syslog", "Config": {}}),
        "bounded logs",
    ),
    ("restart always", _set("HostConfig.RestartPolicy", {"Name": "always"}), "no restart"),
    ("auto remove", _set("HostConfig.AutoRemove", True), "AutoRemove"),
    ("no init", _set("HostConfig.Init", None), "init"),
    ("other runtime", _set("HostConfig.Runtime", "nvidia"), "runtime"),
    ("other image", _set("Image", "sha256:" + "cd" * 32), "image"),
    ("other name", _set("Name", "/cb-node-a-j-2"), "name"),
    ("DATA_DIR moved", _env("DATA_DIR", "/etc"), "DATA_DIR"),
    ("JOB_ID changed", _env("JOB_ID", "j-2"), "JOB_ID"),
    ("assignment env lost", _env("BATCH_SIZE", "1"), "BATCH_SIZE"),
    ("label missing", _drop_label, "cloudbender.job-id"),
    ("stop signal", _set("Config.StopSignal", "SIGUSR1"), "StopSignal"),
    ("healthcheck", _set("Config.Healthcheck", {"Test": ["CMD", "true"]}), "HEALTHCHECK"),
]


@pytest.mark.parametrize(
    ("mutate", "words"), [d[1:] for d in DEVIATIONS], ids=[d[0] for d in DEVIATIONS]
)
def test_verify_attrs_catches_each_single_deviation(
    mutate: Callable[[dict[str, Any]], None], words: str
) -> None:
    spec = make_spec()
    attrs = engine_attrs(spec)
    mutate(attrs)
    problems = verify_attrs(spec, attrs)
    assert problems, "the deviation went unnoticed"
    assert any(words in p for p in problems), problems


GPU_DEVIATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no request", _set("HostConfig.DeviceRequests", None), "exactly 1"),
    (
        "all GPUs",
        _set(
            "HostConfig.DeviceRequests",
            [{"Driver": "nvidia", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]]}],
        ),
        "DeviceIDs",
    ),
    (
        "another GPU",
        _set(
            "HostConfig.DeviceRequests",
            [
                {
                    "Driver": "nvidia",
                    "Count": 0,
                    "DeviceIDs": [GPU_A, GPU_B],
                    "Capabilities": [["gpu"]],
                }
            ],
        ),
        "DeviceIDs",
    ),
    (
        "other driver",
        _set(
            "HostConfig.DeviceRequests",
            [{"Driver": "amd", "Count": 0, "DeviceIDs": [GPU_A], "Capabilities": [["gpu"]]}],
        ),
        "driver",
    ),
    ("env names another", _env("NVIDIA_VISIBLE_DEVICES", GPU_B), "NVIDIA_VISIBLE_DEVICES"),
]


@pytest.mark.parametrize(
    ("mutate", "words"), [d[1:] for d in GPU_DEVIATIONS], ids=[d[0] for d in GPU_DEVIATIONS]
)
def test_verify_attrs_holds_a_gpu_job_to_its_leased_gpus(
    mutate: Callable[[dict[str, Any]], None], words: str
) -> None:
    spec = make_spec(gpu_uuids=(GPU_A,))
    attrs = engine_attrs(spec)
    mutate(attrs)
    assert any(words in p for p in verify_attrs(spec, attrs)), verify_attrs(spec, attrs)


def _limits_of(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """Set HostConfig fields as the engine reports them for ``changes`` (unchecked)."""

    def mutate(attrs: dict[str, Any]) -> None:
        attrs["HostConfig"].update(changes)

    return mutate


@pytest.mark.parametrize(
    ("asked", "reported", "words"),
    [
        ({"cpus": 1e-10}, _limits_of(NanoCpus=0), "NanoCpus is 0"),
        ({"cpus": 1e-9}, _limits_of(NanoCpus=1), "NanoCpus is 1"),
        ({"memory_mib": 0}, _limits_of(Memory=0, MemorySwap=0), "Memory is 0"),
        (
            {"tmp_mib": 0},
            _limits_of(Tmpfs={"/tmp": tmpfs_options(make_spec(tmp_mib=0))}),
            "no positive size=",
        ),
    ],
    ids=["nano-cpus-0", "nano-cpus-1", "memory-0", "tmpfs-size-0"],
)
def test_verify_refuses_a_limit_that_means_none_even_when_the_spec_asked_for_it(
    asked: dict[str, Any], reported: Callable[[dict[str, Any]], None], words: str
) -> None:
    """Review item 4: ``cpus: 1e-10`` became NanoCpus 0, read by Docker as no limit, and
    the read-back passed because the engine reported exactly what was asked. The check
    must hold the engine to SECURITY.md §1 (a positive limit), not only to the spec."""
    spec = make_spec(**asked)
    attrs = engine_attrs(make_spec())
    reported(attrs)
    problems = verify_attrs(spec, attrs)
    assert any(words in p for p in problems), problems


def test_isolation_summary_records_settings_but_no_host_path() -> None:
    spec = make_spec()
    summary = isolation_summary(engine_attrs(spec))
    text = json.dumps(summary)
    assert "/srv/data/vitals" not in text and "/var/lib/cloudbender" not in text
    assert summary["host_config"]["NetworkMode"] == "none"
    assert summary["networks"] == ["none"]
    assert summary["nvidia_visible_devices"] == "void"
    assert [(m["target"], m["rw"]) for m in summary["mounts"]] == [
        ("/opt/data", False),
        ("/opt/model", False),
        ("/opt/output", True),
    ]


# --- container state, image references, pull stream ---------------------------------


def test_container_state_from_inspect() -> None:
    attrs = engine_attrs(make_spec())
    created = ContainerState.from_inspect(attrs)
    assert (created.status, created.exit_code, created.started_at) == ("created", None, None)
    assert created.job_id == "j-1"
    attrs["State"] = {
        "Status": "exited",
        "Running": False,
        "OOMKilled": True,
        "ExitCode": 137,
        "StartedAt": "2026-11-27T22:17:15.876887422Z",
        "FinishedAt": "2026-11-27T22:17:16.5Z",
        "Error": "",
    }
    exited = ContainerState.from_inspect(attrs)
    assert (exited.exit_code, exited.oom_killed, exited.error) == (137, True, None)
    assert exited.started_at == datetime(2026, 11, 27, 22, 17, 15, 876887, tzinfo=UTC)


DIGEST = "sha256:" + "0f" * 32


@pytest.mark.parametrize(
    ("ref", "repo", "tag", "digest"),
    [
        ("busybox", "busybox", None, None),
        ("registry.example/provider/sepsis:1.4", "registry.example/provider/sepsis", "1.4", None),
        ("127.0.0.1:5000/x:1", "127.0.0.1:5000/x", "1", None),
        ("localhost:5000/a/b", "localhost:5000/a/b", None, None),
        (f"reg.example/p/m:2@{DIGEST}", "reg.example/p/m", "2", DIGEST),
        (f"reg.example/p/m@{DIGEST}", "reg.example/p/m", None, DIGEST),
    ],
)
def test_parse_ref(ref: str, repo: str, tag: str | None, digest: str | None) -> None:
    parsed = parse_ref(ref)
    assert (parsed.repo, parsed.tag, parsed.digest) == (repo, tag, digest)


@pytest.mark.parametrize(
    "ref", ["", "UPPER/case", "a:b:c", "x@sha256:1234", "https://reg/x", "x:-tag"]
)
def test_parse_ref_refuses_what_is_not_a_reference(ref: str) -> None:
    with pytest.raises(ImageRefInvalid):
        parse_ref(ref)


def test_pinned_digest() -> None:
    assert pinned_digest(parse_ref("x:1"), None) is None
    assert pinned_digest(parse_ref("x:1"), DIGEST) == DIGEST
    assert pinned_digest(parse_ref(f"x@{DIGEST}"), None) == DIGEST
    with pytest.raises(ImageDigestMismatch):
        pinned_digest(parse_ref(f"x@{DIGEST}"), "sha256:" + "aa" * 32)
    with pytest.raises(ImageRefInvalid):
        pinned_digest(parse_ref("x:1"), "md5:abc")
    assert repo_digests({"RepoDigests": [f"reg/x@{DIGEST}"]}) == {DIGEST}


def test_scrub_and_auth_header() -> None:
    assert scrub("bad password hunter22 for u", ["hunter22", ""]) == "bad password [redacted] for u"
    header = encode_auth({"username": "u", "password": "p"})
    assert 'p"' not in header and "=" not in header.rstrip("=")


def test_json_objects_survive_any_chunking() -> None:
    stream = b'{"status":"a"}\r\n{"status":"b","progressDetail":{"current":1}}\r\n{"error":"x"}'
    for size in (1, 3, 7, len(stream)):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert [o.get("status") or o.get("error") for o in json_objects(chunks)] == ["a", "b", "x"]
    with pytest.raises(ValueError, match="middle of a message"):
        list(json_objects([b'{"status":']))


def test_pull_progress_sums_layers_and_throttles() -> None:
    progress = PullProgress(every_s=0.0)
    progress.feed(
        {"id": "l1", "status": "Downloading", "progressDetail": {"current": MIB, "total": 4 * MIB}}
    )
    line = progress.feed({"id": "l2", "status": "Pull complete"})
    assert line == {"downloaded_mib": 1.0, "known_mib": 4.0, "layers_done": 1}
    assert PullProgress(every_s=3600).feed({"status": "x"}) is None
