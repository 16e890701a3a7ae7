"""One style for every figure: rcParams, a color and marker per configuration, label placement,
and the readers of the results files that several figures share.

Each figure is built by a ``plot_*`` function in this package that returns a matplotlib ``Figure``
(no pyplot, no global state, Agg canvas), so tests can inspect titles and artists.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox


PNG_DPI = 160

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.framealpha": 0.9,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linestyle": ":",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "lines.linewidth": 1.5,
    "lines.markersize": 6,
}

FP32_COLOR = "#222222"
GREEDY_COLOR = "#d62728"
PARETO_COLOR = "#ff7f0e"
BUDGET_COLOR = "#2ca02c"
AI_COLOR = "#1f77b4"
VAL_COLOR = "#8c564b"
OTHER_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
DEVICE_STYLES = (("#111111", "-"), ("#555555", "--"), ("#888888", "-."), ("#333333", ":"))


class SkipPlot(Exception):
    """An input is there but lacks what this plot needs (e.g. stage 3 ran without the greedy)."""


@contextmanager
def style():
    with matplotlib.rc_context(STYLE):
        yield


def _uniform_bits(name: str):
    """(w, a) of a uniform configuration's name (uniform_w4 -> (4, None), uniform_w4a8 -> (4, 8)), else None."""
    m = re.fullmatch(r"uniform_w(\d+)(?:a(\d+))?", str(name))
    return (int(m.group(1)), int(m.group(2)) if m.group(2) else None) if m else None


def display_name(name: str) -> str:
    """Short label for a configuration name: fp32 -> FP32, uniform_w4 -> uniform W4, uniform_w4a8 -> W4A8."""
    u = _uniform_bits(name)
    if u is not None:
        return f"uniform W{u[0]}" + (f"A{u[1]}" if u[1] else "")
    return {"fp32": "FP32"}.get(name, str(name))


def config_style(name: str) -> dict:
    """Color and marker of a configuration, the same in every figure."""
    if name == "fp32":
        return {"color": FP32_COLOR, "marker": "*", "markersize": 13}
    if name == "greedy":
        return {"color": GREEDY_COLOR, "marker": "D", "markersize": 9}
    if name == "pareto":
        return {"color": PARETO_COLOR, "marker": "P", "markersize": 8}
    u = _uniform_bits(name)
    if u is not None:   # 8 bits dark ... 2 bits light; weight-only squares, W/A triangles
        b = u[0] if u[1] is None else (u[0] + u[1]) / 2
        t = 0.08 + 0.72 * (8 - min(max(b, 2), 8)) / 6
        if u[1] is None:
            return {"color": matplotlib.colormaps["viridis"](t), "marker": "s", "markersize": 7}
        return {"color": matplotlib.colormaps["plasma"](t), "marker": "^", "markersize": 8}
    return {"color": OTHER_COLORS[sum(map(ord, str(name))) % len(OTHER_COLORS)], "marker": "o",
            "markersize": 7}


def layer_segments(*objs) -> dict:
    """{layer: segment} as the model declared it, from the first results file that records it."""
    for o in objs:
        if o and isinstance(o.get("segments"), dict) and o["segments"]:
            return dict(o["segments"])
        if o and isinstance(o.get("layers"), list) and o["layers"] and all("segment" in l for l in o["layers"]):
            return {l["name"]: l["segment"] for l in o["layers"]}
    return {}


def _groups(names, segments: dict | None = None):
    """[(segment, first index, last index)] of consecutive layers in the same segment; without a
    recorded structure, one group."""
    runs = []
    for i, n in enumerate(names):
        g = (segments or {}).get(n, "")
        if runs and runs[-1][0] == g:
            runs[-1][2] = i
        else:
            runs.append([g, i, i])
    return [tuple(r) for r in runs]


def widths_of(value) -> tuple[int | None, int | None]:
    """(w, a) of a configuration entry in file form: an int (a layer's weights) or {"w", "a"}; None
    where the entry has no such width (a tensor without weights, a layer writing no tensor of its own)."""
    if isinstance(value, dict):
        return (int(value["w"]) if "w" in value else None), (int(value["a"]) if "a" in value else None)
    return int(value), None


def config_widths(config: dict) -> dict[str, tuple[int | None, int | None]]:
    """{name: (w, a)} of a configuration in file form, in file order (the format marker skipped)."""
    return {n: widths_of(v) for n, v in config.items() if n != "format"}


def _title(text: str, synthetic: bool) -> str:
    return text + (" (synthetic data)" if synthetic else "")


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _num(x):
    """float(x), or None for missing / null / non-finite values."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _points(x) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def _fmt(x, spec=".2f", missing="–"):
    v = _num(x)
    return missing if v is None else format(v, spec)


# ---------------------------------------------------------------------------------------------
# label placement: put each label near its point without overlapping other labels or markers


def _place_labels(fig, ax, items, fontsize=8, marker_radius_pt=6.0):
    """Annotate points (dicts with x, y, text, color) avoiding overlaps; returns the annotations.

    Tries positions around each point at growing distances (with a leader line when far) and
    keeps the first whose text box stays inside the axes and clear of the markers and labels
    already placed; if none is clear, the least overlapping one. The figure layout is settled
    first and then frozen, so the display coordinates used here are those that get saved.
    """
    if not items:
        return []
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    scale = fig.dpi / 72.0
    xy = ax.transData.transform([(it["x"], it["y"]) for it in items])
    r = marker_radius_pt * scale
    obstacles = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in xy]
    angles = (35, 145, -35, -145, 0, 180, 90, -90, 65, 115, -65, -115)
    dists = (6, 14, 24, 36, 50, 66, 84)

    def overlap(a, b):
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    placed, anns = [], []
    for it in items:
        best = None
        for dist in dists:
            for ang in angles:
                dx, dy = dist * math.cos(math.radians(ang)), dist * math.sin(math.radians(ang))
                ha = "left" if dx > 1 else "right" if dx < -1 else "center"
                va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
                probe = ax.annotate(it["text"], (it["x"], it["y"]), xytext=(dx, dy),
                                    textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                                    annotation_clip=False)
                bb = probe.get_window_extent(renderer).padded(1.5 * scale)  # text only: no arrow
                probe.remove()
                cost = sum(overlap(bb, o) for o in obstacles + placed)
                inside = (bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0
                          and bb.y1 <= frame.y1)
                if not inside:
                    cost += 1e6 + bb.width * bb.height
                if best is None or cost < best[0]:
                    best = (cost, dx, dy, ha, va, bb, dist)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, dx, dy, ha, va, bb, dist = best
        arrow = (dict(arrowstyle="-", color=it.get("color", "k"), lw=0.7, alpha=0.8, shrinkA=1,
                      shrinkB=marker_radius_pt * 0.8) if dist > 10 else None)
        ann = ax.annotate(it["text"], (it["x"], it["y"]), xytext=(dx, dy), textcoords="offset points",
                          ha=ha, va=va, fontsize=fontsize, color=it.get("color", "k"),
                          arrowprops=arrow, annotation_clip=False, zorder=6,
                          bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75))
        placed.append(bb)
        anns.append(ann)
    return anns


# ---------------------------------------------------------------------------------------------
# the figures


def _configs_04(b04):
    rows = [c for c in b04["configs"] if isinstance(c, dict) and _num(c.get("ai")) is not None]
    if not rows:
        raise SkipPlot("04_baselines.json lists no configurations with an AI")
    return rows


def _fp32_row(b04):
    base = b04.get("baseline") or "fp32"
    for c in b04["configs"]:
        if isinstance(c, dict) and c.get("name") == base:
            return c
    return None


def _max_drop(*objs):
    for o in objs:
        if o and _num(o.get("max_drop")) is not None:
            return _num(o["max_drop"])
    return None



def chosen_config(s03: dict):
    """(method, result dict) of stage 3's best method; fallback greedy, then pareto; None if none ran."""
    order = [s03.get("best")] if s03.get("best") in ("greedy", "pareto") else []
    for method in order + ["greedy", "pareto"]:
        res = s03.get(method)
        if isinstance(res, dict) and isinstance(res.get("config"), dict):
            return method, res
    return None, None


def _layer_params(s03=None, p02=None):
    """[(weight layer, params or None)] in network order from stage 3 (or stage 2)."""
    for obj in (s03, p02):
        if obj and isinstance(obj.get("layers"), list) and obj["layers"]:
            return [(str(l["name"]), _num(l.get("params"))) for l in obj["layers"]]
    return []


