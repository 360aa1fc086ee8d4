"""A job and its results over ``wss://`` with mutual TLS, on the real engine (issue 15).

Every real deployment dials ``wss://``, many with client certificates; until this test
no job had ever run over a TLS session, let alone a mutually authenticated one.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import docker

from agent.controlplane.mtls import server_context
from tests.helpers.certs import TestCA
from tests.helpers.jobnode import job_node


def test_a_job_and_its_results_run_over_mutual_tls(
    tmp_path: Path, docker_client: docker.DockerClient, test_image: str
) -> None:
    """The whole path, job.assign to accepted result files, through a TLS session in
    which both sides proved who they are: no plaintext fallback, no skipped check."""
    node_id = f"mtls-{uuid.uuid4().hex[:10]}"
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("server", "cp", ip="127.0.0.1", server=True)
    client = ca.issue("client", node_id)
    tls = {"ca_file": str(ca.cert), "client_cert": str(client.cert), "client_key": str(client.key)}
    with job_node(
        tmp_path / "node",
        docker_client,
        node_id=node_id,
        cp_options={"ssl": server_context(server.cert, server.key, ca.cert)},
        control_plane=tls,
    ) as node:
        assert node.cp.url.startswith("wss://")
        script = (
            "wc -l < /opt/data/vitals.csv > /opt/output/rows.txt && "
            "dd if=/dev/urandom of=/opt/output/blob.bin bs=1M count=3 2>/dev/null"
        )
        node.assign("j-mtls", script)
        end = node.wait_end("j-mtls", timeout=120)
        assert (end["state"], end["reason"]) == ("succeeded", "completed"), node.agent.log()[-3000:]
        files = node.cp.result_files(node_id, "j-mtls")
        (sent,) = node.messages("result.manifest", "j-mtls")[:1]
        presented = node.cp.client_certs[node_id]
    assert files["rows.txt"].read_text().strip() == "3"
    by_path = {f["path"]: f for f in sent["files"]}
    blob = files["blob.bin"].read_bytes()
    assert len(blob) == 3 * 1024 * 1024
    assert hashlib.sha256(blob).hexdigest() == by_path["blob.bin"]["sha256"]
    assert [(c.common_name, c.serial) for c in presented] == [(node_id, client.serial)]
