"""Synthetic ICU vital signs: the consumer's "sensitive" data, made up from a seed.

The same seed gives byte-identical CSV on every machine (numpy's PCG64 stream, fixed
rounding), so a test can recompute the scores from the file the job read. The patients
are invented; the value ranges and correlations are plausible for an adult ICU, so the
model trained on them behaves like a real early-warning score would.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# The model's inputs, in the order of its input tensor's columns.
FEATURES = ("age", "heart_rate", "resp_rate", "sys_bp", "spo2", "temp_c", "gcs", "lactate")
COLUMNS = ("patient_id", "sex", *FEATURES)
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Cohort:
    """``x``: one row per patient, columns as :data:`FEATURES`; ``ids``: their ids;
    ``sex``: "F"/"M"; ``deteriorated``: the outcome (only for training cohorts)."""

    ids: list[str]
    sex: list[str]
    x: FloatArray
    deteriorated: npt.NDArray[np.int8]


def cohort(rng: np.random.Generator, n: int, prefix: str) -> Cohort:
    """``n`` made-up ICU patients: a latent severity drives every vital sign, so sick
    patients are tachycardic, tachypnoeic, hypotensive, hypoxic and have high lactate
    together, as in real wards; the outcome is drawn from that severity."""
    severity = rng.gamma(shape=2.0, scale=0.5, size=n)  # most stable, a long sick tail
    age = np.clip(rng.normal(64, 15, n), 18, 98)
    noise = rng.normal(size=(n, 7))
    heart_rate = 78 + 14 * severity + 12 * noise[:, 0]
    resp_rate = 15 + 3.5 * severity + 3 * noise[:, 1]
    sys_bp = 128 - 13 * severity - 0.1 * (age - 64) + 14 * noise[:, 2]
    spo2 = 97.5 - 2.2 * severity + 1.3 * noise[:, 3]
    temp_c = 36.9 + 0.35 * severity + 0.45 * noise[:, 4]
    gcs = 15 - 1.4 * severity + 0.8 * noise[:, 5]
    lactate = np.exp(0.1 + 0.35 * severity + 0.3 * noise[:, 6])
    x = np.column_stack(
        [
            np.round(age),
            np.round(np.clip(heart_rate, 35, 190)),
            np.round(np.clip(resp_rate, 6, 45)),
            np.round(np.clip(sys_bp, 55, 220)),
            np.round(np.clip(spo2, 70, 100)),
            np.round(np.clip(temp_c, 34.0, 41.5), 1),
            np.round(np.clip(gcs, 3, 15)),
            np.round(np.clip(lactate, 0.3, 15.0), 1),
        ]
    )
    logit = -4.2 + 1.6 * severity + 0.025 * (age - 64)
    deteriorated = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    sex = ["F" if s else "M" for s in rng.random(n) < 0.44]
    ids = [f"{prefix}{i:06d}" for i in range(1, n + 1)]
    return Cohort(ids, sex, x, deteriorated)


def vitals_csv(patients: Cohort) -> bytes:
    """The consumer's file: one row per patient, no outcome column (that is what the
    model is for)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for pid, sex, row in zip(patients.ids, patients.sex, patients.x, strict=True):
        writer.writerow([pid, sex, *(_cell(v) for v in row)])
    return out.getvalue().encode()


def read_features(data: bytes) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Patient ids and the float32 feature matrix of a :func:`vitals_csv` file, exactly
    as the job's predict.py builds it."""
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    x = np.array([[float(r[f]) for f in FEATURES] for r in rows], dtype=np.float32)
    return [r["patient_id"] for r in rows], x.reshape(len(rows), len(FEATURES))


def _cell(value: float) -> str:
    return f"{value:g}"
