"""The provider's side: train a deterioration risk score and ship it as a model artifact.

A logistic regression over :data:`~agent.demo.dataset.FEATURES`, fitted with numpy on a
synthetic training cohort (never the consumer's data: the provider does not have it),
exported to ONNX with the ``onnx`` package: ``risk = sigmoid(((x - mean) / scale) @ w + b)``
as Sub, Div, MatMul, Add, Sigmoid. The artifact (protocol §6, documented in
docs/protocol.md) is a tar.gz of ``model.onnx``, ``model.json`` and ``predict.py``.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from importlib import resources

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.demo.dataset import FEATURES, Cohort

# onnxruntime 1.30 (the demo image) reads IR version 10 and opset 21; these are older
# on purpose, so that the model also loads in whatever onnxruntime a reader checks it with.
IR_VERSION = 8
OPSET = 17
INPUT, OUTPUT = "vitals", "risk"


@dataclass(frozen=True)
class RiskModel:
    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    bias: float
    holdout_auc: float


def train(cohort: Cohort, *, l2: float = 1e-3, iterations: int = 25) -> RiskModel:
    """Fit by Newton's method (IRLS) on standardized features: a few exact steps
    instead of a learning rate to tune. The last fifth of ``cohort`` is held out to
    report the AUC."""
    split = len(cohort.ids) * 4 // 5
    x, y = cohort.x[:split], cohort.deteriorated[:split].astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    z = np.column_stack([(x - mean) / scale, np.ones(split)])
    beta = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(z @ beta)))
        gradient = z.T @ (p - y) + l2 * beta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(z.shape[1])
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    weights, bias = beta[:-1], float(beta[-1])
    held = (cohort.x[split:] - mean) / scale @ weights + bias
    auc = _auc(held, cohort.deteriorated[split:])
    return RiskModel(mean, scale, weights, bias, auc)


def _auc(score: npt.NDArray[np.float64], label: npt.NDArray[np.int8]) -> float:
    """The probability that a random positive outranks a random negative (Mann-Whitney)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    positives = int(label.sum())
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    return float(
        (ranks[label == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def to_onnx(model: RiskModel) -> bytes:
    """The model as a serialized, checked ONNX graph: input ``vitals`` float32
    [N, len(FEATURES)], output ``risk`` float32 [N, 1]."""

    def const(name: str, value: npt.NDArray[np.float64]) -> onnx.TensorProto:
        return numpy_helper.from_array(value.astype(np.float32), name)

    n = len(FEATURES)
    nodes = [
        helper.make_node("Sub", [INPUT, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["standardized"]),
        helper.make_node("MatMul", ["standardized", "weights"], ["logit_raw"]),
        helper.make_node("Add", ["logit_raw", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "icu_deterioration_risk",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 1])],
        initializer=[
            const("mean", model.mean),
            const("scale", model.scale),
            const("weights", model.weights.reshape(n, 1)),
            const("bias", np.array([model.bias])),
        ],
    )
    proto = helper.make_model(
        graph,
        producer_name="cloudbender-agent demo",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    helper.set_model_props(proto, {"features": ",".join(FEATURES)})
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def predict_script() -> bytes:
    """The job's entry point, shipped inside the artifact (``agent/demo/predict.py``)."""
    return resources.files("agent.demo").joinpath("predict.py").read_bytes()


def artifact(onnx_bytes: bytes, model: RiskModel) -> bytes:
    """The model artifact: a gzipped tar of model.onnx, model.json and predict.py,
    with fixed owners, modes and times, so that the same model gives the same sha256."""
    card = {
        "name": "icu-deterioration-risk",
        "kind": "logistic regression",
        "features": list(FEATURES),
        "input": INPUT,
        "output": OUTPUT,
        "trained_on": "synthetic patients (the provider never sees the consumer's data)",
        "holdout_auc": round(model.holdout_auc, 4),
    }
    members = {
        "model.onnx": onnx_bytes,
        "model.json": (json.dumps(card, indent=2) + "\n").encode(),
        "predict.py": predict_script(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    # mtime=0 in the gzip header too: the archive's hash depends on its contents only.
    return gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0)
