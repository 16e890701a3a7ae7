"""The chosen widths: per weight layer, and per tensor."""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch
import numpy as np


LABEL_LAYERS = 40   # above this many layers the bars carry no width labels
from quant.widths import FLOAT_BITS
from utils.plots.style import (SkipPlot, _groups, _layer_params, _new_figure, _num, _title,
                               chosen_config, config_style, config_widths, layer_segments)

def plot_bit_allocation(s03: dict, synthetic: bool = False, p02: dict | None = None) -> Figure:
    """Bars: the chosen configuration's weight width per layer and, when tensors were searched, the
    width of the tensor written under that name beside it (the image and the pooled features have
    only a tensor); line: weights per layer (log). Shaded bands are the model's segments."""
    method, res = chosen_config(s03)
    if method is None:
        raise SkipPlot("03_search.json has neither a greedy nor a pareto configuration")
    config = config_widths(res["config"])
    joint = bool(s03.get("joint")) or any(a not in (None, FLOAT_BITS) for _, a in config.values())
    layer_params = dict(_layer_params(s03, p02))
    names = list(config) if joint else [n for n in (layer_params or config) if config.get(n, (None, None))[0] is not None]
    widths = [config.get(n, (FLOAT_BITS, None)) for n in names]
    params = [layer_params.get(n) if w is not None else None for n, (w, _) in zip(names, widths)]
    x = np.arange(len(names))
    float_h = 9.6                   # float bars are drawn to a broken top tick labelled 32
    color = config_style(method)["color"]
    label_bars = len(names) <= LABEL_LAYERS
    per_layer = 0.6 if joint else 0.42
    fig = _new_figure((min(26.0, max(8.0, per_layer * len(names) + 3.0)), 5.8))
    ax = fig.add_subplot()
    ax.grid(axis="x", visible=False)
    groups = _groups(names, layer_segments(s03, p02))
    for k, (g, first, last) in enumerate(groups):
        if k % 2 == 0:
            ax.axvspan(first - 0.5, last + 0.5, color="#000000", alpha=0.055, lw=0, zorder=0)
        if g and (last - first + 1) * per_layer >= 0.25 * len(g) * 0.6:   # the label fits its band
            ax.text((first + last) / 2, 10.75, g, ha="center", va="center", fontsize=7 if len(groups) > 12 else 8.5,
                    fontweight="bold", color="#333333", rotation=90 if len(groups) > 12 else 0)
    bar_w = 0.38 if joint else 0.7
    series = [("weights", [w for w, _ in widths], -bar_w / 2 if joint else 0.0, 0.85, None)]
    if joint:
        series.append(("tensor written", [a for _, a in widths], bar_w / 2, 0.45, "..."))
    has_params = any(p is not None for p in params)
    ax2 = ax.twinx() if has_params else None
    handles = []
    for what, bits, off, alpha, hatch in series:
        heights = [0 if b is None else float_h if b == FLOAT_BITS else b for b in bits]
        q = [i for i, b in enumerate(bits) if b not in (None, FLOAT_BITS)]
        f = [i for i, b in enumerate(bits) if b == FLOAT_BITS]
        ax.bar([x[i] + off for i in q], [heights[i] for i in q], width=bar_w, color=color, alpha=alpha,
               hatch=hatch, edgecolor=color if hatch else None, zorder=2)
        ax.bar([x[i] + off for i in f], [heights[i] for i in f], width=bar_w, facecolor="white",
               edgecolor="#555555", hatch="///", zorder=2)
        handles.append(Patch(fc=color, alpha=alpha, hatch=hatch, ec=color if hatch else None,
                             label=f"{method}: {what} width"))
        for i in range(len(names)) if label_bars else ():   # on the twin axes, so the params line passes behind
            if bits[i] is None:
                continue
            (ax2 or ax).text(x[i] + off, heights[i] + 0.12, "fp32" if bits[i] == FLOAT_BITS else str(bits[i]),
                             transform=ax.transData, ha="center", va="bottom", fontsize=6.5 if joint else 7.5,
                             zorder=5, bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
    if any(b == FLOAT_BITS for w, a in widths for b in ((w, a) if joint else (w,))):
        handles.append(Patch(fc="white", ec="#555555", hatch="///", label="left in float (fp32, not to scale)"))
    ax.set_ylim(0, 11.4)
    ax.set_yticks([0, 2, 3, 4, 5, 6, 7, 8, float_h], ["0", "2", "3", "4", "5", "6", "7", "8", "32"])
    ax.set_xticks(x, names, rotation=60 if len(names) <= LABEL_LAYERS else 90, ha="right",
                  rotation_mode="anchor", fontsize=7.5 if len(names) <= LABEL_LAYERS else 5.5)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("width (bits)")
    ax.set_xlabel("weight layer / tensor written under that name (network order)" if joint else "layer (network order)")
    kw = dict(transform=ax.get_yaxis_transform(), color="k", clip_on=False, lw=1)
    for yb in (8.7, 8.95):   # break marks on the y axis between 8 and the float tick
        ax.plot([-0.012, 0.012], [yb - 0.12, yb + 0.12], **kw)
    if has_params:
        ax2.grid(False)
        px = [x[i] for i, p in enumerate(params) if p is not None]
        py = [p for p in params if p is not None]
        (ln,) = ax2.plot(px, py, color="#333333", lw=1.0, marker="o", ms=4 if label_bars else 2, mfc="white", mew=1,
                         zorder=3, label="weights per layer (right axis, log)")
        ax2.set_yscale("log")
        ax2.set_ylim(min(py) / 2, max(py) * 40)   # keeps the line below the bit labels
        ax2.set_ylabel("weights per layer (count, log scale)")
        handles.append(ln)
        tot = sum(py)
        weighted = [(p, w) for p, (w, _) in zip(params, widths) if p is not None and w is not None]
        if len(weighted) == len(layer_params or weighted) and tot:
            avg = sum(p * w for p, w in weighted) / tot
            handles.append(Patch(fc="none", ec="none", label=f"average {avg:.2f} bits/weight"))
    ai, acc = _num(res.get("ai")), _num(res.get("val_acc"))
    extra = ", ".join(s for s in (f"modelled AI {ai:.2f} FLOPs/byte" if ai is not None else "",
                                  f"search accuracy {acc:.2f}%" if acc is not None else "") if s)
    fig.suptitle(_title(f"Width allocation chosen by the {method} search", synthetic)
                 + (f"\n{extra}" if extra else ""))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig
