"""Residual-site detection against the architectures' authors (issue 3's target).

For every entry of :data:`corpus.CORPUS` the model is built twice: with the
authors' drop path on (timm ``drop_path_rate``, torchvision ``stochastic_depth_prob``), where one
forward tells which module forwards call a drop-path module (the ground truth, see
:mod:`corpus`), and with it off, where ``find_residual_sites`` runs. Sites are
compared as multisets of scopes; the table prints precision, recall and F1 per model and the
micro-averaged totals over the corpus. A model that fails to build, to run or to be analysed
counts as a crash (all its truth sites missed) and the run goes on.

    OMP_NUM_THREADS=1 python benchmarks/residual_corpus.py
    python benchmarks/residual_corpus.py --models resnet18,torchvision:swin_t --json out.json
    python benchmarks/residual_corpus.py --split heldout   # architectures never used for tuning
    python benchmarks/residual_corpus.py --split tuned     # the corpus the rules were tuned on

The default runs both splits and prints the tuned F1 and the held-out F1 separately (and the
held-out models whose whole family was never tuned on), so generalization is measured on every
change.

Until ``find_residual_sites`` exists the script prints the ground truth only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracle lives in tests/

from corpus import (  # noqa: E402
    EXCLUDED,
    CorpusEntry,
    authors_placement,
    entries,
    family_heldout,
    prf,
    score,
    split_of,
)


def _detector() -> tuple[Optional[Callable[..., Any]], Optional[Callable[..., Any]], str]:
    """(find_residual_sites, residual_report or None, why-not) from the package, if it exists yet."""
    try:
        import regsurgery
    except Exception as exc:  # the package itself is broken
        return None, None, f"import regsurgery failed: {exc!r}"
    find = getattr(regsurgery, "find_residual_sites", None)
    report = getattr(regsurgery, "residual_report", None)
    if find is None or report is None:
        try:
            from regsurgery.analysis import residual as analysis
        except Exception as exc:
            return find, report, f"regsurgery.analysis does not import: {exc!r}"
        find = find or getattr(analysis, "find_residual_sites", None)
        report = report or getattr(analysis, "residual_report", None)
    if find is None:
        return None, None, "regsurgery has no find_residual_sites yet"
    return find, report, ""


def _short(counter: Counter, limit: int = 8) -> str:
    items = sorted(counter.items())
    text = ", ".join(f"{k or '<root>'}x{v}" if v > 1 else (k or "<root>") for k, v in items[:limit])
    return text + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def run_entry(entry: CorpusEntry, find: Optional[Callable[..., Any]], report: Optional[Callable[..., Any]]) -> dict:
    """Truth and detection for one architecture; never raises."""
    row: dict[str, Any] = {"model": entry.key, "family": entry.family, "note": entry.note,
                           "by_design": entry.by_design, "crash": None, "split": split_of(entry),
                           "family_heldout": family_heldout(entry)}
    stage = "build (drop path on)"
    try:
        model_on = entry.build(drop_path=True)
        stage = "ground truth forward"
        t0 = time.perf_counter()
        placement = authors_placement(model_on, entry.example_input())
        row["truth_time_s"] = time.perf_counter() - t0
        truth = placement.sites
        row["truth"] = dict(truth)
        row["filled_slots"] = placement.filled
        row["no_add"] = dict(placement.no_add)  # drop-path calls that reach no add: not sites
        del model_on
        if find is None:
            return row
        stage = "build (drop path off)"
        model_off = entry.build(drop_path=False)
        stage = "detection"
        t0 = time.perf_counter()
        if report is not None:
            rep = report(model_off)
            sites = rep.sites
            row["untraced"] = [getattr(f, "scope", str(f)) for f in rep.skipped]
        else:
            sites = find(model_off)
        row["time_s"] = time.perf_counter() - t0
    except Exception as exc:  # a crash is a result: record it and go on
        row["crash"] = f"{stage}: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=6)
        truth = Counter(row.get("truth", {}))
        sites = []
        if "truth" not in row:
            return row
    found = Counter(s.scope for s in sites)
    tp, fp, fn = score(found, truth)
    row.update(
        found=dict(found), tp=tp, fp=fp, fn=fn,
        missed=dict(truth - found), extra=dict(found - truth),
    )
    row["precision"], row["recall"], row["f1"] = prf(tp, fp, fn)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (NAME, timm:NAME, torchvision:NAME)")
    parser.add_argument("--json", default="", help="write per-model results to this file")
    parser.add_argument("--holdout", action="store_true",
                        help="run the held-out architectures only (same as --split heldout)")
    parser.add_argument("--split", choices=("all", "tuned", "heldout"), default="all",
                        help="tuned: CORPUS; heldout: HOLDOUT + NEW_FAMILIES; all (default): both, "
                             "reported separately")
    parser.add_argument("--truth-only", action="store_true", help="print the ground truth, do not detect")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    split = "heldout" if args.holdout else args.split
    selected = entries([n.strip() for n in args.models.split(",") if n.strip()] or None, split=split)
    find, report, why = (None, None, "--truth-only") if args.truth_only else _detector()
    if find is None:
        print(f"detection skipped ({why}); printing the authors' placement only\n")

    rows = []
    for i, entry in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {entry.key} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        row = run_entry(entry, find, report)
        status = "CRASH" if row["crash"] else ("exact" if row.get("fp") == row.get("fn") == 0 else "done")
        print(f" {status} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
        rows.append(row)

    if find is None:
        print(f"{'model':40s} {'sites':>5s} {'scopes':>6s} {'filled':>6s} {'no-add':>6s}")
        for row in rows:
            truth = Counter(row.get("truth", {}))
            print(f"{row['model']:40s} {sum(truth.values()):5d} {len(truth):6d} {len(row.get('filled_slots', [])):6d} "
                  f"{sum(row.get('no_add', {}).values()):6d}"
                  + (f"  CRASH {row['crash']}" if row["crash"] else ""))
    else:
        header = f"{'model':40s} {'truth':>5s} {'found':>5s} {'tp':>4s} {'fp':>3s} {'fn':>3s} {'P':>6s} {'R':>6s} {'F1':>6s} {'time':>6s}"
        print(header)
        print("-" * len(header))
        for row in rows:
            if "tp" not in row:
                print(f"{row['model']:40s} CRASH {row['crash']}")
                continue
            print(
                f"{row['model']:40s} {sum(row['truth'].values()):5d} {sum(row['found'].values()):5d} "
                f"{row['tp']:4d} {row['fp']:3d} {row['fn']:3d} {row['precision']:6.3f} {row['recall']:6.3f} "
                f"{row['f1']:6.3f} {row.get('time_s', float('nan')):5.2f}s"
            )
            if row["crash"]:
                print(f"    CRASH {row['crash']}")
            if (row["missed"] or row["extra"]) and row.get("note"):
                print(f"    note: {row['note']}")
            if row["missed"]:
                print(f"    missed: {_short(Counter(row['missed']))}")
            if row["extra"]:
                print(f"    extra:  {_short(Counter(row['extra']))}")
            if row.get("no_add"):
                print(f"    (drop path without an add, not scored: {_short(Counter(row['no_add']))})")
            if (row["missed"] or row["extra"]) and row.get("untraced"):
                print(f"    untraced: {_short(Counter(row['untraced']))}")
        print("-" * len(header))

        def overall(subset: list[dict], label: str) -> None:
            scored = [r for r in subset if "tp" in r]
            tp, fp, fn = (sum(r[k] for r in scored) for k in ("tp", "fp", "fn"))
            precision, recall, f1 = prf(tp, fp, fn)
            exact = sum(1 for r in scored if r["fp"] == r["fn"] == 0 and not r["crash"])
            crashes = sum(1 for r in subset if r["crash"])
            print(
                f"{label} over {len(subset)} models: tp={tp} fp={fp} fn={fn}  "
                f"P={precision:.4f} R={recall:.4f} F1={f1:.4f}  exact {exact}/{len(subset)}  crashes {crashes}"
            )

        overall(rows, "overall (micro)")
        tuned = [r for r in rows if r["split"] == "tuned"]
        held = [r for r in rows if r["split"] == "heldout"]
        if tuned and held:
            overall(tuned, "TUNED (CORPUS)")
        if held:
            overall(held, "HELD-OUT (HOLDOUT + NEW_FAMILIES)")
            new_fam = [r for r in held if r["family_heldout"]]
            if new_fam and len(new_fam) != len(held):
                overall(new_fam, "held-out families never tuned on")
            plain = [r for r in held if not r.get("by_design")]
            if len(plain) != len(held):
                overall(plain, "HELD-OUT without not-residual-by-spec models")
        by_spec = [r for r in rows if r.get("by_design")]
        if by_spec:
            # The authors put drop path on adds that the spec defines as not residual (RepVGG /
            # MobileOne parallel-branch sums): scored above, and shown without them here.
            overall([r for r in rows if not r.get("by_design")],
                    f"without {', '.join(r['model'] for r in by_spec)} (not residual by spec)")
    if EXCLUDED and not args.models and split != "heldout":
        print("\nleft out of the corpus:")
        for key, reason in EXCLUDED.items():
            print(f"  {key}: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
