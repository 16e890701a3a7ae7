"""The Markdown summary table of stages 1-4."""
from __future__ import annotations

from pathlib import Path

# stage 4's relation for more AI at an accuracy whose paired interval contains zero (and its name before 2026-12-01)
NOT_DIFFERENT = "higher AI, accuracy not significantly different"
NOT_DIFFERENT_NAMES = (NOT_DIFFERENT, "higher AI at a statistically equal accuracy")


# ---------------------------------------------------------------------------------------------
# Markdown summary
from quant.widths import FLOAT_BITS
from utils.plots.style import (SkipPlot, _fmt, _fp32_row, _layer_params, _max_drop, _num, _points,
                               chosen_config, config_widths)

def bits_summary(config: dict, layer_names=None, params: dict | None = None) -> str:
    """'all 8-bit', 'all fp32', or e.g. '8b×2 4b×12 fp32×2 (4.13 bits/weight)' for the weights; with
    tensor widths, 'W: 8b×2 4b×20; A: 8b×16 6b×8' (A counts tensors)."""
    cw = config_widths(config)
    names = list(layer_names) if layer_names else [n for n, (w, _) in cw.items() if w is not None]
    if not names:
        return "all fp32"
    widths = [(cw.get(n, (FLOAT_BITS, None))[0], None) for n in names]
    tensor_widths = [a for _, a in cw.values() if a is not None]

    def counts(bits):
        if len(set(bits)) == 1:
            return "all fp32" if bits[0] == FLOAT_BITS else f"all {bits[0]}-bit"
        c = {}
        for b in bits:
            c[b] = c.get(b, 0) + 1
        return " ".join(f"{'fp32' if b == FLOAT_BITS else f'{b}b'}×{k}"
                        for b, k in sorted(c.items(), key=lambda t: (t[0] != FLOAT_BITS, -t[0])))
    w = [a for a, _ in widths]
    acts = tensor_widths
    text = counts(w)
    if params and all(params.get(n) for n in names) and len(set(w)) > 1:
        tot = sum(params[n] for n in names)
        text += f" ({sum(params[n] * b for n, b in zip(names, w)) / tot:.2f} bits/weight)"
    if any(a != FLOAT_BITS for a in acts):
        text = f"W: {text}; A: {counts(acts)}"
    return text


def _ci(pair):
    return "–" if not isinstance(pair, list) or len(pair) != 2 or None in pair else f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def summary_markdown(b04: dict, s03: dict | None = None, p02: dict | None = None,
                     dataset: dict | None = None, synthetic: bool = False, plots=(), deploy: dict | None = None) -> str:
    rows = [c for c in b04["configs"] if isinstance(c, dict) and "name" in c]
    if not rows:
        raise SkipPlot("04_baselines.json lists no configurations")
    fp32 = _fp32_row(b04) or {}
    ref_ai = _num(fp32.get("ai"))
    layers = _layer_params(s03, p02)
    names = [n for n, _ in layers] or None
    params = {n: p for n, p in layers} if layers else None
    dataset = dataset or b04.get("dataset") or {}
    split = b04.get("eval_split") or "validation"
    report = b04.get("report_split") or "test"
    max_drop = _max_drop(b04, s03)
    budget = b04.get("budget") or (s03 or {}).get("budget") or {}
    qat = any(_num(c.get("qat_test_acc")) is not None for c in rows)

    lines = ["# AI-QS results summary", ""]
    ds_name = {"cifar10": "CIFAR-10"}.get(dataset.get("name"), dataset.get("name") or "unknown")
    if synthetic:
        lines.append(f"**Data: synthetic data** (source: {dataset.get('source', 'generated')}): a small "
                     f"deterministic stand-in, these numbers say nothing about CIFAR-10.")
    else:
        lines.append(f"Data: {ds_name} (source: {dataset.get('source', 'not recorded')}).")
    search, rep = dataset.get("search") or {}, dataset.get("report") or {}
    if search or rep:
        lines.append(f"Search images: {search.get('images', '?')} ({split}); reported on {rep.get('images', '?')} "
                     f"images ({report}) that the search never saw.")
    ma = b04.get("model_args") or {}
    if ma:
        lines.append(f"Model: {ma.get('arch', '?')}" + (f" (shortcut {ma['shortcut']})" if ma.get("shortcut") else "")
                     + f", {ma.get('num_classes', '?')} classes.")
    cm = b04.get("cost_model") or {}
    if cm:
        lines.append(f"AI is modelled, not measured: the {cm.get('name', '?')} cost model at batch "
                     f"{cm.get('batch_size', 1)} ({cm.get('target', 'generic')} kernels): {cm.get('convention', '')}.")
    if max_drop is not None:
        z = _num(budget.get("z"))
        lines.append(f"Accuracy budget: at most {_points(max_drop)} below FP32"
                     + (f", as search drop + {z:.2f} × its standard error" if z else "") + f" on the {split} split.")
    head = ("| name | widths | modelled AI (FLOPs/byte) | × fp32 | search acc (%) | test acc (%) | test 95% CI "
            "| test drop | drop 95% CI |")
    sep = "|---|---|---:|---:|---:|---:|---|---:|---|"
    if qat:
        head += " QAT test acc (%), mean ± sd | QAT drop vs fine-tuned fp32 [95% CI] | answer (selected on " \
                f"{b04.get('qat_selected_on') or 'val'}) |"
        sep += "---:|---|---|"
    lines += ["", head, sep]
    qat_ref = _num(fp32.get("qat_test_acc"))
    for c in rows:
        ai = _num(c.get("ai"))
        gain = "–" if ai is None or not ref_ai else f"{ai / ref_ai:.2f}"
        cfg = c.get("config") if isinstance(c.get("config"), dict) else {}
        line = (f"| {c['name']} | {bits_summary(cfg, names, params)} | {_fmt(ai)} | {gain} | {_fmt(c.get('val_acc'))} "
                f"| {_fmt(c.get('test_acc'))} | {_ci(c.get('test_acc_ci95'))} | {_fmt(c.get('test_drop'))} "
                f"| {_ci(c.get('test_drop_ci95'))} |")
        if qat:
            q, sd = _num(c.get("qat_test_acc")), _num(c.get("qat_test_acc_sd"))
            d = _num(c.get("qat_test_drop"))
            if d is None and q is not None and qat_ref is not None:
                d = qat_ref - q
            answer = {"post-training": "post-training (fine-tunes ended below it)", "fine-tuned":
                      f"fine-tuned (seed {c.get('qat_answer_seed')})"}.get(c.get("qat_answer"), "–") \
                if q is not None else ""
            line += (f" {_fmt(q)}{f' ± {sd:.2f}' if sd is not None else ''} | {_fmt(d)}"
                     f"{' ' + _ci(c.get('qat_test_drop_ci95')) if c.get('qat_test_drop_ci95') else ''} | {answer} |")
        lines.append(line)
    lines += ["", "Drops are FP32 minus the configuration's accuracy on the same images (positive = worse); "
                  "accuracy intervals are Wilson's, drop intervals the paired bootstrap.", ""]
    searched = [c for c in rows if "budget_holds_on_test" in c]
    for c in searched:
        confirm = ""
        if c.get("confirm_images"):
            confirm = (f", confirm drop {_fmt(c.get('confirm_drop'))} ± {_fmt(c.get('confirm_drop_se'))} on "
                       f"{c['confirm_images']} held-back images"
                       + ("" if c.get("confirm_passed") else " (nothing accepted: float)"))
        lines.append(f"- {c['name']}: search drop {_fmt(c.get('search_drop'))}{confirm}, test drop "
                     f"{_fmt(c.get('test_drop'))} {_ci(c.get('test_drop_ci95'))}: budget "
                     f"{'held' if c['budget_holds_on_test'] else 'NOT held'} on {report}.")
    comparisons = b04.get("comparisons")
    if isinstance(comparisons, dict) and comparisons:
        lines += ["", "Searched against uniform configurations on the report images: \"dominates\" only where the "
                      "paired 95% interval of the accuracy difference excludes zero (and AI is at least as high):", ""]
        for name, rows in comparisons.items():
            for rel, says in (("dominates", "dominates"),
                              (NOT_DIFFERENT, "has more AI, at an accuracy not significantly different, than")):
                vs = [f"{r['vs']} ({r['acc_diff']:+.2f} [{r['acc_diff_ci95'][0]:+.2f}, {r['acc_diff_ci95'][1]:+.2f}])"
                      for r in rows if r.get("relation") in ((rel,) if rel == "dominates" else NOT_DIFFERENT_NAMES)]
                if vs:
                    lines.append(f"- {name} {says} {', '.join(vs)}.")
            if not any(r.get("relation") in ("dominates", *NOT_DIFFERENT_NAMES) for r in rows):
                lines.append(f"- {name}: no uniform configuration is dominated or matched at lower AI.")
    else:
        basis = b04.get("dominance_basis")
        lines += ["", "Uniform configurations dominated by a searched one (at least as good in AI and accuracy, "
                      "better in one), as judged by stage 4" + (f" on {basis}" if basis else "") + ":", ""]
        dom = b04.get("dominates") or {}
        if isinstance(dom, dict) and dom:
            for name, beaten in dom.items():
                beaten = list(beaten or [])
                lines.append(f"- {name} dominates " + (", ".join(beaten) if beaten else
                                                        "none of the uniform configurations") + ".")
        else:
            lines.append("- (stage 4 recorded no dominance results)")
    if s03:
        method, res = chosen_config(s03)
        if method:
            lines += ["", f"Stage 3's chosen configuration: {method} (AI {_fmt(res.get('ai'))} FLOPs/byte, "
                          f"search accuracy {_fmt(res.get('val_acc'))}%)."]
    if deploy and deploy.get("results"):
        lines += ["", f"Measured on {deploy.get('runtime', 'the runtime')}, {deploy.get('threads', '?')} threads "
                      f"(benchmarks/deploy_speed.py; {deploy.get('images', '?')} test images), beside the modelled AI:", "",
                  "| model | throughput b64 (img/s) | × fp32 | latency b1 (ms) | × fp32 | test acc (%) | modelled AI |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in deploy["results"]:
            lines.append(f"| {r.get('name')} | {_fmt(r.get('throughput_b64'), ',.0f')} | {_fmt(r.get('speedup_b64'))} | "
                         f"{_fmt(r.get('latency_ms_b1'), '.3f')} | {_fmt(r.get('speedup_b1'))} | {_fmt(r.get('test_acc'))} | "
                         f"{_fmt(r.get('modelled_ai'))} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"
