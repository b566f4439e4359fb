import numpy as np
import pytest

from panorama.geometry import NAMED, STANDARD_12, angle_between, canonical_lead_name, resolve_view, resolve_views


def test_directions_are_unit_and_follow_the_convention():
    assert np.allclose(resolve_view("I").direction, [0, 1, 0], atol=1e-12)  # toward the left
    assert np.allclose(resolve_view("aVF").direction, [0, 0, -1], atol=1e-12)  # toward the feet
    assert np.allclose(resolve_view("VZ").direction, [-1, 0, 0], atol=1e-12)  # toward the back
    for v in NAMED.values():
        assert np.linalg.norm(v.direction) == pytest.approx(1.0)


def test_limb_leads_form_the_hexaxial_frontal_system():
    # I at 0°, II at 60°, III at 120° below the horizontal: 60° apart in the frontal plane
    assert angle_between(resolve_view("I"), resolve_view("II")) == pytest.approx(60)
    assert angle_between(resolve_view("II"), resolve_view("III")) == pytest.approx(60)
    assert angle_between(resolve_view("I"), resolve_view("aVF")) == pytest.approx(90)
    assert angle_between(resolve_view("I"), resolve_view("aVR")) == pytest.approx(150)


def test_right_sided_leads_mirror_their_left_twins():
    for n in ("V3", "V4", "V5", "V6"):
        left, right = resolve_view(n), resolve_view(n + "R")
        assert right.theta == left.theta and right.phi == -left.phi


def test_arbitrary_views_and_aliases():
    v = resolve_view("120:45")
    assert (v.theta, v.phi, v.name) == (120.0, 45.0, "120:45")
    assert canonical_lead_name("AVR") == "aVR"
    assert canonical_lead_name(" v1 ") == "V1"
    assert canonical_lead_name("MLII") is None
    assert [canonical_lead_name(n) for n in ("D1", "DIII", "ECG I", "lead_II", "-aVR")] == ["I", "III", "I", "II", None]
    assert [v.name for v in resolve_views("I, II ,V3")] == ["I", "II", "V3"]


def test_standard_leads_have_mdc_codes():
    assert resolve_view("I").mdc_code == 131073
    assert resolve_view("aVR").mdc_code == 131134
    assert all(NAMED[n].mdc_code for n in STANDARD_12)


@pytest.mark.parametrize("spec, match", [
    ("V10", "unknown view 'V10'; valid names are I, II"),
    ("200:0", "theta must lie in"),
    ("I,I", "more than once"),
    ("", "no views"),
])
def test_bad_views_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_views(spec)


def test_descriptors_tell_far_field_leads_from_torso_electrodes():
    from panorama.geometry import descriptors

    d = descriptors(resolve_views("I,V6,VX,120:45"), offsets=[[0, 0], [1.5, -2], [0, 0], [0, 0]])
    assert d.shape == (4, 3)
    assert list(d[:, 2]) == [1.0, 0.0, 1.0, 0.0]  # limb and Frank leads are far-field
    assert tuple(d[1, :2]) == (97.5, 88.0)  # offsets move θ, φ only


def test_limb_leads_beyond_two_are_redundant_and_a_lead_off_promotes_the_next():
    from panorama.geometry import STANDARD_12, redundant_limb_leads

    names = list(STANDARD_12)
    drop = redundant_limb_leads(names)
    assert [n for n, d in zip(names, drop) if d] == ["III", "aVR", "aVL", "aVF"]
    usable = np.array([n != "I" for n in names])  # lead I is off: II and III carry the plane
    drop = redundant_limb_leads(names, usable)
    assert [n for n, d in zip(names, drop) if d] == ["aVR", "aVL", "aVF"]  # II and III carry the plane
    assert not redundant_limb_leads(["aVR", "aVL", "V1"]).any()  # any two limb leads are independent
    assert list(redundant_limb_leads(["I", "I", "V1", "V1"])) == [False, True, False, True]  # named twice
