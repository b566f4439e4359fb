"""ECG paper PNGs: each view a row at 25 mm/s and 10 mm/mV on a red millimetre grid.

The figure is laid out in millimetres at true scale (``figsize`` in inches = mm / 25.4), so
its pixel size follows from the strip's length and the number of rows alone; ``size_px``
says what it will be. Small squares are 1 mm (light red), large squares 5 mm (darker). A
1 mV × 0.2 s calibration pulse stands in the left margin of every row. Missing samples
(NaN) leave gaps in the trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MM_PER_S = 25.0
MM_PER_MV = 10.0
ROW_MM = 25.0  # vertical space per view: ±1.25 mV before neighbouring traces touch
LEFT_MM = 15.0  # margin for the calibration pulse and the labels
TOP_MM = 10.0  # room for the title
BOTTOM_MM = 5.0
MAX_SECONDS = 10.0
DPI = 150
_MINOR, _MAJOR = "#f6c6c6", "#e48a8a"


def size_px(n_rows: int, seconds: float, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``render`` writes for ``n_rows`` views and a
    strip of ``seconds`` (already capped at MAX_SECONDS by the caller)."""
    w_mm, h_mm = _page_mm(n_rows, seconds)
    return int(w_mm / 25.4 * dpi), int(h_mm / 25.4 * dpi)  # matplotlib truncates, as here


def shown_seconds(n_samples: int, fs: float, max_seconds: float = MAX_SECONDS) -> float:
    """How many seconds ``render`` draws: the whole strip, or its last ``max_seconds``."""
    return min(n_samples, int(round(max_seconds * fs))) / fs


def render(signals: np.ndarray, names: list[str], fs: float, path: str | Path, title: str = "",
           max_seconds: float = MAX_SECONDS, dpi: int = DPI, reference: np.ndarray | None = None) -> Path:
    """Draw ``signals`` (n_views, n_samples) in mV, one row per view, and write a PNG.

    At most the last ``max_seconds`` are drawn (the moments before the stream stopped are the
    ones a person looks for). Each row is centred on its median so baseline offsets do not
    push a trace into its neighbours. ``reference`` (same shape): a second trace per row,
    drawn in blue under the first (the truth beside a synthesised view, say).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    x = np.asarray(signals, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(names) or x.shape[0] == 0:
        raise ValueError(f"signals must be (n_views={len(names)}, n_samples) with at least one view, got {x.shape}")
    if not fs > 0:
        raise ValueError(f"fs must be positive, got {fs}")
    n = min(x.shape[1], int(round(max_seconds * fs)))
    if n < 1:
        raise ValueError("no samples to draw")
    x = x[:, x.shape[1] - n:]
    ref = None
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != np.shape(signals):
            raise ValueError(f"reference {ref.shape} must have the signals' shape {np.shape(signals)}")
        ref = ref[:, ref.shape[1] - n:]
    seconds = n / fs
    w_mm, h_mm = _page_mm(len(names), seconds)
    strip_mm, rows_mm = seconds * MM_PER_S, ROW_MM * len(names)

    fig = plt.figure(figsize=(w_mm / 25.4, h_mm / 25.4), dpi=dpi)
    # axes in millimetres of paper, placed by hand so the pixel size never depends on text
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-LEFT_MM, strip_mm)
    ax.set_ylim(-BOTTOM_MM, rows_mm + TOP_MM)
    ax.set_axis_off()
    _grid(ax, strip_mm, rows_mm)
    t_mm = np.arange(n) / fs * MM_PER_S
    for i, name in enumerate(names):
        y0 = rows_mm - ROW_MM * (i + 0.5)
        row = x[i]
        if ref is not None and np.isfinite(ref[i]).any():
            ax.plot(t_mm, y0 + (ref[i] - np.nanmedian(ref[i])) * MM_PER_MV, color="#1f5fbf", lw=0.9, alpha=0.8)
        if np.isfinite(row).any():
            ax.plot(t_mm, y0 + (row - np.nanmedian(row)) * MM_PER_MV, color="black", lw=0.6)
        else:
            ax.text(strip_mm / 2, y0, "no samples", fontsize=7, color="gray", ha="center", va="center")
        # calibration pulse: 1 mV high, 0.2 s wide
        ax.plot([-LEFT_MM + 2, -LEFT_MM + 4, -LEFT_MM + 4, -LEFT_MM + 9, -LEFT_MM + 9, -LEFT_MM + 11],
                [y0 - 5, y0 - 5, y0 + 5, y0 + 5, y0 - 5, y0 - 5], color="black", lw=0.6)
        ax.text(-LEFT_MM + 1, y0 + 7, name, fontsize=7, va="bottom")
    ax.text(0, rows_mm + TOP_MM / 2, f"{title}   25 mm/s, 10 mm/mV, last {seconds:g} s".strip(),
            fontsize=8, va="center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _page_mm(n_rows: int, seconds: float) -> tuple[float, float]:
    return LEFT_MM + seconds * MM_PER_S, BOTTOM_MM + ROW_MM * n_rows + TOP_MM


def _grid(ax, strip_mm: float, rows_mm: float) -> None:
    from matplotlib.collections import LineCollection

    for step, color, lw in ((1.0, _MINOR, 0.3), (5.0, _MAJOR, 0.7)):
        xs = np.arange(0.0, strip_mm + 1e-9, step)
        ys = np.arange(0.0, rows_mm + 1e-9, step)
        lines = [[(v, 0.0), (v, rows_mm)] for v in xs] + [[(0.0, v), (strip_mm, v)] for v in ys]
        ax.add_collection(LineCollection(lines, colors=color, linewidths=lw, zorder=0))
