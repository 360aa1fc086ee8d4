"""Hypothesis strategies for frames a control plane might send: garbage and near-misses."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from agent.protocol.frames import encode_binary

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
known_types = st.sampled_from(
    [
        "welcome",
        "error",
        "job.assign",
        "job.ack",
        "job.cancel",
        "result.resume",
        "result.ack",
        "result.accepted",
        "result.rejected",
        "artifact.end",
        "artifact.chunk",
        "hello",
        "x",
    ]
)
shaped = st.builds(
    lambda t, extra: json.dumps({"type": t, **extra}),
    known_types,
    st.dictionaries(
        st.sampled_from(
            [
                "job_id",
                "session",
                "heartbeat_s",
                "code",
                "file",
                "offset",
                "offsets",
                "image",
                "datastore",
                "gpus",
                "artifact",
                "size",
                "sha256",
            ]
        ),
        json_values,
        max_size=6,
    ),
)

shaped_binary = st.builds(
    lambda t, offset, payload: encode_binary(
        {"type": t, "artifact": "m", "offset": offset}, payload
    ),
    st.sampled_from(["artifact.chunk", "result.chunk", "x"]),
    json_values,
    st.binary(max_size=64),
)

frames = st.one_of(st.text(), shaped, st.binary(), shaped_binary)
