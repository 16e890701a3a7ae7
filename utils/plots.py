"""Figures and the Markdown summary of stages 1-4, made from their results JSON alone.

Nothing here evaluates a model: every number plotted is read from results/0[1-4]_*.json.
Each figure is built by a ``plot_*`` function that returns a matplotlib ``Figure`` (no pyplot,
no global state, Agg canvas), so tests can inspect titles and artists; ``generate_plots`` loads
the inputs, builds every figure whose inputs are there, and writes each as PNG and PDF
atomically into <results-dir>/plots/, plus <results-dir>/summary.md.

One style for all figures: ``STYLE`` (rcParams, applied in a context manager) and
``config_style(name)`` (one color and marker per configuration name, the same in every plot).
"""
from __future__ import annotations

import io
import math
import re
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import Bbox

from utils.errors import UserError
from utils.io import REPO_ROOT, atomic_write_bytes, atomic_write_text, load_results_json

FLOAT_BITS = 32
PNG_DPI = 160

# key -> (file name, stage); the stage scripts write these into --results-dir.
INPUTS = {
    "baseline": ("01_baseline.json", "1"),
    "per_layer": ("02_per_layer.json", "2"),
    "search": ("03_search.json", "3"),
    "baselines": ("04_baselines.json", "4"),
}

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
    m = re.fullmatch(r"uniform_w(\d+)", str(name))
    return int(m.group(1)) if m else None


def display_name(name: str) -> str:
    """Short label for a configuration name: fp32 -> FP32, uniform_w4 -> uniform W4."""
    b = _uniform_bits(name)
    if b is not None:
        return f"uniform W{b}"
    return {"fp32": "FP32"}.get(name, str(name))


def config_style(name: str) -> dict:
    """Color and marker of a configuration, the same in every figure."""
    if name == "fp32":
        return {"color": FP32_COLOR, "marker": "*", "markersize": 13}
    if name == "greedy":
        return {"color": GREEDY_COLOR, "marker": "D", "markersize": 9}
    if name == "pareto":
        return {"color": PARETO_COLOR, "marker": "P", "markersize": 8}
    b = _uniform_bits(name)
    if b is not None:   # 8 bits dark ... 2 bits light, one sequential map for the uniform family
        t = 0.08 + 0.72 * (8 - min(max(b, 2), 8)) / 6
        return {"color": matplotlib.colormaps["viridis"](t), "marker": "s", "markersize": 7}
    return {"color": OTHER_COLORS[sum(map(ord, str(name))) % len(OTHER_COLORS)], "marker": "o",
            "markersize": 7}


def layer_group(name: str) -> str:
    """stem / layer1 / layer2 / layer3 / head, from a module name such as layer2.0.shortcut.0."""
    m = re.match(r"(layer\d+)(\.|$)", name)
    if m:
        return m.group(1)
    if name.split(".")[0] == "conv1":
        return "stem"
    if name.split(".")[0] in ("linear", "fc", "classifier"):
        return "head"
    return name.split(".")[0]


def _groups(names):
    """[(group, first index, last index)] of consecutive runs of the same group."""
    runs = []
    for i, n in enumerate(names):
        g = layer_group(n)
        if runs and runs[-1][0] == g:
            runs[-1][2] = i
        else:
            runs.append([g, i, i])
    return [tuple(r) for r in runs]


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


def plot_pareto(b04: dict, s03: dict | None = None, synthetic: bool = False) -> Figure:
    """Test accuracy vs AI of every stage-4 configuration, the budget band, the estimated frontier."""
    rows = [c for c in _configs_04(b04) if _num(c.get("test_acc")) is not None]
    if not rows:
        raise SkipPlot("04_baselines.json has no test accuracies")
    fp32 = _fp32_row(b04)
    ref = _num(fp32.get("test_acc")) if fp32 else None
    max_drop = _max_drop(b04, s03)

    frontier = []
    if s03 and ref is not None and isinstance(s03.get("pareto"), dict):
        frontier = sorted(((_num(p.get("ai")), ref - _num(p.get("estimated_drop")))
                           for p in s03["pareto"].get("frontier") or []
                           if _num(p.get("ai")) is not None and _num(p.get("estimated_drop")) is not None))

    accs = [_num(c["test_acc"]) for c in rows]
    top = max(accs + ([ref] if ref is not None else []))
    # Zoom on the interesting range; configurations far below it are drawn on the bottom edge.
    span = max(8.0, 5 * (max_drop or 0))
    floor_ = (ref if ref is not None else top) - span
    shown = [a for a in accs if a >= floor_]
    low = min(shown + ([ref - max_drop] if ref is not None and max_drop else []))
    off_scale = any(a < floor_ for a in accs)
    pad = max(0.4, 0.06 * (top - low))
    ylo, yhi = low - pad * (2.5 if off_scale else 1), top + pad
    ais = [_num(c["ai"]) for c in rows] + [f[0] for f in frontier]
    xpad = max(0.5, 0.06 * (max(ais) - min(ais)))
    xlo, xhi = min(ais) - xpad, max(ais) + xpad

    fig = _new_figure((9.0, 5.4))
    ax = fig.add_subplot()
    handles = []
    if ref is not None and max_drop is not None:
        ax.axhspan(ref - max_drop, ref, color=BUDGET_COLOR, alpha=0.13, lw=0, zorder=0)
        ax.axhline(ref - max_drop, color=BUDGET_COLOR, lw=1, ls="--", zorder=1)
        handles.append(Patch(fc=BUDGET_COLOR, alpha=0.25, ec=BUDGET_COLOR, ls="--",
                             label=f"accuracy budget: FP32 − {_points(max_drop)}"))
    if frontier:
        fx, fy = zip(*frontier)
        (line,) = ax.plot(fx, fy, ls="--", lw=1.1, color=PARETO_COLOR, alpha=0.75, marker=".",
                          markersize=4, zorder=2,
                          label="estimated frontier (FP32 test acc − additive val drops)")
        handles.append(line)

    labels = []
    for c, a in zip(rows, accs):
        st = config_style(c["name"])
        x = _num(c["ai"])
        if a >= floor_:
            # smaller markers on top, so that coinciding points (greedy = pareto) both show
            ax.plot([x], [a], ls="none", marker=st["marker"], ms=st["markersize"], color=st["color"],
                    mec="white", mew=0.6, zorder=4 + 1 / st["markersize"])
            labels.append(dict(x=x, y=a, text=display_name(c["name"]), color=st["color"]))
            label = f"{display_name(c['name'])}: {a:.2f}%"
        else:
            y = ylo + 0.6 * pad
            ax.plot([x], [y], ls="none", marker="v", ms=8, color=st["color"], zorder=4, clip_on=False)
            labels.append(dict(x=x, y=y, text=f"{display_name(c['name'])} ({a:.1f}%, off scale)",
                               color=st["color"]))
            label = f"{display_name(c['name'])}: {a:.2f}% (off scale, ▼)"
        handles.append(Line2D([], [], ls="none", marker=st["marker"], ms=st["markersize"] * 0.8,
                              color=st["color"], label=label))

    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    ax.set_xlabel("Arithmetic intensity (FLOPs/byte)")
    ax.set_ylabel("Test accuracy (%)")
    fig.suptitle(_title("Test accuracy vs arithmetic intensity", synthetic))
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    _place_labels(fig, ax, labels)
    return fig


def plot_sensitivity(p02: dict, synthetic: bool = False) -> Figure:
    """Heatmap: validation accuracy drop with only one layer quantized, layers x bit widths."""
    layers = [l for l in p02["layers"] if isinstance(l, dict) and "name" in l]
    if not layers:
        raise SkipPlot("02_per_layer.json lists no layers")
    bits = [int(b) for b in (p02.get("bits") or [])]
    for l in layers:
        for r in l.get("results") or []:
            if int(r["bits"]) not in bits:
                bits.append(int(r["bits"]))
    if not bits:
        raise SkipPlot("02_per_layer.json has no bit widths")
    bits.sort(reverse=True)
    names = [str(l["name"]) for l in layers]
    drop = np.full((len(names), len(bits)), np.nan)
    for i, l in enumerate(layers):
        for r in l.get("results") or []:
            v = _num(r.get("drop"))
            if v is None and _num(r.get("val_acc")) is not None and _num(p02.get("baseline_val_acc")) is not None:
                v = _num(p02["baseline_val_acc"]) - _num(r["val_acc"])
            if v is not None:
                drop[i, bits.index(int(r["bits"]))] = v

    finite = drop[np.isfinite(drop)]
    vmax = max(1.0, float(finite.max()) if finite.size else 1.0)
    # Drops span 0.01 to ~80 points: log colors above 0.1 point, linear below; a rise in accuracy
    # (negative drop, evaluation noise) gets the pale "under" color, its value is in the cell.
    norm = SymLogNorm(linthresh=0.1, linscale=0.5, vmin=0.0, vmax=vmax, base=10)
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#dddddd", under="#dbe7f5")

    fig = _new_figure((2.6 + 0.85 * len(bits) + 1.3, 1.4 + 0.27 * len(names)))
    ax = fig.add_subplot()
    ax.grid(False)
    im = ax.imshow(np.ma.masked_invalid(drop), cmap=cmap, norm=norm, aspect="auto",
                   interpolation="nearest")
    for i in range(len(names)):
        for j in range(len(bits)):
            v = drop[i, j]
            if np.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="#555555")
                continue
            txt = f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
            dark = float(norm(v)) > 0.62
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    for _, first, _last in _groups(names)[1:]:
        ax.axhline(first - 0.5, color="black", lw=1.2)
    ax.set_xticks(range(len(bits)), [f"{b}-bit" if b != FLOAT_BITS else "fp32" for b in bits])
    ax.set_yticks(range(len(names)), names)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.tick_params(length=0)
    ax.set_xlabel("weight width of the one quantized layer (all other layers fp32)")
    ax.set_ylabel("layer (network order)")
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02,
                      extend="min" if finite.size and finite.min() < 0 else "neither")
    ticks = [t for t in (0, 0.1, 0.3, 1, 3, 10, 30, 100) if t <= vmax]
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()
    cb.set_label("validation accuracy drop (points); log color scale above 0.1, blue: accuracy rose")
    base = _num(p02.get("baseline_val_acc"))
    sub = f"FP32 validation accuracy {base:.2f}%" if base is not None else ""
    fig.suptitle(_title("Per-layer sensitivity: validation accuracy drop, one layer quantized at a time",
                        synthetic) + (f"\n{sub}" if sub else ""))
    return fig


def chosen_config(s03: dict):
    """(method, result dict) of stage 3's best method; fallback greedy, then pareto; None if none ran."""
    order = [s03.get("best")] if s03.get("best") in ("greedy", "pareto") else []
    for method in order + ["greedy", "pareto"]:
        res = s03.get(method)
        if isinstance(res, dict) and isinstance(res.get("config"), dict):
            return method, res
    return None, None


def _layer_params(s03=None, p02=None):
    """[(name, params or None)] in network order from stage 3 (or stage 2)."""
    for obj in (s03, p02):
        if obj and isinstance(obj.get("layers"), list) and obj["layers"]:
            return [(str(l["name"]), _num(l.get("params"))) for l in obj["layers"]]
    return []


def plot_bit_allocation(s03: dict, synthetic: bool = False, p02: dict | None = None) -> Figure:
    """Bars: weight bits per layer of the chosen configuration; line: weights per layer (log)."""
    method, res = chosen_config(s03)
    if method is None:
        raise SkipPlot("03_search.json has neither a greedy nor a pareto configuration")
    config = res["config"]
    layers = _layer_params(s03, p02) or [(n, None) for n in config]
    names = [n for n, _ in layers]
    bits = [int(config.get(n, FLOAT_BITS)) for n in names]
    params = [p for _, p in layers]
    x = np.arange(len(names))
    float_h = 9.6                   # float bars are drawn to a broken top tick labelled 32
    heights = [float_h if b == FLOAT_BITS else b for b in bits]
    color = config_style(method)["color"]

    fig = _new_figure((max(8.0, 0.42 * len(names) + 3.0), 5.6))
    ax = fig.add_subplot()
    ax.grid(axis="x", visible=False)
    groups = _groups(names)
    for k, (g, first, last) in enumerate(groups):
        if k % 2 == 0:
            ax.axvspan(first - 0.5, last + 0.5, color="#000000", alpha=0.055, lw=0, zorder=0)
        ax.text((first + last) / 2, 10.75, g, ha="center", va="center", fontsize=8.5,
                fontweight="bold", color="#333333")
    q = [i for i, b in enumerate(bits) if b != FLOAT_BITS]
    f = [i for i, b in enumerate(bits) if b == FLOAT_BITS]
    ax.bar([x[i] for i in q], [heights[i] for i in q], width=0.7, color=color, alpha=0.85,
           zorder=2)
    ax.bar([x[i] for i in f], [heights[i] for i in f], width=0.7, facecolor="white",
           edgecolor="#555555", hatch="///", zorder=2)
    has_params = any(p is not None for p in params)
    ax2 = ax.twinx() if has_params else None
    for i in range(len(names)):   # on the twin axes (drawn last), so the params line passes behind
        (ax2 or ax).text(x[i], heights[i] + 0.12, "fp32" if bits[i] == FLOAT_BITS else str(bits[i]),
                         transform=ax.transData, ha="center", va="bottom", fontsize=7.5, zorder=5,
                         bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
    ax.set_ylim(0, 11.4)
    ax.set_yticks([0, 2, 3, 4, 5, 6, 7, 8, float_h], ["0", "2", "3", "4", "5", "6", "7", "8", "32"])
    ax.set_xticks(x, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=7.5)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("weight width (bits)")
    ax.set_xlabel("layer (network order)")
    # break marks on the y axis between 8 and the float tick
    kw = dict(transform=ax.get_yaxis_transform(), color="k", clip_on=False, lw=1)
    for yb in (8.7, 8.95):
        ax.plot([-0.012, 0.012], [yb - 0.12, yb + 0.12], **kw)

    handles = [Patch(fc=color, alpha=0.85, label=f"{method}: weight bits")]
    if f:
        handles.append(Patch(fc="white", ec="#555555", hatch="///", label="left in float (fp32, not to scale)"))
    if has_params:
        ax2.grid(False)
        px = [x[i] for i, p in enumerate(params) if p is not None]
        py = [p for p in params if p is not None]
        (ln,) = ax2.plot(px, py, color="#333333", lw=1.0, marker="o", ms=4, mfc="white", mew=1,
                         zorder=3, label="weights per layer (right axis, log)")
        ax2.set_yscale("log")
        lo, hi = min(py), max(py)
        ax2.set_ylim(lo / 2, hi * 40)   # keeps the line below the bit labels
        ax2.set_ylabel("weights per layer (count, log scale)")
        handles.append(ln)
        tot = sum(py)
        if len(py) == len(params) and tot:
            avg = sum(p * b for p, b in zip(params, bits)) / tot
            handles.append(Patch(fc="none", ec="none", label=f"average {avg:.2f} bits/weight"))
    ai, acc = _num(res.get("ai")), _num(res.get("val_acc"))
    extra = ", ".join(s for s in (f"AI {ai:.2f} FLOPs/byte" if ai is not None else "",
                                  f"val acc {acc:.2f}%" if acc is not None else "") if s)
    fig.suptitle(_title(f"Bit allocation chosen by the {method} search", synthetic)
                 + (f"\n{extra}" if extra else ""))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig


def plot_search_trajectory(s03: dict, synthetic: bool = False) -> Figure:
    """Greedy steps: model AI (left axis) and validation accuracy (right axis), with the budget."""
    greedy = s03.get("greedy")
    if not isinstance(greedy, dict) or not greedy.get("trajectory"):
        raise SkipPlot("03_search.json has no greedy trajectory (the greedy search was not run)")
    traj = sorted(greedy["trajectory"], key=lambda t: int(t["step"]))
    steps = [int(t["step"]) for t in traj]
    base = _num(s03.get("baseline_val_acc"))
    max_drop = _max_drop(s03)

    fig = _new_figure((9.0, 5.0))
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    ax2.grid(False)
    handles = []
    ai_pts = [(s, _num(t.get("ai"))) for s, t in zip(steps, traj) if _num(t.get("ai")) is not None]
    if ai_pts:
        (h,) = ax.plot(*zip(*ai_pts), color=AI_COLOR, marker="o", ms=4, label="model AI (left axis)")
        handles.append(h)
    acc_pts = [(s, _num(t.get("val_acc"))) for s, t in zip(steps, traj) if _num(t.get("val_acc")) is not None]
    if acc_pts:
        (h,) = ax2.plot(*zip(*acc_pts), color=GREEDY_COLOR, marker="D", ms=3.5,
                        label="validation accuracy, measured (right axis)")
        handles.append(h)
    est = []
    if base is not None:
        est = [(s, base - _num(t.get("estimated_drop"))) for s, t in zip(steps, traj)
               if _num(t.get("estimated_drop")) is not None]
        if est:
            (h,) = ax2.plot(*zip(*est), color=GREEDY_COLOR, ls=":", lw=1.2, alpha=0.8,
                            label="FP32 val acc − additive estimated drop (right axis)")
            handles.append(h)
        h = ax2.axhline(base, color=FP32_COLOR, lw=0.9, ls="-.", alpha=0.7,
                        label=f"FP32 validation accuracy {base:.2f}%")
        handles.append(h)
        if max_drop is not None:
            h = ax2.axhline(base - max_drop, color=BUDGET_COLOR, lw=1.4, ls="--",
                            label=f"budget: FP32 − {_points(max_drop)}")
            handles.append(h)
            ax2.axhspan(base - max_drop, base, color=BUDGET_COLOR, alpha=0.08, lw=0)
    ys = [a for _, a in acc_pts + est] + ([base, base - max_drop] if base is not None and max_drop is not None
                                    else [base] if base is not None else [])
    if ys:
        lo, hi = min(ys), max(ys)
        p = max(0.3, 0.08 * (hi - lo))
        ax2.set_ylim(lo - p, hi + p)
    ax.set_xlabel("greedy step (one layer narrowed per step; step 0 = FP32)")
    ax.set_ylabel("Arithmetic intensity (FLOPs/byte)", color=AI_COLOR)
    ax.tick_params(axis="y", colors=AI_COLOR)
    ax2.set_ylabel("Validation accuracy (%)", color=GREEDY_COLOR)
    ax2.tick_params(axis="y", colors=GREEDY_COLOR)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(steps) <= 10:
        ax.set_xticks(steps)
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    n_eval = greedy.get("evaluations")
    sub = f"{len(steps) - 1} steps" + (f", {n_eval} evaluations" if n_eval is not None else "")
    fig.suptitle(_title("Greedy search trajectory", synthetic) + f"\n{sub}")
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return fig


def plot_roofline(b04: dict, synthetic: bool = False, devices: dict | None = None) -> Figure:
    """Roofline of each device, with the stage-4 configurations placed at their AI."""
    if devices is None:
        from utils.ai_calculator import DEVICES as devices
    from utils.ai_calculator import attainable_flops, ridge_point
    if not devices:
        raise SkipPlot("utils.ai_calculator.DEVICES is empty")
    rows = _configs_04(b04)
    ais = np.array([_num(c["ai"]) for c in rows])
    ridges = {name: ridge_point(d) for name, d in devices.items()}
    lo_x = 10 ** math.floor(math.log10(min(ais.min(), min(ridges.values())) / 3))
    hi_x = 10 ** math.ceil(math.log10(max(ais.max(), max(ridges.values())) * 8))
    xs = np.geomspace(lo_x, hi_x, 400)

    fig = _new_figure((12.5, 5.6))
    ax, axz = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.25, 1]))
    dev_handles = []
    zlo, zhi = ais.min() / 1.12, ais.max() * 1.12
    zx = np.linspace(zlo, zhi, 100)
    ridge_labels = []
    for k, (name, d) in enumerate(devices.items()):
        col, ls = DEVICE_STYLES[k % len(DEVICE_STYLES)]
        ys = np.asarray(attainable_flops(xs, d)) / 1e12
        (h,) = ax.plot(xs, ys, color=col, ls=ls, lw=1.6,
                       label=f"{name}: {d['peak_flops'] / 1e12:g} TFLOP/s, {d['bandwidth'] / 1e12:g} TB/s")
        dev_handles.append(h)
        rp = ridges[name]
        ax.plot([rp], [d["peak_flops"] / 1e12], marker="o", ms=7, mfc="white", mec=col, mew=1.6,
                zorder=5)
        ridge_labels.append(dict(x=rp, y=d["peak_flops"] / 1e12, text=f"ridge {rp:.0f}", color=col))
        zy = np.asarray(attainable_flops(zx, d)) / 1e12
        axz.plot(zx, zy, color=col, ls=ls, lw=1.6)
        axz.annotate(name, (zx[-1], zy[-1]), xytext=(-4, 6), textcoords="offset points", ha="right",
                     va="bottom", color=col, fontsize=8, fontweight="bold",
                     bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    dev_handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="k", mew=1.4,
                              label="ridge point (FLOPs/byte): memory-bound left of it"))
    ax.axvspan(zlo, zhi, color="#1f77b4", alpha=0.08, lw=0)
    cfg_handles = []
    for c, a in zip(rows, ais):
        st = config_style(c["name"])
        ax.axvline(a, color=st["color"], lw=0.8, alpha=0.7, zorder=1)
        for name, d in devices.items():
            y = attainable_flops(a, d) / 1e12
            ax.plot([a], [y], ls="none", marker=st["marker"], ms=st["markersize"] * 0.7,
                    color=st["color"], zorder=4 + 1 / st["markersize"])
            axz.plot([a], [y], ls="none", marker=st["marker"], ms=st["markersize"] * 0.85,
                     color=st["color"], mec="white", mew=0.5, zorder=4 + 1 / st["markersize"])
        axz.axvline(a, color=st["color"], lw=0.7, alpha=0.5, zorder=1)
        cfg_handles.append(Line2D([], [], ls="none", marker=st["marker"], ms=st["markersize"] * 0.8,
                                  color=st["color"], label=f"{display_name(c['name'])}: AI {a:.2f}"))
    for a_ in (ax,):
        a_.set_xscale("log")
        a_.set_yscale("log")
    ax.set_xlim(lo_x, hi_x)
    peaks = [d["peak_flops"] / 1e12 for d in devices.values()]
    ymin = min(float(attainable_flops(lo_x, d)) for d in devices.values()) / 1e12
    ax.set_ylim(ymin / 1.5, max(peaks) * 3)
    ax.set_xlabel("Arithmetic intensity (FLOPs/byte, log)")
    ax.set_ylabel("Attainable throughput (TFLOP/s, log)")
    ax.set_title("Roofline; shaded: the configurations' AI range")
    ax.legend(handles=dev_handles, loc="lower right")
    axz.set_xlim(zlo, zhi)
    ztop = max(float(attainable_flops(zhi, d)) for d in devices.values()) / 1e12
    zbot = min(float(attainable_flops(zlo, d)) for d in devices.values()) / 1e12
    axz.set_ylim(max(0.0, zbot - 0.08 * (ztop - zbot)), ztop + 0.12 * (ztop - zbot))
    axz.set_xlabel("Arithmetic intensity (FLOPs/byte)")
    axz.set_ylabel("Attainable throughput (TFLOP/s)")
    ridge_min = min(ridges.values())
    bound = "all memory-bound" if ais.max() < ridge_min else "some compute-bound"
    axz.set_title(f"Zoom on the configurations ({bound})")
    fig.suptitle(_title("Where the configurations sit on each device's roofline", synthetic))
    fig.legend(handles=cfg_handles, loc="outside lower center", ncols=4)
    _place_labels(fig, ax, ridge_labels, fontsize=7.5)
    return fig


def plot_training_curve(b01: dict, synthetic: bool = False) -> Figure:
    """Loss and accuracy per epoch of the FP32 baseline training."""
    hist = [h for h in (b01.get("history") or []) if isinstance(h, dict) and "epoch" in h]
    if not hist:
        raise SkipPlot("01_baseline.json has no training history")
    hist.sort(key=lambda h: h["epoch"])
    ep = [h["epoch"] for h in hist]

    def series(key):
        pts = [(e, _num(h.get(key))) for e, h in zip(ep, hist) if _num(h.get(key)) is not None]
        return tuple(zip(*pts)) if pts else None

    fig = _new_figure((10.5, 4.6))
    axl, axa = fig.subplots(1, 2)
    handles = []
    mk = dict(marker="o", ms=3) if len(ep) <= 40 else {}   # short runs: show every epoch
    for split, color in (("train", AI_COLOR), ("val", VAL_COLOR)):
        drawn = False
        for ax_, key in ((axl, f"{split}_loss"), (axa, f"{split}_acc")):
            s = series(key)
            if s:
                ax_.plot(*s, color=color, **mk)
                drawn = True
        if drawn:
            handles.append(Line2D([], [], color=color, label="train" if split == "train" else "validation",
                                  **mk))
    test = _num(b01.get("test_acc"))
    if test is not None:
        handles.append(axa.plot([ep[-1]], [test], ls="none", marker="*", ms=12, color=FP32_COLOR,
                                label=f"final test accuracy {test:.2f}%", zorder=5)[0])
    axl.set_xlabel("epoch")
    axl.set_ylabel("cross-entropy loss")
    axl.set_title("Loss")
    axa.set_xlabel("epoch")
    axa.set_ylabel("accuracy (%)")
    axa.set_title("Accuracy")
    pad = max(0.5, 0.02 * (ep[-1] - ep[0]))
    for a in (axl, axa):
        a.xaxis.get_major_locator().set_params(integer=True)
        if len(ep) <= 10:
            a.set_xticks(ep)
        a.set_xlim(ep[0] - pad, ep[-1] + pad)
    sec = _num(b01.get("seconds_per_epoch"))
    sub = f"{len(ep)} epochs" + (f", {sec:.1f} s/epoch" if sec is not None else "")
    fig.suptitle(_title("FP32 baseline training", synthetic) + f"\n{sub}")
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig


# ---------------------------------------------------------------------------------------------
# Markdown summary


def bits_summary(config: dict, layer_names=None, params: dict | None = None) -> str:
    """'all 8-bit', 'all fp32', or e.g. '8b×2 4b×12 3b×6 fp32×2 (4.13 bits/weight)'."""
    names = list(layer_names) if layer_names else list(config)
    if not names:
        return "all fp32"
    bits = [int(config.get(n, FLOAT_BITS)) for n in names]
    if len(set(bits)) == 1:
        text = "all fp32" if bits[0] == FLOAT_BITS else f"all {bits[0]}-bit"
    else:
        counts = {}
        for b in sorted(bits, reverse=True):
            counts[b] = counts.get(b, 0) + 1
        text = " ".join(f"{'fp32' if b == FLOAT_BITS else f'{b}b'}×{k}"
                        for b, k in sorted(counts.items(), key=lambda t: (t[0] != FLOAT_BITS, -t[0])))
    if params and all(params.get(n) for n in names):
        tot = sum(params[n] for n in names)
        avg = sum(params[n] * b for n, b in zip(names, bits)) / tot
        if len(set(bits)) > 1:
            text += f" ({avg:.2f} bits/weight)"
    return text


def summary_markdown(b04: dict, s03: dict | None = None, p02: dict | None = None,
                     dataset: dict | None = None, synthetic: bool = False, plots=()) -> str:
    rows = [c for c in b04["configs"] if isinstance(c, dict) and "name" in c]
    if not rows:
        raise SkipPlot("04_baselines.json lists no configurations")
    fp32 = _fp32_row(b04) or {}
    ref_ai, ref_val, ref_test = _num(fp32.get("ai")), _num(fp32.get("val_acc")), _num(fp32.get("test_acc"))
    layers = _layer_params(s03, p02)
    names = [n for n, _ in layers] or None
    params = {n: p for n, p in layers} if layers else None
    dataset = dataset or b04.get("dataset") or {}
    split = b04.get("eval_split") or "validation"
    max_drop = _max_drop(b04, s03)

    def diff(a, b, spec=".2f"):
        return "–" if a is None or b is None else format(a - b, spec)

    lines = ["# AI-QS results summary", ""]
    ds_name = {"cifar10": "CIFAR-10"}.get(dataset.get("name"), dataset.get("name") or "unknown")
    if synthetic:
        lines.append(f"**Data: synthetic data** (source: {dataset.get('source', 'generated')}): a small "
                     f"deterministic stand-in, these numbers say nothing about CIFAR-10.")
    else:
        lines.append(f"Data: {ds_name} (source: {dataset.get('source', 'not recorded')}).")
    ma = b04.get("model_args") or {}
    if ma:
        lines.append(f"Model: ResNet-{ma.get('depth', '?')} (shortcut {ma.get('shortcut', '?')}, "
                     f"{ma.get('num_classes', '?')} classes).")
    if max_drop is not None:
        lines.append(f"Accuracy budget: at most {_points(max_drop)} below FP32 on the {split} split.")
    lines += ["", "| name | weight bits | AI (FLOPs/byte) | AI gain vs fp32 | val acc (%) | test acc (%) "
                  "| val drop vs fp32 (points) | test drop vs fp32 (points) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in rows:
        ai = _num(c.get("ai"))
        gain = "–" if ai is None or not ref_ai else f"{100 * (ai / ref_ai - 1):+.1f}%"
        val, test = _num(c.get("val_acc")), _num(c.get("test_acc"))
        cfg = c.get("config") if isinstance(c.get("config"), dict) else {}
        lines.append(f"| {c['name']} | {bits_summary(cfg, names, params)} | {_fmt(ai)} | {gain} "
                     f"| {_fmt(val)} | {_fmt(test)} | {diff(ref_val, val)} | {diff(ref_test, test)} |")
    basis = b04.get("dominance_basis")
    lines += ["", "Drops are FP32 minus the configuration's accuracy (positive = worse).", "",
              "Uniform configurations dominated by a searched one (at least as good in AI and accuracy, "
              "better in one), as judged by stage 4" + (f" on {basis}" if basis else "") + ":", ""]
    dom = b04.get("dominates") or {}
    if isinstance(dom, dict) and dom:
        for searched, beaten in dom.items():
            beaten = list(beaten or [])
            lines.append(f"- {searched} dominates " + (", ".join(beaten) if beaten else
                                                        "none of the uniform configurations") + ".")
    else:
        lines.append("- (stage 4 recorded no dominance results)")
    if s03:
        method, res = chosen_config(s03)
        if method:
            lines += ["", f"Stage 3's chosen configuration: {method} (AI {_fmt(res.get('ai'))} FLOPs/byte, "
                          f"val acc {_fmt(res.get('val_acc'))}%)."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# loading, saving, driving


def _producer(stage: str) -> str:
    scripts = sorted(REPO_ROOT.glob(f"{stage}_*.py"))
    return scripts[0].name if scripts else f"stage {stage}"


def load_inputs(results_dir):
    """({key: results dict or None}, {key: why it is missing}) for the four stage files."""
    data, why = {}, {}
    for key, (fname, stage) in INPUTS.items():
        try:
            data[key] = load_results_json(Path(results_dir) / fname, stage, _producer(stage))
        except UserError as e:   # this stage has no --force: leave out that advice
            data[key], why[key] = None, str(e).replace(" (or pass --force to use it anyway)", "")
    return data, why


def is_synthetic(data: dict) -> bool:
    return any(bool(((d or {}).get("dataset") or {}).get("synthetic")) for d in data.values()
               if isinstance(d, dict))


def figure_title(fig: Figure) -> str:
    """The figure's suptitle and axes titles, joined (what a reader sees as its title)."""
    sup = fig.get_suptitle() if hasattr(fig, "get_suptitle") else (
        fig._suptitle.get_text() if fig._suptitle is not None else "")
    parts = [sup] if sup else []
    parts += [a.get_title() for a in fig.axes if a.get_title()]
    return " | ".join(parts)


def save_figure(fig: Figure, plots_dir, stem: str) -> dict:
    """Render PNG and PDF in memory, then write both atomically; returns their paths."""
    out = {}
    blobs = {}
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        meta = {"CreationDate": None} if fmt == "pdf" else None   # byte-identical reruns
        fig.savefig(buf, format=fmt, dpi=PNG_DPI if fmt == "png" else None, metadata=meta)
        blobs[fmt] = buf.getvalue()
        fig.set_layout_engine("none")   # laid out by the first save; do not redo it for the second
    for fmt, data in blobs.items():
        path = Path(plots_dir) / f"{stem}.{fmt}"
        atomic_write_bytes(path, data)
        out[fmt] = path
    return out


# name -> (input keys it needs, builder(data, synthetic) -> Figure)
PLOTS = {
    "pareto": (("baselines",), lambda d, s: plot_pareto(d["baselines"], d["search"], s)),
    "sensitivity": (("per_layer",), lambda d, s: plot_sensitivity(d["per_layer"], s)),
    "bit_allocation": (("search",), lambda d, s: plot_bit_allocation(d["search"], s, d["per_layer"])),
    "search_trajectory": (("search",), lambda d, s: plot_search_trajectory(d["search"], s)),
    "roofline": (("baselines",), lambda d, s: plot_roofline(d["baselines"], s)),
    "training_curve": (("baseline",), lambda d, s: plot_training_curve(d["baseline"], s)),
}
_BAD_CONTENT = (KeyError, TypeError, ValueError, IndexError, AttributeError, SkipPlot)


def _note(msg, bar=None):
    if bar is not None:
        bar.write(msg)
    else:
        print(msg)


def generate_plots(results_dir, plots_dir=None, progress: bool = True) -> dict:
    """Make every plot whose inputs exist, and summary.md; skip the others with a one-line note.

    Returns {"plots_dir", "made": {name: {"png", "pdf", "title"}}, "skipped": {name: reason},
    "summary": path or None, "synthetic": bool, "notes": [str]}. Raises UserError if none of the
    stage results exist (or none could be used).
    """
    results_dir = Path(results_dir)
    plots_dir = Path(plots_dir) if plots_dir is not None else results_dir / "plots"
    data, why = load_inputs(results_dir)
    if all(v is None for v in data.values()):
        absent = all(not (results_dir / f).exists() for f, _ in INPUTS.values())
        files = ", ".join(f for f, _ in INPUTS.values())
        if absent:
            raise UserError(f"no stage results in {results_dir}: none of {files} exist. Run stages 1-4 "
                            f"first ({', '.join(_producer(s) for _, s in INPUTS.values())}) with the same "
                            f"--results-dir, then run this again.")
        raise UserError(f"none of the stage results in {results_dir} could be read: "
                        + " ".join(why.values()))
    synthetic = is_synthetic(data)
    notes = []
    names = {(d.get("dataset") or {}).get("name") for d in data.values() if d}
    if len(names) > 1:
        notes.append(f"note: the results files describe different datasets ({sorted(map(str, names))}); "
                     f"they were probably made by different runs.")

    made, skipped = {}, {}
    bar = None
    items = list(PLOTS.items())
    if progress:
        from tqdm import tqdm
        bar = tqdm(items, desc="plots", unit="plot", leave=False)
        it = bar
    else:
        it = items
    for n in notes:
        _note(n, bar)
    with style():
        for name, (needs, build) in it:
            missing = [k for k in needs if data[k] is None]
            if missing:
                skipped[name] = why[missing[0]]
                _note(f"skipped {name}: {why[missing[0]]}", bar)
                continue
            try:
                fig = build(data, synthetic)
            except _BAD_CONTENT as e:
                reason = str(e) if isinstance(e, SkipPlot) else \
                    f"its input has unexpected content ({type(e).__name__}: {e}); re-run the stage that wrote it"
                skipped[name] = reason
                _note(f"skipped {name}: {reason}", bar)
                continue
            except ImportError as e:
                skipped[name] = f"cannot import what it needs ({e})"
                _note(f"skipped {name}: {skipped[name]}", bar)
                continue
            paths = save_figure(fig, plots_dir, name)
            made[name] = dict(paths, title=figure_title(fig))
        if bar is not None:
            bar.close()

    summary = None
    if data["baselines"] is None:
        skipped["summary"] = why["baselines"]
        print(f"skipped summary.md: {why['baselines']}")
    else:
        try:
            ds = next(((d.get("dataset") or {}) for d in (data["baselines"], data["search"],
                                                          data["per_layer"], data["baseline"])
                       if d and d.get("dataset")), {})
            text = summary_markdown(data["baselines"], data["search"], data["per_layer"], ds, synthetic,
                                    [v["png"] for v in made.values()])
            summary = results_dir / "summary.md"
            atomic_write_text(summary, text)
        except _BAD_CONTENT as e:
            skipped["summary"] = f"04_baselines.json has unexpected content ({type(e).__name__}: {e})"
            print(f"skipped summary.md: {skipped['summary']}")
    if not made and summary is None:
        raise UserError(f"no plot could be made from {results_dir}: "
                        + " ".join(f"{k}: {v}" for k, v in skipped.items()))
    return {"plots_dir": plots_dir, "made": made, "skipped": skipped, "summary": summary,
            "synthetic": synthetic, "notes": notes}
