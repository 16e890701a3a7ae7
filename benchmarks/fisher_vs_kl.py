"""The Fisher estimate against the measured KL, candidate by candidate, from two stage-2 tables of the same
checkpoint, images and widths: one measured (`--signal measured` or `both`), one estimated (`--signal fisher`
or `both`). Writes the rank correlation over all candidates and, per kind (weight layer, tensor) and width,
the rank correlation and the median ratio estimate / measured.

    python 2_per_layer_analysis.py --results-dir results/m --a-bits 8 6 4
    python 2_per_layer_analysis.py --results-dir results/f --a-bits 8 6 4 --signal fisher
    python benchmarks/fisher_vs_kl.py results/m/02_per_layer.json results/f/02_per_layer.json --out F.json

(`benchmarks/search_speed.py --speed` writes such a pair: `<work>/new/` and `<work>/levers/`.)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from utils.errors import UserError, error_paragraph  # noqa: E402
from utils.io import PRODUCERS, atomic_write_json, load_results_json  # noqa: E402

SAME = ("checkpoint", "eval_images", "bits", "a_bits", "quantization")


def rows(table: dict, column: str) -> dict:
    """{(kind, name, bits): value of `column`} over every narrowed candidate of a stage-2 table."""
    out = {}
    for kind, bits_key in (("layers", "bits"), ("tensors", "a_bits")):
        for group in table[kind]:
            for r in group["results"]:
                if column in r and r[bits_key] != 32:
                    out[kind, group["name"], r[bits_key]] = r[column]
    return out


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(v)) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(measured: dict, estimated: dict) -> dict:
    kl, fisher = rows(measured, "kl"), rows(estimated, "fisher")
    keys = sorted(k for k in kl if k in fisher and kl[k] > 0)
    if not keys:
        raise UserError("no candidate has both a measured KL and a Fisher estimate: give a table of stage 2 "
                        "--signal measured (or both) and one of --signal fisher (or both)")
    out = {"candidates": len(keys), "spearman": spearman([kl[k] for k in keys], [fisher[k] for k in keys]),
           "by_kind_and_width": {}}
    for kind in ("layers", "tensors"):
        for bits in sorted({k[2] for k in keys if k[0] == kind}, reverse=True):
            ks = [k for k in keys if k[0] == kind and k[2] == bits]
            a, b = np.array([kl[k] for k in ks]), np.array([fisher[k] for k in ks])
            out["by_kind_and_width"][f"{kind}:{bits}"] = {
                "candidates": len(ks), "spearman": spearman(a, b) if len(ks) > 1 else None,
                "median_ratio": float(np.median(b / a)), "min_ratio": float((b / a).min()),
                "max_ratio": float((b / a).max())}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measured", type=Path, help="a 02_per_layer.json with the measured KL")
    p.add_argument("estimated", type=Path, help="a 02_per_layer.json with the Fisher estimate")
    p.add_argument("--out", type=Path, default=None, help="also write the comparison to this JSON file")
    args = p.parse_args()
    try:
        m, f = (load_results_json(path, "2", PRODUCERS["2"]) for path in (args.measured, args.estimated))
        differ = [k for k in SAME if m.get(k) != f.get(k)]
        if differ:
            raise UserError(f"the two stage-2 tables differ in {', '.join(differ)}: compare tables of the same "
                            f"checkpoint, images, widths and quantization")
        out = {"what": "the Fisher estimate of each candidate's KL against the measured KL",
               "measured": str(args.measured), "estimated": str(args.estimated),
               **{k: m.get(k) for k in SAME}, "measured_signal": m.get("signal"), "estimated_signal": f.get("signal"),
               **compare(m, f)}
    except UserError as e:
        sys.exit(error_paragraph(e))
    print(f"{out['candidates']} candidates, Spearman {out['spearman']:.3f}")
    for k, v in out["by_kind_and_width"].items():
        rho = "-" if v["spearman"] is None else f"{v['spearman']:.3f}"
        print(f"  {k:12s} {v['candidates']:3d} candidates  Spearman {rho}  median ratio {v['median_ratio']:.2f} "
              f"[{v['min_ratio']:.2f}, {v['max_ratio']:.2f}]")
    if args.out:
        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
