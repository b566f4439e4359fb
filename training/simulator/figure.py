"""Simulated and real 12-lead ECGs side by side on ECG paper, for eyeballing realism.

Standard paper: 25 mm/s and 10 mm/mV, a pink 1 mm grid with darker 5 mm squares. Axes are
in millimetres with an equal aspect, so the squares stay square whatever the figure size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MM_PER_S = 25.0
MM_PER_MV = 10.0
ROW_MM = 25.0  # vertical space per lead: ±1.25 mV before neighbouring traces touch
_MINOR, _MAJOR = "#f6c6c6", "#e48a8a"


def plot_sim_vs_real(sim: np.ndarray, real: np.ndarray | None, fs: float, names: list[str],
                     path: str | Path, seconds: float | None = None) -> Path:
    """Draw ``sim`` (and ``real``, if given) as stacked leads, (n_leads, n_samples) in mV each.

    ``seconds`` limits the strip (default: the whole, shorter of the two). Each trace is
    centred on its median so baseline offsets do not push it into its neighbours.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    panels = [("simulated", np.asarray(sim, dtype=float))]
    if real is not None:
        panels.append(("real", np.asarray(real, dtype=float)))
    for label, x in panels:
        if x.ndim != 2 or x.shape[0] != len(names):
            raise ValueError(f"{label} signals must be (n_leads={len(names)}, n_samples), got {x.shape}")
    if fs <= 0:
        raise ValueError(f"fs must be positive, got {fs}")
    n = min(x.shape[1] for _, x in panels)
    if seconds is not None:
        n = min(n, int(seconds * fs))
    width_mm = n / fs * MM_PER_S
    height_mm = ROW_MM * len(names)

    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * width_mm / 22, height_mm / 22 + 0.6),
                             squeeze=False)
    for ax, (label, x) in zip(axes[0], panels):
        _paper(ax, width_mm, height_mm)
        t_mm = np.arange(n) / fs * MM_PER_S
        for i, name in enumerate(names):
            y0 = height_mm - ROW_MM * (i + 0.5)
            trace = x[i, :n] - np.median(x[i, :n])
            ax.plot(t_mm, y0 + trace * MM_PER_MV, color="black", lw=0.6)
            ax.text(1.5, y0 + 6, name, fontsize=8, va="bottom")
        _calibration_pulse(ax, height_mm)
        ax.set_title(f"{label} — 25 mm/s, 10 mm/mV", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _paper(ax, width_mm: float, height_mm: float) -> None:
    ax.set_xlim(0, width_mm)
    ax.set_ylim(0, height_mm)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(0, width_mm + 1e-9, 5))
    ax.set_yticks(np.arange(0, height_mm + 1e-9, 5))
    ax.set_xticks(np.arange(0, width_mm + 1e-9, 1), minor=True)
    ax.set_yticks(np.arange(0, height_mm + 1e-9, 1), minor=True)
    ax.grid(which="minor", color=_MINOR, lw=0.3)
    ax.grid(which="major", color=_MAJOR, lw=0.7)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_axisbelow(True)
    for spine in ax.spines.values():
        spine.set_color(_MAJOR)


def _calibration_pulse(ax, height_mm: float) -> None:
    """The 1 mV, 200 ms square pulse every ECG printout starts with (here at the bottom)."""
    y0 = 3.0
    xs = [0, 1, 1, 6, 6, 7]
    ys = [y0, y0, y0 + MM_PER_MV, y0 + MM_PER_MV, y0, y0]
    ax.plot(xs, ys, color="black", lw=0.8)
