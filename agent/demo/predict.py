"""The demo job's entry point: ``python3 /opt/model/predict.py`` in the demo image.

Not imported by the agent: :mod:`agent.demo.riskmodel` ships this file inside the model
artifact, and it runs in the job container, as the provider's code would. It reads every
``/opt/data/*.csv`` (the consumer's datastore, read-only), scores each patient with the
ONNX model in ``$MODEL_DIR`` (``/opt/model``), and writes to ``/opt/output``:

- ``scores.csv``: ``patient_id,risk`` per patient, risk as float32 printed exactly;
- ``summary.json``: counts, mean risk, runtime versions; no patient data;
- ``egress.txt``: one line per connection it tried to open to the outside, each
  ``blocked`` (with the error) or ``CONNECTED``. The container has no network, so
  each attempt fails at once; the demo shows the lines and fails if any connected.

Standard library, numpy and onnxruntime only (what the image has).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import socket
import sys

import numpy as np
import onnxruntime as ort  # type: ignore[import-not-found,import-untyped,unused-ignore]

DATA, OUTPUT = "/opt/data", "/opt/output"
MODEL_DIR = os.environ.get("MODEL_DIR", "/opt/model")
# The docker bridge's usual host address, on two ports: a job with any network would
# reach the host there. (Only the bridge: the demo never aims at an outside address.)
EGRESS_TARGETS = (("172.17.0.1", 80), ("172.17.0.1", 443))
HIGH_RISK = 0.5


def try_egress() -> list[str]:
    lines = []
    for host, port in EGRESS_TARGETS:
        try:
            with socket.create_connection((host, port), timeout=3):
                lines.append(f"{host}:{port} CONNECTED")
        except OSError as exc:
            lines.append(f"{host}:{port} blocked ({type(exc).__name__}: {exc.strerror or exc})")
    return lines


def main() -> int:
    with open(os.path.join(MODEL_DIR, "model.json")) as f:
        card = json.load(f)
    features = card["features"]
    ids: list[str] = []
    rows: list[list[float]] = []
    files = sorted(glob.glob(os.path.join(DATA, "*.csv")))
    for path in files:
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                ids.append(record["patient_id"])
                rows.append([float(record[name]) for name in features])
    x = np.array(rows, dtype=np.float32).reshape(len(rows), len(features))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the job's CPU cap; and the same sums every run
    options.log_severity_level = 3  # errors only: no telemetry notes in the job's log
    session = ort.InferenceSession(
        os.path.join(MODEL_DIR, "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    risk = session.run([card["output"]], {card["input"]: x})[0].reshape(-1)

    with open(os.path.join(OUTPUT, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["patient_id", "risk"])
        for pid, value in zip(ids, risk.tolist(), strict=True):
            writer.writerow([pid, repr(value)])
    summary = {
        "model": card["name"],
        "input_files": [os.path.basename(p) for p in files],
        "patients": len(ids),
        "high_risk": int((risk >= HIGH_RISK).sum()),
        "high_risk_threshold": HIGH_RISK,
        "mean_risk": round(float(risk.mean()), 6) if len(ids) else None,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(OUTPUT, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    with open(os.path.join(OUTPUT, "egress.txt"), "w") as f:
        f.write("".join(line + "\n" for line in try_egress()))
    print(f"scored {len(ids)} patients from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
