"""The greedy search, step by step."""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from utils.plots.style import (AI_COLOR, BUDGET_COLOR, FP32_COLOR, GREEDY_COLOR, SkipPlot, _max_drop,
                               _new_figure, _num, _points, _title)


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
        (h,) = ax.plot(*zip(*ai_pts), color=AI_COLOR, marker="o", ms=4, label="modelled AI (left axis)")
        handles.append(h)
    acc_pts = [(s, _num(t.get("val_acc"))) for s, t in zip(steps, traj) if _num(t.get("val_acc")) is not None]
    if acc_pts:
        (h,) = ax2.plot(*zip(*acc_pts), color=GREEDY_COLOR, marker="D", ms=3.5,
                        label="search accuracy, measured (right axis)")
        handles.append(h)
    est = []
    fast = [s for s, t in zip(steps, traj) if t.get("phase") == "fast-forward"]
    if fast:
        ax.axvspan(0, max(fast) + 0.5, color=AI_COLOR, alpha=0.06, lw=0)
        handles.append(Patch(fc=AI_COLOR, alpha=0.15, label="fast-forward: the estimate's path, bisected "
                                                           "(accuracy measured at the probed steps only)"))
    if base is not None:
        h = ax2.axhline(base, color=FP32_COLOR, lw=0.9, ls="-.", alpha=0.7,
                        label=f"FP32 search accuracy {base:.2f}%")
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
    ax.set_xlabel("greedy step (one width narrowed per step, of a weight layer or a tensor; step 0 = FP32)")
    ax.set_ylabel("Modelled arithmetic intensity (FLOPs/byte)", color=AI_COLOR)
    ax.tick_params(axis="y", colors=AI_COLOR)
    ax2.set_ylabel("Search accuracy (%)", color=GREEDY_COLOR)
    ax2.tick_params(axis="y", colors=GREEDY_COLOR)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(steps) <= 10:
        ax.set_xticks(steps)
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    n_eval = greedy.get("evaluations")
    sub = f"{len(steps) - 1} steps" + (f", {n_eval} evaluations" if n_eval is not None else "")
    fig.suptitle(_title("Greedy search trajectory", synthetic) + f"\n{sub}")
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    return fig
