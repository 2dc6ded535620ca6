"""The ARC tuning sweep behind ARCConfig's defaults, as a table of finished tca_table rows.

    python benchmarks/arc_tuning.py --tags 0aad52f99ed3 e37e89cf4905 \
        --defaults "lambda_align 0.1, scale_init smoothquant, fake_quant_weights true"

Rows come from runs/tca_table_quick/done (made by ``benchmarks/tca_table.py --quick --variants ...``);
``--tags`` picks the runs made under one set of ARC defaults (the ``defaults`` field tca_table writes),
whose values ``--defaults`` states, since each variant's overrides are relative to them. Writes
benchmarks/results/arc_tuning_quick.{md,csv,json} with a mean over the two tiny models per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from common import ROOT, now, write_tables

COLUMNS = ("variant", "model", "psnr_vs_fp", "fid", "cond_acc", "calib_seconds", "mean_psnr_both_models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", nargs="+", required=True, help="tca_table 'defaults' tags of the sweep's rows")
    parser.add_argument("--defaults", required=True, help="the ARC defaults those rows ran under, in words")
    args = parser.parse_args()
    rows = []
    for path in sorted((ROOT / "runs" / "tca_table_quick" / "done").glob("*.json")):
        row = json.loads(path.read_text())
        if row.get("defaults") in args.tags and (row["variant"], row["model"]) not in {(r["variant"], r["model"]) for r in rows}:
            rows.append(row)  # one row per variant and model (a rerun under an equivalent tag gives the same numbers)
    if not rows:
        sys.exit(f"no finished rows with tags {args.tags} in runs/tca_table_quick/done: run benchmarks/tca_table.py "
                 "--quick --variants ... first")
    by_variant = defaultdict(dict)
    for row in rows:
        by_variant[row["variant"]][row["model"]] = row["psnr_vs_fp"]
    for row in rows:
        both = by_variant[row["variant"]]
        row["mean_psnr_both_models"] = sum(both.values()) / len(both) if len(both) == 2 else None
    rows.sort(key=lambda r: (-(r["mean_psnr_both_models"] or 0), r["variant"], r["model"]))
    header = {"date": now(), "machine": "rows from benchmarks/tca_table.py --quick (see each row's command)",
              "invocation": "python benchmarks/arc_tuning.py " + " ".join(
                  a if " " not in a else repr(a) for a in sys.argv[1:])}
    notes = [f"ARC defaults of these runs (each variant's overrides are relative to them): {args.defaults}",
             "quick budget: 64 samples, 20 steps, calibration 16 x 10, W4A4 groups of 32; PSNR vs FP in dB",
             "a variant's mean needs both models' rows"]
    print(write_tables("arc_tuning_quick", "ARC tuning sweep (quick budget)", header, rows, COLUMNS, notes))


if __name__ == "__main__":
    main()
