"""Patient adaptation: a copy of the fusion blocks learns the patient's recorded chest leads;
the shared model is untouched, the fit is deterministic, refusals are clean, eval never
adapts on a scored view, and on real validation records unseen V2/V6 improve."""

import numpy as np
import pytest
import torch

from panorama.adapt import adapt
from panorama.geometry import STANDARD_12, resolve_views
from panorama.synth import Synthesizer
from training.simulator import simulate

CAL = [n for n in STANDARD_12 if n not in ("V2", "V6")]
INPUTS = ["I", "II", "V3"]


@pytest.fixture(scope="module")
def synth():
    return Synthesizer.load()


def _record(seed: int, seconds: float = 6.0) -> np.ndarray:
    p = simulate(seed, views=CAL, duration_s=seconds, device="diagnostic")
    return np.stack([p.lead(n) for n in CAL]).astype(np.float32)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adaptation_fits_a_copy_of_the_blocks_only(synth):
    x = _record(11)
    views = resolve_views(",".join(CAL))
    before = _state(synth.model)
    a = adapt(synth.model, x, views, INPUTS, offsets=np.array([[0, 0], [0, 0], [2.0, -3.0]]))
    assert a.accepted and a.reason == "adapted", a.summary()
    assert [v.name for v in a.queries] == ["V1", "V3", "V4", "V5"]  # recorded chest leads; limb leads follow I, II
    # it draws only views near what it learned on: far posterior, right-sided, limb and Frank views stay shared
    near, far = a.split(resolve_views("V2,V6,V4R,V7,V8,V5R,aVL,VX"))
    assert near == [0, 1, 2] and far == [3, 4, 5, 6, 7]
    assert a.residual_after_uv < 0.98 * a.residual_before_uv
    assert a.summary().startswith("patient adaptation on V1, V3, V4, V5: residual")
    after = _state(synth.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared model is untouched
    adapted = _state(a.model)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], adapted[k])}
    assert changed == {"blocks"}  # encoder, embedding, attention, head and skips as trained
    assert not any(p.requires_grad for p in a.model.parameters())
    again = adapt(synth.model, x, views, INPUTS, offsets=np.array([[0, 0], [0, 0], [2.0, -3.0]]))
    assert all(torch.equal(adapted[k], v) for k, v in _state(again.model).items())  # deterministic
    # the adapted copy predicts a recorded, non-input lead better on the fit window
    xin = x[[CAL.index(n) for n in INPUTS]]
    ins, v1 = resolve_views(",".join(INPUTS)), resolve_views("V1")
    err = lambda model: np.mean(np.abs(  # noqa: E731
        Synthesizer(model)(xin, ins, v1)[0, :2500] - x[CAL.index("V1"), :2500]
        - np.median(Synthesizer(model)(xin, ins, v1)[0, :2500] - x[CAL.index("V1"), :2500])))
    assert err(a.model) < err(synth.model)


def test_a_monitor_learns_each_chest_input_from_the_others(synth):
    """Every recorded lead an input: no neighbour beside them, so each chest input is
    predicted from the others (never from itself), and that prediction improves."""
    x = _record(12)
    views = resolve_views(",".join(CAL))
    a = adapt(synth.model, x, views, CAL)
    assert a.accepted, a.summary()
    assert [v.name for v in a.queries] == ["V1", "V3", "V4", "V5"]
    assert a.residual_after_uv < 0.98 * a.residual_before_uv
    rest = [n for n in CAL if n != "V4"]  # V4 from everything else, as the fit asked of it
    xin, ins, v4 = x[[CAL.index(n) for n in rest]], resolve_views(",".join(rest)), resolve_views("V4")
    truth = x[CAL.index("V4"), :2500]
    err = lambda model: np.mean(np.abs(  # noqa: E731
        (e := Synthesizer(model)(xin, ins, v4)[0, :2500] - truth) - np.median(e)))
    assert err(a.model) < err(synth.model)


def test_refusals_are_clean(synth):
    x = _record(12, seconds=3.0)
    views = resolve_views(",".join(CAL))
    short = adapt(synth.model, x, views, INPUTS)
    assert not short.accepted and short.model is synth.model and "only 3.0 s recorded, 5 s asked" in short.reason
    alone = adapt(synth.model, x[[0, 1, CAL.index("V3")]], resolve_views("I,II,V3"), INPUTS, seconds=2)
    assert not alone.accepted and "no usable torso lead recorded beside the inputs, and under 3 chest" in alone.reason
    flat = x.copy()
    flat[CAL.index("V3")] = 0.0
    off = adapt(synth.model, flat, views, INPUTS, seconds=2)
    assert not off.accepted and "V3 flat" in off.reason
    assert off.summary().startswith("patient adaptation not used: ") and not off.covers(views[CAL.index("V1")])
    with pytest.raises(ValueError, match="V9 not among the recorded leads"):
        adapt(synth.model, x, views, ["I", "II", "V9"], seconds=2)
    with pytest.raises(ValueError, match="model rate"):
        adapt(synth.model, x, views, INPUTS, fs=250)
    with pytest.raises(ValueError, match="named more than once: I"):
        adapt(synth.model, np.concatenate([x, x[:1]]), [*views, views[0]], INPUTS, seconds=2)


def test_eval_never_adapts_on_a_scored_view(synth, data_dir):
    from training.evaluate import CalibratedModelMethod, Task, load_cases

    task = Task(resolve_views("I,II,V3"), resolve_views("V2,V6"))
    cases, _ = load_cases([data_dir / "ludb" / "ludb001"], task, progress=False)
    method = CalibratedModelMethod(synth, 5.0, transfer=True, adapt=True)
    method.prepare(cases[0].record, task)
    assert method.adaptation.accepted and not {v.name for v in method.adaptation.queries} & {"V2", "V6"}
    assert method.active is not synth and method.active.model is method.adaptation.model
    assert method.notes == {"calibration accepted": 1, "adapted": 1, "transfer fitted": 1}
    assert method.name == "model+calib5s+adapt+transfer"


def test_adaptation_improves_v2_and_v6_on_real_validation_records(data_dir):
    from training import splits
    from training.evaluate import Task, evaluate, load_cases

    paths = splits.select(sorted(p.with_suffix("") for p in (data_dir / "ludb").glob("*.hea")), "val")[:8]
    task = Task(resolve_views("I,II,V3"), resolve_views("V2,V6"))
    cases, _ = load_cases(paths, task, progress=False)
    tr = evaluate(cases, task, "model", progress=False, calibrate_s=5, transfer=True)
    ad = evaluate(cases, task, "model", progress=False, calibrate_s=5, transfer=True, adapt=True)
    tr, ad = tr.summary["overall"], ad.summary["overall"]
    assert ad["records"] == tr["records"] == 8
    assert ad["psnr_db"] > tr["psnr_db"] + 0.5, (tr, ad)  # session 27, 8 records: 32.94 -> 34.75 dB, r 0.966 -> 0.974
    assert ad["r_median"] > tr["r_median"]


def test_the_example_figure_shows_the_median_record(synth, data_dir, tmp_path):
    from training.transfer_figure import plot_transfer_example

    recs = [data_dir / "ludb" / n for n in ("ludb001", "ludb002")]
    for step in ("transfer", "adapt", "wander"):  # the choice of the median over two records once; one is enough after
        out = tmp_path / f"example_{step}.png"
        res = plot_transfer_example(synth, recs if step == "transfer" else recs[:1], out, split="all", step=step)
        assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
        assert res["record"] in ({"ludb001", "ludb002"} if step == "transfer" else {"ludb001"})
        assert np.isfinite(res["gain_db"])
    with pytest.raises(ValueError, match="unknown step 'calib'"):
        plot_transfer_example(synth, recs, tmp_path / "no.png", split="all", step="calib")


def test_the_blend_bench_draws_both_pipelines_and_their_mean(synth, data_dir):
    """panorama bench blend: weight 0 is the monitor's own pipeline exactly as eval scores it,
    weight 1 the subset's; a subset outside the monitor's leads is refused."""
    from training import splits
    from training.evaluate import Task, evaluate, load_cases
    from training.tune_blend import MONITOR, compare_blend

    paths = splits.select(sorted(p.with_suffix("") for p in (data_dir / "ludb").glob("*.hea")), "val")[:2]
    own, sub = (compare_blend(synth, paths, "all", weight=w)["table"] for w in (0.0, 1.0))
    assert own["blend"] == own["monitor"] and sub["blend"] == sub["subset"]
    assert own["monitor"] == sub["monitor"] and own["subset"] == sub["subset"]  # deterministic
    task = Task(resolve_views(MONITOR), resolve_views("V2,V6"))
    cases, _ = load_cases(paths, task, progress=False)
    ev = evaluate(cases, task, "model", progress=False, calibrate_s=5, transfer=True, adapt=True, wander=True).summary
    assert own["monitor"]["psnr_db"] == round(ev["overall"]["psnr_db"], 2)
    with pytest.raises(ValueError, match="must be drawn from the monitor's leads"):
        compare_blend(synth, paths, "all", subset="I,II,V7")
