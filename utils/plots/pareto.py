"""Test accuracy against arithmetic intensity, with intervals."""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import ScalarFormatter

from utils.plots.style import (BUDGET_COLOR, PARETO_COLOR, SkipPlot, _configs_04, _fp32_row, _max_drop,
                               _new_figure, _num, _place_labels, _points, _title, config_style, display_name)


def plot_pareto(b04: dict, s03: dict | None = None, synthetic: bool = False, deploy: dict | None = None) -> Figure:
    """Test accuracy (with its 95% interval) vs modelled AI of every stage-4 configuration, the budget
    band, the estimated frontier, and, after fine-tuning, an arrow from each PTQ point to its QAT point.
    With a deploy_speed.json (``deploy``), a second panel: measured throughput against accuracy on the
    runtime, beside the modelled one."""
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
        frontier = _upper_envelope(frontier)

    accs = [_num(c["test_acc"]) for c in rows]
    qat = {c["name"]: _num(c.get("qat_test_acc")) for c in rows if _num(c.get("qat_test_acc")) is not None}
    top = max(accs + list(qat.values()) + ([ref] if ref is not None else []))
    # Zoom on the interesting range; configurations far below it are drawn on the bottom edge.
    span = max(8.0, 5 * (max_drop or 0))
    floor_ = (ref if ref is not None else top) - span
    shown = [a for a in accs + list(qat.values()) if a >= floor_]
    low = min(shown + ([ref - max_drop] if ref is not None and max_drop else []))
    off_scale = any(a < floor_ for a in accs)
    pad = max(0.4, 0.06 * (top - low))
    ylo, yhi = low - pad * (2.5 if off_scale else 1), top + pad
    ais = [_num(c["ai"]) for c in rows] + [f[0] for f in frontier]
    log_x = max(ais) / min(ais) > 3     # weight-only spans 1.6x, activations up to 8x
    if log_x:
        xlo, xhi = min(ais) / 1.15, max(ais) * 1.15
    else:
        xpad = max(0.5, 0.06 * (max(ais) - min(ais)))
        xlo, xhi = min(ais) - xpad, max(ais) + xpad

    measured = [r for r in (deploy or {}).get("results") or []
                if _num(r.get("throughput_b64")) is not None and _num(r.get("test_acc")) is not None]
    fig = _new_figure((15.0, 5.6) if measured else (9.0, 5.4))
    ax, axm = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.5, 1])) if measured else (fig.add_subplot(), None)
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
                          label="estimated frontier (additive val drops)")
        handles.append(line)

    labels = []
    for c, a in zip(rows, accs):
        st = config_style(c["name"])
        x = _num(c["ai"])
        if a >= floor_:
            # smaller markers on top, so that coinciding points (greedy = pareto) both show
            ci = c.get("test_acc_ci95")
            if isinstance(ci, list) and len(ci) == 2 and None not in ci:
                ax.errorbar([x], [a], yerr=[[max(0.0, a - max(ci[0], ylo))], [max(0.0, ci[1] - a)]], fmt="none", ecolor=st["color"],
                            elinewidth=1.0, capsize=2.5, alpha=0.6, zorder=3)
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
        if c["name"] in qat:
            q = qat[c["name"]]
            ax.annotate("", (x, q), (x, min(max(a, ylo + 0.6 * pad), yhi)), zorder=5,
                        arrowprops=dict(arrowstyle="->", color=st["color"], lw=1.1, alpha=0.9))
            ax.plot([x], [q], ls="none", marker=st["marker"], ms=st["markersize"], mfc="white", mec=st["color"],
                    mew=1.4, zorder=5)
            label += f" → {q:.2f}% QAT" + (" (post-training kept)" if c.get("qat_answer") == "post-training" else "")
        handles.append(Line2D([], [], ls="none", marker=st["marker"], ms=st["markersize"] * 0.8,
                              color=st["color"], label=label))
    if qat:
        epochs = next((c.get("qat_epochs") for c in rows if c.get("qat_epochs")), None)
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="k", mew=1.2,
                              label=f"hollow: fine-tuned, {epochs} epoch{'s' if epochs != 1 else ''} of QAT"))

    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())     # 30, 100, 200 rather than 3x10^1
        ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    ax.set_xlabel("Modelled arithmetic intensity (FLOPs/byte" + (", log)" if log_x else ")"))
    report = b04.get("report_split") or "test"
    n = ((b04.get("dataset") or {}).get("report") or {}).get("images")
    ax.set_ylabel(f"Accuracy on {report} (%)" + (f", {n} images" if n else ""))
    fig.suptitle(_title("Accuracy vs modelled arithmetic intensity (bars: 95% Wilson intervals)", synthetic)
                 + ("; right: measured on the runtime" if measured else ""))
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    _place_labels(fig, ax, labels)
    if measured:
        _measured_panel(axm, deploy, measured, ref, max_drop)
    return fig


def _measured_panel(ax, deploy: dict, rows: list, ref, max_drop):
    """Measured throughput (batch 64) against accuracy, one point per exported model."""
    names = {"ort_quantize_static": "ONNX Runtime quantize_static"}
    labels = []
    if ref is not None and max_drop is not None:
        ax.axhspan(ref - max_drop, ref, color=BUDGET_COLOR, alpha=0.13, lw=0, zorder=0)
    for r in rows:
        st = config_style(r["name"]) if r["name"] != "ort_quantize_static" else \
            {"color": "#555555", "marker": "X", "markersize": 9}
        x, y = _num(r["throughput_b64"]), _num(r["test_acc"])
        ax.plot([x], [y], ls="none", marker=st["marker"], ms=st["markersize"], color=st["color"], mec="white",
                mew=0.6, zorder=4)
        speed = _num(r.get("speedup_b64"))
        labels.append(dict(x=x, y=y, color=st["color"],
                           text=f"{names.get(r['name'], display_name(r['name']))}"
                                + (f" ({speed:.2f}x)" if speed else "")))
    xs = [_num(r["throughput_b64"]) for r in rows]
    ys = [_num(r["test_acc"]) for r in rows] + ([ref] if ref is not None else [])
    ax.set_xlim(0, max(xs) * 1.25)
    pad = max(0.3, 0.1 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys + ([ref - max_drop] if ref is not None and max_drop else [])) - pad, max(ys) + pad)
    ax.set_xlabel(f"Measured throughput, batch 64 (images/s), {deploy.get('threads', '?')} threads")
    ax.set_ylabel("Accuracy on test (%), through the runtime")
    ax.set_title(f"{deploy.get('runtime', 'runtime')}", fontsize=9)
    _place_labels(ax.figure, ax, labels)


def _upper_envelope(points):
    """The points no other point beats in both AI and estimated accuracy. The DP's frontier is
    over estimated KL; re-expressed as additive drops it zigzags, which reads as noise."""
    kept, best = [], float("-inf")
    for ai, acc in sorted(points, reverse=True):
        if acc > best:
            kept.append((ai, acc))
            best = acc
    return kept[::-1]
