"""Per-layer sensitivity heat map."""
from __future__ import annotations

from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
import matplotlib
import numpy as np


TEXT_ROWS = 60   # beyond this many layers the cells carry colour only, and rows get thinner
from quant.widths import FLOAT_BITS
from utils.plots.style import (SkipPlot, _groups, _new_figure, _num, _title, layer_segments)

def plot_sensitivity(p02: dict, synthetic: bool = False) -> Figure:
    """Heatmap: accuracy drop with only one group changed, rows = weight layers and tensors by name
    (network order), columns = weight widths, then tensor widths when stage 2 measured them;
    separators between the model's segments."""
    layers = {str(l["name"]): l for l in p02["layers"] if isinstance(l, dict) and "name" in l}
    tensors = {str(t["name"]): t for t in p02.get("tensors") or [] if isinstance(t, dict) and "name" in t}
    if not layers and not tensors:
        raise SkipPlot("02_per_layer.json lists no layers")
    cols = []   # (kind, width key, width)
    for kind, wkey, listed, entries in (("W", "bits", p02.get("bits"), layers), ("A", "a_bits", p02.get("a_bits"), tensors)):
        widths = [int(b) for b in (listed or [])]
        for e in entries.values():
            for r in e.get("results") or []:
                if int(r[wkey]) not in widths:
                    widths.append(int(r[wkey]))
        cols += [(kind, wkey, b) for b in sorted(widths, reverse=True)]
    if not cols:
        raise SkipPlot("02_per_layer.json has no bit widths")
    names = list(dict.fromkeys([*tensors, *layers])) if tensors else list(layers)
    drop = np.full((len(names), len(cols)), np.nan)
    for i, n in enumerate(names):
        for j, (kind, wkey, b) in enumerate(cols):
            entry = (layers if kind == "W" else tensors).get(n) or {}
            for r in entry.get("results") or []:
                v = _num(r.get("drop"))
                if v is None and _num(r.get("val_acc")) is not None and _num(p02.get("baseline_val_acc")) is not None:
                    v = _num(p02["baseline_val_acc"]) - _num(r["val_acc"])
                if int(r[wkey]) == b and v is not None:
                    drop[i, j] = v

    finite = drop[np.isfinite(drop)]
    if not finite.size and (p02.get("signal") or {}).get("name") == "fisher":
        raise SkipPlot("02_per_layer.json holds Fisher estimates only (stage 2 --signal fisher): no measured drop "
                       "to plot")
    vmax = max(1.0, float(finite.max()) if finite.size else 1.0)
    # Drops span 0.01 to ~80 points: log colors above 0.1 point, linear below; a rise in accuracy
    # (negative drop, evaluation noise) gets the pale "under" color, its value is in the cell.
    norm = SymLogNorm(linthresh=0.1, linscale=0.5, vmin=0.0, vmax=vmax, base=10)
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#dddddd", under="#dbe7f5")
    text = len(names) <= TEXT_ROWS
    row_h = 0.27 if text else 0.15

    fig = _new_figure((2.6 + 0.85 * len(cols) + 1.3, 1.6 + row_h * len(names)))
    ax = fig.add_subplot()
    ax.grid(False)
    im = ax.imshow(np.ma.masked_invalid(drop), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for i in range(len(names)) if text else ():
        for j in range(len(cols)):
            v = drop[i, j]
            if np.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="#555555")
                continue
            txt = f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
            dark = float(norm(v)) > 0.62
            ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    for _, first, _last in _groups(names, layer_segments(p02))[1:]:
        ax.axhline(first - 0.5, color="black", lw=1.0 if text else 0.5)
    n_w = sum(1 for c in cols if c[0] == "W")
    if 0 < n_w < len(cols):
        ax.axvline(n_w - 0.5, color="black", lw=2.0)
    ax.set_xticks(range(len(cols)), [kind + (str(b) if b != FLOAT_BITS else "fp32") for kind, _, b in cols])
    ax.set_yticks(range(len(names)), names, fontsize=7 if text else 5)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.tick_params(length=0)
    ax.set_xlabel("width of the one quantized group (everything else fp32):\nW = a layer's weights, A = the tensor "
                  "written under that name; n/a: no such group")
    ax.set_ylabel("layer / tensor (network order; lines separate the model's segments)")
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02,
                      extend="min" if finite.size and finite.min() < 0 else "neither")
    ticks = [t for t in (0, 0.1, 0.3, 1, 3, 10, 30, 100) if t <= vmax]
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()
    cb.set_label("accuracy drop (points); log color scale above 0.1, blue: accuracy rose")
    base = _num(p02.get("baseline_val_acc"))
    split = p02.get("eval_split") or "validation"
    sub = (f"FP32 {split} accuracy {base:.2f}% on {p02.get('eval_images', '?')} images" if base is not None else "")
    fig.suptitle(_title("Sensitivity: accuracy drop, one weight layer or tensor quantized at a time", synthetic)
                 + (f"\n{sub}" if sub else ""))
    return fig
