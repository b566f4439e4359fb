"""Classical baselines behind one small interface, run through the same harness as the model.

- ``zero``: predict 0 mV (the floor: the paper's PSNR gives it about 24 dB).
- ``dipole``: least-squares heart vector from the inputs' unit lead vectors, projected on
  the query direction. Needs no training; works for any angles.
- ``lsq``: population least squares from the inputs to each queried lead, fitted on other
  records that HAVE the queried leads. A reconstruction reference, not a synthesis method.
- ``kors``: the Kors regression matrix (Kors et al., Eur Heart J 1990) from I, II, V1–V6 to
  Frank X, Y, Z.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .geometry import View

__all__ = ["Method", "ZeroMethod", "DipoleMethod", "LeastSquaresMethod", "KorsMethod", "KORS"]


class Method(Protocol):
    name: str

    def predict(self, x: np.ndarray, inputs: list[View], queries: list[View]) -> np.ndarray:
        """x: (inputs, samples) mV → (queries, samples) mV."""
        ...


class ZeroMethod:
    name = "zero"

    def predict(self, x, inputs, queries):
        return np.zeros((len(queries), x.shape[1]), dtype=np.float32)


class DipoleMethod:
    name = "dipole"

    def predict(self, x, inputs, queries):
        u = np.stack([v.direction for v in inputs])  # (inputs, 3)
        q = np.stack([v.direction for v in queries])  # (queries, 3)
        # heart vector h(t) = pinv(u) x(t): exact for 3 independent leads, LSQ for more
        h = np.linalg.pinv(u) @ x.astype(np.float64)  # (3, samples)
        return (q @ h).astype(np.float32)


class LeastSquaresMethod:
    """Linear map (with no intercept: leads are median-centred) fitted on training records."""

    name = "lsq"

    def __init__(self):
        self.weights: np.ndarray | None = None  # (queries, inputs)
        self.key: tuple | None = None

    def fit(self, xs: list[np.ndarray], ys: list[np.ndarray], inputs: list[View], queries: list[View]):
        """xs[i]: (inputs, samples), ys[i]: (queries, samples) of the same record."""
        if not xs:
            raise ValueError("population least squares needs at least one training record")
        x = np.concatenate([a - np.median(a, axis=1, keepdims=True) for a in xs], axis=1)
        y = np.concatenate([a - np.median(a, axis=1, keepdims=True) for a in ys], axis=1)
        w, *_ = np.linalg.lstsq(x.T.astype(np.float64), y.T.astype(np.float64), rcond=None)
        self.weights = w.T
        self.key = (tuple(v.name for v in inputs), tuple(v.name for v in queries))
        return self

    def predict(self, x, inputs, queries):
        key = (tuple(v.name for v in inputs), tuple(v.name for v in queries))
        if self.weights is None or key != self.key:
            raise ValueError("population least squares must be fitted for these inputs and views first")
        return (self.weights @ x.astype(np.float64)).astype(np.float32)


# Kors et al. 1990: rows X, Y, Z; columns I, II, V1..V6.
KORS_INPUTS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
KORS = np.array([
    [0.38, -0.07, -0.13, 0.05, -0.01, 0.14, 0.06, 0.54],
    [-0.07, 0.93, 0.06, -0.02, -0.05, 0.06, -0.17, 0.13],
    [0.11, -0.23, -0.43, -0.06, -0.14, -0.20, -0.11, 0.31],
])


class KorsMethod:
    name = "kors"

    def predict(self, x, inputs, queries):
        names = [v.name for v in inputs]
        missing = [n for n in KORS_INPUTS if n not in names]
        if missing:
            raise ValueError(f"the Kors regression needs inputs {','.join(KORS_INPUTS)}; missing {','.join(missing)}")
        bad = [v.name for v in queries if v.name not in ("VX", "VY", "VZ")]
        if bad:
            raise ValueError(f"the Kors regression gives only VX, VY, VZ; cannot give {', '.join(bad)}")
        x8 = np.stack([x[names.index(n)] for n in KORS_INPUTS]).astype(np.float64)
        xyz = KORS @ x8
        return np.stack([xyz["XYZ".index(v.name[1])] for v in queries]).astype(np.float32)
