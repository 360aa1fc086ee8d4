"""Run the real daemon in this process with a fake NVML: the hardware we lack, nothing else.

Usage: python tests/helpers/fake_gpu_agent.py SCENARIO CONFIG_PATH

Everything but the GPU driver is the product's own code path (``agent.service.serve``,
the NvmlBackend, the health server, signals, sd_notify).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.config import load_config
from agent.gpu.nvml import NvmlBackend
from agent.runtime.docker import DockerRuntime
from agent.service import serve
from tests.fakes.nvml import FakeNvml, two_gpu_fake


def _one_lost() -> FakeNvml:
    fake = two_gpu_fake()
    fake.gpus[1].lose()
    return fake


SCENARIOS: dict[str, Callable[[], FakeNvml]] = {
    "two_healthy": two_gpu_fake,
    "one_lost": _one_lost,
    "driver_missing": lambda: FakeNvml(driver_missing=True),
}


def main() -> int:
    scenario, config_path = sys.argv[1], Path(sys.argv[2])
    config = load_config(config_path)
    return serve(
        config,
        gpu=NvmlBackend(SCENARIOS[scenario]()),
        runtime=DockerRuntime(config.runtime.docker_host),
        config_path=config_path,
    )


if __name__ == "__main__":
    sys.exit(main())
