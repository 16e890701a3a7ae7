"""The float baseline's training curve."""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from utils.plots.style import (AI_COLOR, FP32_COLOR, SkipPlot, VAL_COLOR, _new_figure, _num, _title)


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
