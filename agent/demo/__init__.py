"""``cloudbender-agent demo``: one real federated inference job, end to end, on loopback.

The demo plays both sides on one machine. As the consumer it writes a synthetic ICU
dataset (:mod:`agent.demo.dataset`) into a datastore and runs a real agent process; as
the provider it trains a small risk model, exports it to ONNX and ships it as a model
artifact (:mod:`agent.demo.riskmodel`) through the reference control plane, then
assigns one job that scores every patient inside the demo image
(``scripts/build-demo-image.sh``) and tries, and fails, to reach the network
(:mod:`agent.demo.predict`). :mod:`agent.demo.run` drives it and tells a person what
stayed, what ran and how, and what left.

Needs the ``demo`` extra (numpy, onnx), root (the agent loop-mounts job outputs) and a
Docker engine. Everything the demo raises derives from :class:`DemoError`.
"""

from __future__ import annotations

from agent.errors import AgentError

DEMO_IMAGE = "cloudbender-demo/onnx:latest"


class DemoError(AgentError):
    """The demo could not run, or what it saw contradicts what it set out to show."""
