"""A physically grounded ECG panorama simulator: ground truth at any viewing angle.

Several current dipoles at different places in the heart (atria, septum, apex, free walls,
base, repolarisation, injury currents) with ECGSYN-style time courses, seen through an
infinite-medium volume conductor from electrodes on an ellipsoidal torso; limb leads from
far-field RA/LA/LL, chest and arbitrary leads against Wilson's central terminal; then a
recording device as a separate step. Modules, in the order a signal is made:

- ``sources``  — beat templates: dipole positions, moments and time courses
- ``patient``  — ``PatientParams`` and ``sample_patient`` (anatomy, sources, rhythm)
- ``rhythm``   — beat timing (sinus, AF, PVC) and AF f-waves
- ``torso``    — torso surface, electrode positions, lead field
- ``render``   — ``render``: clean leads at given true electrode angles
- ``device``   — ``DeviceProfile``, ``DEVICE_PROFILES``, ``apply_device``
- ``simulate`` — ``simulate`` and ``SimRecord``
- ``figure``   — ``plot_sim_vs_real`` on ECG paper
"""

from .device import DEVICE_PROFILES, DeviceProfile, apply_device, random_profile
from .patient import RHYTHMS, PatientParams, sample_patient
from .render import render
from .simulate import SimRecord, simulate

__all__ = [
    "DEVICE_PROFILES", "DeviceProfile", "PatientParams", "RHYTHMS", "SimRecord",
    "apply_device", "random_profile", "render", "sample_patient", "simulate",
]
