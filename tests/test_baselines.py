import numpy as np
import pytest

from panorama.baselines import DipoleMethod, KorsMethod, LeastSquaresMethod
from panorama.geometry import STANDARD_12, resolve_views


def test_dipole_projection_is_exact_for_a_pure_dipole():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((3, 800))
    inputs, queries = resolve_views("I,II,V3"), resolve_views("V2,V6,V7,120:45")
    x = np.stack([v.direction for v in inputs]) @ h
    want = np.stack([v.direction for v in queries]) @ h
    assert np.allclose(DipoleMethod().predict(x, inputs, queries), want, atol=1e-5)


def test_least_squares_recovers_a_linear_map_and_refuses_other_leads():
    rng = np.random.default_rng(2)
    inputs, queries = resolve_views("I,II,V3"), resolve_views("V2")
    w = np.array([[0.3, -0.5, 1.2]])
    xs = [rng.standard_normal((3, 400)) for _ in range(4)]
    m = LeastSquaresMethod().fit(xs, [w @ x for x in xs], inputs, queries)
    # median centring of each record makes the fit near, not exactly, the generating map
    assert np.allclose(m.weights, w, atol=0.02)
    with pytest.raises(ValueError, match="fitted"):
        m.predict(xs[0], inputs, resolve_views("V6"))


def test_kors_needs_its_eight_leads():
    inputs = resolve_views(",".join(STANDARD_12))
    x = np.zeros((12, 10))
    x[STANDARD_12.index("V6")] = 1.0
    xyz = KorsMethod().predict(x, inputs, resolve_views("VX,VY,VZ"))
    assert np.allclose(xyz[:, 0], [0.54, 0.13, 0.31])
    with pytest.raises(ValueError, match="needs inputs"):
        KorsMethod().predict(x[:3], resolve_views("I,II,V3"), resolve_views("VX"))


def test_patient_least_squares_fits_the_first_5_s_and_predicts_the_rest():
    from panorama.records import Record
    from training.evaluate import PatientLeastSquaresMethod, Task

    rng = np.random.default_rng(3)
    task = Task(resolve_views("I,II,V3"), resolve_views("V2,V6"))
    x = rng.standard_normal((3, 5000))
    w = np.array([[0.3, -0.5, 1.2], [0.9, 0.1, -0.2]])
    y = w @ x
    y[:, 2500:] *= 2.0  # the patient's map changes after the fit window: the fit must not see it
    rec = Record("p", np.concatenate([x, y]).astype(np.float32), ["I", "II", "V3", "V2", "V6"], 500, "test")
    m = PatientLeastSquaresMethod()
    with pytest.raises(ValueError, match="prepare"):
        m.predict(x, task.inputs, task.views)
    m.prepare(rec, task)
    assert np.allclose(m.weights, w, atol=1e-3)  # learnt from 0-5 s only
    assert np.allclose(m.predict(x, task.inputs, task.views)[:, 2500:], y[:, 2500:] / 2, atol=1e-3)
