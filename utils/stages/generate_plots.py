"""Stage 5 as an importable function: figures and a Markdown summary of stages 1-4, made from
their results JSON alone.

Nothing here evaluates a model: every number plotted is read from results/0[1-4]_*.json. The
figures live in utils/plots/ (one module per family, style.py for what they share);
``generate_plots`` loads the inputs, builds every figure whose inputs are there, and writes each as
PNG and PDF atomically into <results-dir>/plots/, plus <results-dir>/summary.md.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.figure import Figure

from utils.errors import UserError
from utils.io import PRODUCERS, RESULTS_FILES, atomic_write_bytes, atomic_write_text, load_results_json
from utils.plots.allocation import plot_bit_allocation
from utils.plots.pareto import plot_pareto
from utils.plots.roofline import plot_roofline
from utils.plots.sensitivity import plot_sensitivity
from utils.plots.style import PNG_DPI, SkipPlot, style
from utils.plots.summary import summary_markdown
from utils.plots.training import plot_training_curve
from utils.plots.trajectory import plot_search_trajectory

# key -> (file name, stage); the stage scripts write these into --results-dir.
INPUTS = {key: (RESULTS_FILES[stage], stage) for key, stage in
          (("baseline", "1"), ("per_layer", "2"), ("search", "3"), ("baselines", "4"))}

# ---------------------------------------------------------------------------------------------
# loading, saving, driving


DEPLOY_FILE = "deploy_speed.json"   # benchmarks/deploy_speed.py --out <results-dir>/deploy_speed.json


def load_inputs(results_dir):
    """({key: results dict or None}, {key: why it is missing}) for the four stage files, plus the measured
    speeds of benchmarks/deploy_speed.py under "deploy" when <results-dir>/deploy_speed.json exists."""
    data, why = {}, {}
    for key, (fname, stage) in INPUTS.items():
        try:
            data[key] = load_results_json(Path(results_dir) / fname, stage, PRODUCERS[stage])
        except UserError as e:   # this stage has no --force: leave out that advice
            data[key], why[key] = None, str(e).replace(" (or pass --force to use it anyway)", "")
    data["deploy"] = None
    path = Path(results_dir) / DEPLOY_FILE
    if path.is_file():
        try:
            obj = json.loads(path.read_text())
            data["deploy"] = obj if isinstance(obj, dict) and obj.get("benchmark") == "deploy_speed" else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            data["deploy"] = None
        if data["deploy"] is None:
            why["deploy"] = f"{path} is not a deploy_speed.json; re-run benchmarks/deploy_speed.py"
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
    "pareto": (("baselines",), lambda d, s: plot_pareto(d["baselines"], d["search"], s, d.get("deploy"))),
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
    if all(data[k] is None for k in INPUTS):
        absent = all(not (results_dir / f).exists() for f, _ in INPUTS.values())
        files = ", ".join(f for f, _ in INPUTS.values())
        if absent:
            raise UserError(f"no stage results in {results_dir}: none of {files} exist. Run stages 1-4 "
                            f"first ({', '.join(PRODUCERS[s] for _, s in INPUTS.values())}) with the same "
                            f"--results-dir, then run this again.")
        raise UserError(f"none of the stage results in {results_dir} could be read: "
                        + " ".join(why.values()))
    synthetic = is_synthetic(data)
    notes = []
    names = {(d.get("dataset") or {}).get("name") for k, d in data.items() if d and k in INPUTS}
    if len(names) > 1:
        notes.append(f"note: the results files describe different datasets ({sorted(map(str, names))}); "
                     f"they were probably made by different runs.")
    if "deploy" in why:
        notes.append(f"note: left out the measured speeds: {why['deploy']}")
    elif data["deploy"] and data["baselines"] and data["deploy"].get("checkpoint") != data["baselines"].get("checkpoint"):
        notes.append(f"note: {DEPLOY_FILE} measured {data['deploy'].get('checkpoint')}, but 04_baselines.json "
                     f"quantized {data['baselines'].get('checkpoint')}; they are shown side by side anyway.")

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
                                    [v["png"] for v in made.values()], data["deploy"])
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
