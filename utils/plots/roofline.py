"""Where the configurations sit on each device's roofline."""
from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from utils.plots.style import (DEVICE_STYLES, SkipPlot, _configs_04, _new_figure, _num, _place_labels, _title,
                               config_style, display_name)


def plot_roofline(b04: dict, synthetic: bool = False, devices: dict | None = None) -> Figure:
    """Roofline of each device, with the stage-4 configurations placed at their AI."""
    if devices is None:
        from quant.cost import DEVICES as devices
    from quant.cost import attainable_flops, ridge_point
    if not devices:
        raise SkipPlot("quant.cost.DEVICES is empty")
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
    ax.set_xlabel("Modelled arithmetic intensity (FLOPs/byte, log)")
    ax.set_ylabel("Attainable throughput (TFLOP/s, log)")
    ax.set_title("Roofline; shaded: the configurations' AI range")
    ax.legend(handles=dev_handles, loc="lower right")
    axz.set_xlim(zlo, zhi)
    ztop = max(float(attainable_flops(zhi, d)) for d in devices.values()) / 1e12
    zbot = min(float(attainable_flops(zlo, d)) for d in devices.values()) / 1e12
    axz.set_ylim(max(0.0, zbot - 0.08 * (ztop - zbot)), ztop + 0.12 * (ztop - zbot))
    axz.set_xlabel("Modelled arithmetic intensity (FLOPs/byte)")
    axz.set_ylabel("Attainable throughput (TFLOP/s)")
    ridge_min = min(ridges.values())
    bound = "all memory-bound" if ais.max() < ridge_min else "some compute-bound"
    axz.set_title(f"Zoom on the configurations ({bound})")
    cm = (b04.get("cost_model") or {}).get("name")
    fig.suptitle(_title("Where the configurations sit on each device's roofline", synthetic)
                 + (f"\nAI modelled by the {cm} cost model, not measured" if cm else "\nAI modelled, not measured"))
    fig.legend(handles=cfg_handles, loc="outside lower center", ncols=4)
    _place_labels(fig, ax, ridge_labels, fontsize=7.5)
    return fig
