"""Admission: which assignments a node accepts, what it tells the control plane when it
refuses (never a host path), and the limits an accepted job actually runs with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import Config, parse_config
from agent.errors import ConfigError
from agent.gpu.base import GpuInventory, mark_allocatable
from agent.gpu.nvml import NvmlBackend
from agent.jobs.admission import (
    NO_GPU_SUPPORT,
    Admitted,
    Rejected,
    admit,
    gpu_type_matches,
)
from agent.jobs.model import REJECTION_CODES
from agent.protocol.messages import JobAssign, Resources
from tests.fakes.nvml import FakeNvml, two_gpu_fake
from tests.helpers.env import valid_config

REF = "registry.example/provider/sepsis:1.4"
DIGEST = "sha256:" + "0123456789abcdef" * 4
H100 = "NVIDIA H100 80GB HBM3"


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data = valid_config(tmp_path)
    data["runtime"] = {"allowed_images": ["registry.example/provider/*"]}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


def make_assign(**fields: Any) -> JobAssign:
    message: dict[str, Any] = {
        "type": "job.assign",
        "job_id": "j-1",
        "image": {"ref": REF},
        "datastore": "vitals",
    }
    message.update(fields)
    return JobAssign.model_validate(message)


def inventory(fake: FakeNvml | None = None, allow: Any = "all") -> GpuInventory:
    return mark_allocatable(NvmlBackend(fake or two_gpu_fake()).snapshot(), allow)


def run_admit(
    assign: JobAssign,
    config: Config,
    *,
    node_cpus: int = 64,
    gpus: GpuInventory | None = None,
    gpu_support: bool = True,
) -> Admitted | Rejected:
    return admit(
        assign,
        config,
        node_cpus=node_cpus,
        gpus=gpus if gpus is not None else inventory(),
        gpu_support=gpu_support,
    )


def rejected(result: Admitted | Rejected, code: str, tmp_path: Path) -> str:
    """The detail of a rejection with ``code``, checked to be safe to send off-site."""
    assert isinstance(result, Rejected), result
    assert result.code == code, result
    assert result.code in REJECTION_CODES
    assert result.detail
    # Datastore path, state dir and token file all live under tmp_path.
    assert str(tmp_path) not in result.detail
    assert "s3cr3t" not in result.detail
    return result.detail


def admitted(result: Admitted | Rejected) -> Admitted:
    assert isinstance(result, Admitted), result
    return result


# -- accepted jobs and their limits ---------------------------------------------------


def test_minimal_assignment_gets_the_config_caps(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        limits={"max_cpus": 8, "max_memory_mib": 4096, "max_timeout_s": 600},
        results={"max_bytes": 5000, "max_files": 7},
    )
    job = admitted(run_admit(make_assign(), config))
    assert (job.job_id, job.image_ref, job.image_digest, job.image_auth) == ("j-1", REF, None, None)
    assert job.datastore == config.datastores[0]
    assert (job.command, dict(job.env), job.model) == (None, {}, None)
    assert (job.cpus, job.memory_mib, job.timeout_s) == (8.0, 4096, 600)
    assert (job.pids, job.tmp_mib) == (config.limits.pids, config.limits.tmp_mib)
    assert (job.gpu_count, job.gpu_types) == (0, None)
    assert (job.max_result_bytes, job.max_result_files) == (5000, 7)


def test_full_assignment_runs_as_asked(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assign = make_assign(
        image={"ref": REF, "digest": DIGEST, "auth": {"username": "u", "password": "pw-hunter2"}},
        model={"artifact": "mdl-9", "sha256": "ab" * 32, "size": 10},
        command=["python", "/opt/model/predict.py"],
        env={"BATCH_SIZE": "64"},
        gpus={"count": 1, "types": [H100]},
        resources={"cpus": 2.5, "memory_mib": 1024},
        timeout_s=60,
    )
    job = admitted(run_admit(assign, config))
    assert job.image_digest == DIGEST
    assert job.image_auth is not None and job.image_auth.username == "u"
    assert job.model is not None and job.model.artifact == "mdl-9"
    assert job.command == ("python", "/opt/model/predict.py")
    assert dict(job.env) == {"BATCH_SIZE": "64"}
    assert (job.cpus, job.memory_mib, job.timeout_s) == (2.5, 1024, 60)
    assert (job.gpu_count, job.gpu_types) == (1, (H100,))
    assert "pw-hunter2" not in repr(job)
    with pytest.raises(TypeError):
        job.env["BATCH_SIZE"] = "1"  # type: ignore[index]


@pytest.mark.parametrize(("max_cpus", "node_cpus", "expected"), [(16, 4, 4.0), (2, 64, 2.0)])
def test_default_cpus_are_never_more_than_the_node_has(
    tmp_path: Path, max_cpus: int, node_cpus: int, expected: float
) -> None:
    config = make_config(tmp_path, limits={"max_cpus": max_cpus})
    job = admitted(run_admit(make_assign(), config, node_cpus=node_cpus))
    assert job.cpus == expected


def test_asking_for_more_cpus_than_the_node_has_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"max_cpus": 16})
    assign = make_assign(resources={"cpus": 6})
    detail = rejected(run_admit(assign, config, node_cpus=4), "limits_exceeded", tmp_path)
    assert "resources.cpus 6" in detail and "(4)" in detail
    assert admitted(run_admit(make_assign(resources={"cpus": 4}), config, node_cpus=4)).cpus == 4


def test_every_exceeded_limit_is_named(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, limits={"max_cpus": 8, "max_memory_mib": 4096, "max_timeout_s": 600}
    )
    assign = make_assign(resources={"cpus": 9, "memory_mib": 4097}, timeout_s=601)
    detail = rejected(run_admit(assign, config), "limits_exceeded", tmp_path)
    assert "resources.cpus 9" in detail
    assert "resources.memory_mib 4097" in detail and "4096" in detail
    assert "timeout_s 601" in detail and "600" in detail


def test_limits_at_the_caps_are_accepted(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, limits={"max_cpus": 8, "max_memory_mib": 4096, "max_timeout_s": 600}
    )
    assign = make_assign(resources={"cpus": 8, "memory_mib": 4096}, timeout_s=600)
    job = admitted(run_admit(assign, config))
    assert (job.cpus, job.memory_mib, job.timeout_s) == (8.0, 4096, 600)


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ({}, (1000, 10)),
        ({"max_bytes": 400, "max_files": 3}, (400, 3)),
        ({"max_bytes": 10**12, "max_files": 10**6}, (1000, 10)),
        ({"max_bytes": 400}, (400, 10)),
    ],
)
def test_result_limits_can_only_tighten(
    tmp_path: Path, asked: dict[str, int], expected: tuple[int, int]
) -> None:
    config = make_config(tmp_path, results={"max_bytes": 1000, "max_files": 10})
    job = admitted(run_admit(make_assign(results=asked), config))
    assert (job.max_result_bytes, job.max_result_files) == expected


# -- bad_spec ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["JOB_ID", "DATA_DIR", "OUTPUT_DIR", "NVIDIA_VISIBLE_DEVICES"])
def test_env_cannot_override_what_the_agent_sets(tmp_path: Path, name: str) -> None:
    assign = make_assign(env={"OK": "1", name: "x"})
    detail = rejected(run_admit(assign, make_config(tmp_path)), "bad_spec", tmp_path)
    assert name in detail


def test_empty_command_is_refused(tmp_path: Path) -> None:
    detail = rejected(
        run_admit(make_assign(command=[]), make_config(tmp_path)), "bad_spec", tmp_path
    )
    assert "command" in detail


def test_harmless_oddities_are_accepted(tmp_path: Path) -> None:
    config = make_config(tmp_path, runtime={"pull": False})
    assign = make_assign(
        gpus={"count": 0, "types": ["NVIDIA Nonexistent"]},
        image={"ref": REF, "auth": {"username": "u", "password": "p"}},
    )
    job = admitted(run_admit(assign, config, gpus=GpuInventory.unavailable("no driver")))
    assert job.gpu_count == 0


# -- unknown_datastore --------------------------------------------------------------------


def test_unknown_datastore_names_the_offered_ones_but_not_their_paths(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    detail = rejected(
        run_admit(make_assign(datastore="claims"), config), "unknown_datastore", tmp_path
    )
    assert "'claims'" in detail and "vitals" in detail
    assert str(config.datastores[0].path) not in detail


# -- image_not_allowed --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "ref", "allowed"),
    [
        (["registry.example/provider/*"], REF, True),
        (["registry.example/provider/sepsis:1.?"], REF, True),
        ([REF], REF, True),
        (["other.example/*", "registry.example/*/sepsis:*"], REF, True),
        (["registry.example/provider"], REF, False),
        (["Registry.Example/provider/*"], REF, False),
        (["registry.example/provider/*"], "registry.example/providerx/sepsis:1.4", False),
        (["docker.io/library/*"], "ubuntu:22.04", False),
    ],
)
def test_allowed_images_are_fnmatch_patterns_on_the_ref_as_written(
    tmp_path: Path, patterns: list[str], ref: str, allowed: bool
) -> None:
    config = make_config(tmp_path, runtime={"allowed_images": patterns})
    result = run_admit(make_assign(image={"ref": ref}), config)
    if allowed:
        admitted(result)
    else:
        assert "allowed_images" in rejected(result, "image_not_allowed", tmp_path)


def test_no_allowed_images_allows_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, runtime={"allowed_images": []})
    detail = rejected(run_admit(make_assign(), config), "image_not_allowed", tmp_path)
    assert "allowed_images is empty" in detail


def test_require_digest_refuses_an_unpinned_image(tmp_path: Path) -> None:
    config = make_config(tmp_path, runtime={"require_digest": True})
    detail = rejected(run_admit(make_assign(), config), "image_not_allowed", tmp_path)
    assert "requires image.digest" in detail
    pinned = make_assign(image={"ref": REF, "digest": DIGEST})
    assert admitted(run_admit(pinned, config)).image_digest == DIGEST


# -- gpu_type_unavailable -----------------------------------------------------------------


def test_gpus_on_an_engine_without_gpu_support_are_refused(tmp_path: Path) -> None:
    result = run_admit(make_assign(gpus={"count": 1}), make_config(tmp_path), gpu_support=False)
    assert rejected(result, "gpu_type_unavailable", tmp_path) == NO_GPU_SUPPORT


def test_more_gpus_than_the_node_has_are_refused(tmp_path: Path) -> None:
    result = run_admit(make_assign(gpus={"count": 3}), make_config(tmp_path))
    detail = rejected(result, "gpu_type_unavailable", tmp_path)
    assert "3" in detail and "has 2 allocatable" in detail
    assert admitted(run_admit(make_assign(gpus={"count": 2}), make_config(tmp_path)))


def test_a_gpu_type_the_node_lacks_is_refused_with_the_types_it_has(tmp_path: Path) -> None:
    assign = make_assign(gpus={"count": 1, "types": ["NVIDIA A100-SXM4-80GB"]})
    detail = rejected(run_admit(assign, make_config(tmp_path)), "gpu_type_unavailable", tmp_path)
    assert "has 0 allocatable" in detail and H100 in detail


def test_empty_types_accept_any_gpu(tmp_path: Path) -> None:
    job = admitted(run_admit(make_assign(gpus={"count": 2, "types": []}), make_config(tmp_path)))
    assert (job.gpu_count, job.gpu_types) == (2, None)


def test_lost_and_excluded_gpus_do_not_count(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fake = two_gpu_fake()
    fake.gpus[1].lose()
    two = make_assign(gpus={"count": 2})
    rejected(run_admit(two, config, gpus=inventory(fake)), "gpu_type_unavailable", tmp_path)
    rejected(run_admit(two, config, gpus=inventory(allow=(0,))), "gpu_type_unavailable", tmp_path)
    admitted(run_admit(make_assign(gpus={"count": 1}), config, gpus=inventory(fake)))


def test_a_node_without_gpu_driver_refuses_gpu_jobs_only(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    none = GpuInventory.unavailable("NVIDIA driver not loaded")
    result = run_admit(make_assign(gpus={"count": 1}), config, gpus=none)
    assert "has 0 allocatable" in rejected(result, "gpu_type_unavailable", tmp_path)
    result = admit(make_assign(gpus={"count": 1}), config, node_cpus=4, gpus=None, gpu_support=True)
    rejected(result, "gpu_type_unavailable", tmp_path)
    admitted(run_admit(make_assign(), config, gpus=none))


def test_gpu_type_matches_exact_names() -> None:
    gpu = inventory().gpus[0]
    assert gpu_type_matches(gpu, None)
    assert gpu_type_matches(gpu, ())
    assert gpu_type_matches(gpu, ("NVIDIA A100-SXM4-80GB", H100))
    assert not gpu_type_matches(gpu, ("NVIDIA H100",))
    assert not gpu_type_matches(gpu, (H100.lower(),))


# -- order, and details that never leak ------------------------------------------------


def test_checks_run_in_protocol_order(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"max_cpus": 2})
    everything_wrong: dict[str, Any] = {
        "env": {"JOB_ID": "x"},
        "datastore": "claims",
        "image": {"ref": "evil.example/x:1"},
        "gpus": {"count": 9},
        "resources": {"cpus": 99},
    }
    order = ["env", "datastore", "image", "gpus", "resources"]
    codes = [
        "bad_spec",
        "unknown_datastore",
        "image_not_allowed",
        "gpu_type_unavailable",
        "limits_exceeded",
    ]
    for i, code in enumerate(codes):
        fields = {key: everything_wrong[key] for key in order[i:]}
        rejected(run_admit(make_assign(**fields), config), code, tmp_path)


def test_node_cpus_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="node_cpus"):
        admit(make_assign(), make_config(tmp_path), node_cpus=0, gpus=None, gpu_support=False)


# -- limits that would mean "no limit" to the engine (review item 4) ---------------------


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"max_cpus": 1e-10}, "max_cpus"),  # NanoCpus 0: no CPU limit
        ({"max_cpus": 0.009}, "max_cpus"),
        ({"max_memory_mib": 0}, "max_memory_mib"),  # Memory 0: no memory limit
        ({"max_memory_mib": 5}, "max_memory_mib"),  # below Docker's 6 MiB minimum
        ({"pids": 0}, "pids"),  # PidsLimit 0 or -1: no process limit
        ({"pids": -1}, "pids"),
        ({"tmp_mib": 0}, "tmp_mib"),  # tmpfs size=0: no /tmp limit
    ],
)
def test_config_caps_that_mean_no_limit_are_refused(
    tmp_path: Path, limits: dict[str, Any], key: str
) -> None:
    """A consumer's config whose cap the engine would read as none: every job unlimited."""
    with pytest.raises(ConfigError, match=key):
        make_config(tmp_path, limits=limits)


def test_the_smallest_config_caps_are_real_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"max_cpus": 0.01, "max_memory_mib": 6})
    job = admitted(run_admit(make_assign(), config))
    assert (job.cpus, job.memory_mib) == (0.01, 6)


def test_an_assignment_built_in_code_cannot_ask_for_no_cpu_limit(tmp_path: Path) -> None:
    """Review item 4 from inside: cpus 1e-10 that bypassed the protocol model's minimum."""
    assign = make_assign().model_copy(update={"resources": Resources.model_construct(cpus=1e-10)})
    detail = rejected(run_admit(assign, make_config(tmp_path)), "bad_spec", tmp_path)
    assert "resources.cpus" in detail and "0.01" in detail


def test_cpus_below_the_minimum_never_reach_admission() -> None:
    """Review item 4: ``resources.cpus: 1e-10`` is refused as the assignment is parsed."""
    with pytest.raises(ValidationError, match=r"resources\.cpus"):
        make_assign(resources={"cpus": 1e-10})


def test_node_refusals_come_in_order_and_name_the_limit() -> None:
    """Slots first, then the ack backlog, then the disk floor (limits.min_free_mib): a
    node whose state directory is nearly full refuses new jobs no_space, saying why."""
    from agent.config.models import LimitsConfig
    from agent.jobs.admission import ACK_BACKLOG_PER_SLOT, node_refusal

    limits = LimitsConfig(max_concurrent_jobs=2, min_free_mib=2048)
    ok = node_refusal(limits, active=1, ended_unacked=0, free_mib=4096)
    assert ok is None
    full = node_refusal(limits, active=2, ended_unacked=0, free_mib=0)
    assert full is not None and (full.code, full.detail) == (
        "no_capacity",
        "all 2 job slots are busy",
    )
    backlog = node_refusal(limits, active=0, ended_unacked=ACK_BACKLOG_PER_SLOT * 2, free_mib=0)
    assert backlog is not None and backlog.code == "no_capacity"
    disk = node_refusal(limits, active=0, ended_unacked=0, free_mib=2047)
    assert disk is not None and disk.code == "no_space"
    assert "limits.min_free_mib" in disk.detail
    assert node_refusal(limits, active=0, ended_unacked=0, free_mib=None) is None
