"""Which way the engine gives GPUs (agent.runtime.gpupath), the request each way makes,
and the post-start device check's parsing (agent.runtime.gpucheck), on recorded
``docker info`` outputs, toolkit configs and device lists."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.config.models import LimitsConfig
from agent.doctor_checks import gpu_runtime
from agent.health.facts import NodeFacts
from agent.health.status import _runtime_row
from agent.jobs.admission import Admitted
from agent.runtime.base import ContainerSpec, RuntimeInfo
from agent.runtime.gpucheck import (
    DeviceAccess,
    access_problems,
    driver_minors,
    parse_devices_list,
)
from agent.runtime.gpupath import (
    CdiSpec,
    choose_gpu_path,
    parse_cdi_spec,
    parse_toolkit_config,
    probe_gpu_path,
)
from agent.runtime.spec import create_kwargs
from agent.runtime.verify import verify_attrs
from tests.unit.test_admission import make_assign, make_config, run_admit

UUID_A = "GPU-8f6c1d2e-0000-1111-2222-333344445555"
UUID_B = "GPU-1a2b3c4d-6666-7777-8888-999900001111"

# Trimmed from real `docker info --format '{{json .}}'` answers.
DOCKER_24_TOOLKIT = {
    "ServerVersion": "24.0.7",
    "Runtimes": {
        "io.containerd.runc.v2": {"path": "runc"},
        "nvidia": {"path": "nvidia-container-runtime"},
        "runc": {"path": "runc"},
    },
    "DefaultRuntime": "runc",
}
DOCKER_27_CDI = {
    "ServerVersion": "27.3.1",
    "Runtimes": {"io.containerd.runc.v2": {"path": "runc"}, "runc": {"path": "runc"}},
    "DefaultRuntime": "runc",
    "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
}
DOCKER_20_BARE = {"ServerVersion": "20.10.24", "Runtimes": {"runc": {"path": "runc"}}}

# What `nvidia-ctk cdi generate` writes (devices named by index and by UUID).
CDI_YAML = f"""---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: {UUID_A}
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: all
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
"""
TOOLKIT_DEFAULT = """
disable-require = false
#accept-nvidia-visible-devices-envvar-when-unprivileged = true
[nvidia-container-cli]
ldconfig = "@/sbin/ldconfig.real"
[nvidia-container-runtime]
log-level = "info"
mode = "auto"
runtimes = ["docker-runc", "runc", "crun"]
"""
TOOLKIT_CDI_MODE = TOOLKIT_DEFAULT.replace('mode = "auto"', 'mode = "cdi"')
TOOLKIT_ENVVAR_FALSE = TOOLKIT_DEFAULT.replace(
    "#accept-nvidia-visible-devices-envvar-when-unprivileged = true",
    "accept-nvidia-visible-devices-envvar-when-unprivileged = false",
)
HOOK = "/usr/bin/nvidia-container-runtime-hook"


def cdi_spec() -> CdiSpec:
    spec = parse_cdi_spec(Path("/etc/cdi/nvidia.yaml"), CDI_YAML)
    assert spec is not None
    return spec


def test_legacy_hook_present_gives_the_legacy_path() -> None:
    """Attack: a host with the hook was judged by its 'nvidia' runtime entry; the path
    must come from the hook itself, the way Docker registers its nvidia driver."""
    path = choose_gpu_path(DOCKER_24_TOOLKIT, parse_toolkit_config(TOOLKIT_DEFAULT), HOOK, [])
    assert path.kind == "legacy"
    assert HOOK in path.why
    # The runtime entry is not what counts: without it the hook still serves requests.
    bare = choose_gpu_path(DOCKER_20_BARE, None, HOOK, [])
    assert bare.kind == "legacy"


def test_cdi_only_gives_the_cdi_path_not_the_nvidia_driver() -> None:
    """Attack: a CDI-only host was reported able and every GPU job failed at start
    with "could not select device driver" (the nvidia driver needs the hook)."""
    path = choose_gpu_path(DOCKER_27_CDI, None, None, [cdi_spec()])
    assert path.kind == "cdi"
    assert "/etc/cdi/nvidia.yaml" in path.why


def test_cdi_mode_makes_the_hook_refuse_and_says_so() -> None:
    """Attack: with the toolkit in cdi mode the hook refuses Docker's nvidia requests;
    the engine must not be reported able through the hook."""
    toolkit = parse_toolkit_config(TOOLKIT_CDI_MODE)
    path = choose_gpu_path(DOCKER_27_CDI, toolkit, HOOK, [])
    assert path.kind is None
    assert "mode is 'cdi'" in path.why and "refuses" in path.why
    assert "no NVIDIA CDI spec" in path.why
    # With a spec the same host works, through CDI.
    assert choose_gpu_path(DOCKER_27_CDI, toolkit, HOOK, [cdi_spec()]).kind == "cdi"


def test_envvar_false_is_refused_because_jobs_would_get_no_gpu() -> None:
    """Attack: the old README's advice (envvar-when-unprivileged = false) made every
    GPU job start with zero GPUs, silently."""
    toolkit = parse_toolkit_config(TOOLKIT_ENVVAR_FALSE)
    assert toolkit.accept_envvar_unprivileged is False
    path = choose_gpu_path(DOCKER_24_TOOLKIT, toolkit, HOOK, [])
    assert path.kind is None
    assert "= false" in path.why and "without its GPUs" in path.why
    assert path.describe().startswith("cannot give GPUs: ")


def test_nothing_installed_cannot_give_gpus_and_names_both_reasons() -> None:
    """Attack: an engine without any NVIDIA support must not be offered GPU jobs."""
    path = choose_gpu_path(DOCKER_20_BARE, None, None, [])
    assert path.kind is None
    assert "Docker 25+" in path.why
    assert "nvidia-container-runtime-hook is not installed" in path.why


def test_a_cdi_spec_without_uuid_names_is_not_used() -> None:
    """Attack: a spec naming GPUs only by index cannot serve nvidia.com/gpu=<UUID>."""
    text = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n"
    spec = parse_cdi_spec(Path("/etc/cdi/nvidia.yaml"), text)
    assert spec is not None
    path = choose_gpu_path(DOCKER_27_CDI, None, None, [spec])
    assert path.kind is None and "device-name-strategy" in path.why
    assert parse_cdi_spec(Path("x.yaml"), "kind: vendor.com/fpga\n") is None


def test_probe_reads_the_files_of_the_host(tmp_path: Path) -> None:
    """Attack: a broken toolkit config must not be taken for the defaults."""
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(CDI_YAML)
    config = tmp_path / "config.toml"
    assert probe_gpu_path(DOCKER_20_BARE, cdi_dirs=[cdi], toolkit_config=config).kind == "cdi"
    hooks = tmp_path / "bin"
    hooks.mkdir()
    (hooks / "nvidia-container-runtime-hook").write_text("#!/bin/sh\n")
    config.write_text("this is [not toml")
    path = probe_gpu_path(DOCKER_20_BARE, toolkit_config=config, hook_dirs=[hooks])
    assert path.kind is None and "cannot parse" in path.why
    config.write_text(TOOLKIT_DEFAULT)
    path = probe_gpu_path(DOCKER_20_BARE, toolkit_config=config, hook_dirs=[hooks])
    assert path.kind == "legacy"


def spec(gpus: tuple[str, ...]) -> ContainerSpec:
    return ContainerSpec(
        job_id="j1",
        node_id="n1",
        image="reg/p/img:1",
        image_id="sha256:" + "a" * 64,
        command=["run"],
        env={},
        user="1000:1000",
        data_dir=Path("/srv/data"),
        model_dir=None,
        output_dir=Path("/var/lib/cb/out/j1"),
        cpus=1,
        memory_mib=512,
        pids=64,
        tmp_mib=64,
        gpu_uuids=gpus,
    )


def request_attrs(request: dict[str, Any]) -> dict[str, Any]:
    return {"HostConfig": {"DeviceRequests": [request]}}


def gpu_problems(s: ContainerSpec, attrs: dict[str, Any]) -> list[str]:
    return [p for p in verify_attrs(s, attrs) if p.startswith("only the leased GPUs")]


def test_each_path_requests_exactly_the_leased_uuids() -> None:
    """Attack: a request for other GPUs (or a count) than the lease must be refused
    by the read-back, whichever driver carries it."""
    s = spec((UUID_A, UUID_B))
    cdi = create_kwargs(s, "cdi")["device_requests"]
    assert cdi == [
        {"driver": "cdi", "device_ids": [f"nvidia.com/gpu={UUID_A}", f"nvidia.com/gpu={UUID_B}"]}
    ]
    legacy = create_kwargs(s, "legacy")["device_requests"]
    assert legacy == [
        {"driver": "nvidia", "device_ids": [UUID_A, UUID_B], "capabilities": [["gpu"]]}
    ]
    as_engine_reports = {"Driver": "cdi", "DeviceIDs": cdi[0]["device_ids"], "Capabilities": None}
    assert gpu_problems(s, request_attrs(as_engine_reports)) == []
    wrong = {**as_engine_reports, "DeviceIDs": ["nvidia.com/gpu=all"]}
    assert gpu_problems(s, request_attrs(wrong))
    legacy_seen = {"Driver": "nvidia", "DeviceIDs": [UUID_A, UUID_B], "Capabilities": [["gpu"]]}
    assert gpu_problems(s, request_attrs(legacy_seen)) == []
    assert gpu_problems(s, request_attrs({**legacy_seen, "Driver": "other"}))


DOCKER_DEFAULT_LIST = """c *:* m
b *:* m
c 1:3 rwm
c 1:5 rwm
c 1:7 rwm
c 1:8 rwm
c 1:9 rwm
c 5:0 rwm
c 5:1 rwm
c 5:2 rwm
c 136:* rwm
c 10:200 rwm
"""


def test_device_lists_give_the_gpu_minors_a_container_may_open() -> None:
    """Attack: a container that may open another GPU, or every device, must be seen."""
    none = parse_devices_list(DOCKER_DEFAULT_LIST, "x")
    assert (none.minors, none.all_gpus) == (frozenset(), False)
    legacy = parse_devices_list(DOCKER_DEFAULT_LIST + "c 195:255 rwm\nc 195:1 rw\n", "x")
    assert legacy.minors == {1}  # nvidiactl is no GPU
    assert parse_devices_list("a *:* rwm\n", "x").all_gpus
    assert parse_devices_list("c 195:* rw\n", "x").all_gpus


@pytest.mark.parametrize(
    ("leased", "minors", "all_gpus", "words"),
    [
        ((UUID_A,), set(), False, f"leased GPU {UUID_A} (/dev/nvidia0) is missing"),
        ((UUID_A,), {0, 1}, False, f"/dev/nvidia1 ({UUID_B}) is open to the container"),
        ((), {0}, False, "/dev/nvidia0"),
        ((), set(), True, "every NVIDIA GPU"),
        (("GPU-unknown",), {0}, False, "GPU-unknown is not among the driver's GPUs"),
    ],
)
def test_access_problems_name_what_differs_from_the_lease(
    leased: tuple[str, ...], minors: set[int], all_gpus: bool, words: str
) -> None:
    """Attack: a job without its GPU (it would run on the CPU), with a GPU it did not
    lease, or a job without a lease that can open a GPU, must not start unnoticed."""
    access = DeviceAccess(frozenset(minors), all_gpus, "test")
    problems = access_problems(leased, {UUID_A: 0, UUID_B: 1}, access)
    assert any(words in p for p in problems), problems
    assert access_problems((UUID_A,), {UUID_A: 0}, DeviceAccess(frozenset({0}), False, "t")) == []


def test_driver_minors_come_from_the_driver_proc_files(tmp_path: Path) -> None:
    """Attack: a UUID mapped to the wrong /dev/nvidia<N> would pass a job another GPU."""
    for bus, uuid, minor in (("0000:17:00.0", UUID_A, 3), ("0000:65:00.0", UUID_B, 0)):
        (tmp_path / bus).mkdir()
        text = (
            f"Model: \t\t NVIDIA H200\nIRQ:   \t\t 18\n"
            f"GPU UUID: \t {uuid}\nDevice Minor: \t {minor}\n"
        )
        (tmp_path / bus / "information").write_text(text)
    assert driver_minors(tmp_path) == {UUID_A: 3, UUID_B: 0}
    assert driver_minors(tmp_path / "absent") == {}


def test_shm_is_sized_by_config_and_the_unit_waits_for_the_driver(tmp_path: Path) -> None:
    """Attack: Docker's default 64 MiB /dev/shm breaks NCCL across GPUs; an agent that
    starts before the driver sees no GPU."""
    assert LimitsConfig().shm_mib == 1024
    config = make_config(tmp_path, limits={"shm_mib": 4096})
    admitted = run_admit(make_assign(), config)
    assert isinstance(admitted, Admitted) and admitted.shm_mib == 4096
    with_shm = replace(spec(()), shm_mib=admitted.shm_mib)
    assert create_kwargs(with_shm)["shm_size"] == 4096 * 1024 * 1024
    unit = Path(__file__).parents[2] / "systemd" / "cloudbender-agent.service"
    after = [line for line in unit.read_text().splitlines() if line.startswith("After=")]
    assert after and "nvidia-persistenced.service" in after[0].split("=", 1)[1].split()


def test_doctor_and_status_say_which_path_and_why() -> None:
    """Attack: a person told "NVIDIA support: ok" on a host whose hook would refuse
    every GPU job; the path and its reason must be shown."""
    why = "the engine has CDI and /etc/cdi/nvidia.yaml names the GPUs by UUID"
    able = RuntimeInfo("docker", "27.3.1", True, True, None, "cdi", why)
    check = gpu_runtime(2, None, able)
    assert check.mark == "ok" and f"through cdi: {why}" in check.what
    refusing = choose_gpu_path(DOCKER_24_TOOLKIT, parse_toolkit_config(TOOLKIT_CDI_MODE), HOOK, [])
    unable = RuntimeInfo("docker", "24.0.7", False, True, None, None, refusing.why)
    check = gpu_runtime(2, None, unable)
    assert check.mark == "fail" and "cannot give GPUs" in check.what
    assert "mode is 'cdi'" in check.what
    row = _runtime_row(NodeFacts(runtime=able))
    assert row is not None and (row["gpu_path"], row["gpu_why"]) == ("cdi", why)
    # hello's runtime object keeps the protocol's three keys.
    assert set(able.to_dict()) == {"engine", "version", "gpu_support"}


def test_a_process_shown_in_the_root_cgroup_is_not_read_as_the_container(tmp_path: Path) -> None:
    """Attack (a race seen in CI): a job that exits at once is checked after its cgroup
    is gone; its /proc entry then names the root cgroup, whose devices.list allows every
    device, and a job without GPUs was killed as "may open every NVIDIA GPU"."""
    from agent.runtime.gpucheck import container_access

    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("12:devices:/\n11:memory:/\n")
    (cgroups / "devices").mkdir(parents=True)
    (cgroups / "devices" / "devices.list").write_text("a *:* rwm\n")
    assert container_access(42, proc=proc, cgroup_root=cgroups) is None
    (proc / "42" / "cgroup").write_text("12:devices:/docker/abc\n")
    (cgroups / "devices" / "docker" / "abc").mkdir(parents=True)
    (cgroups / "devices" / "docker" / "abc" / "devices.list").write_text("c 1:3 rwm\n")
    access = container_access(42, proc=proc, cgroup_root=cgroups)
    assert access is not None and not access.minors and not access.all_gpus
