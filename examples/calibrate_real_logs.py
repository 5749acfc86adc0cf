"""Calibrate the response model on real API logs and check it on exams it never saw.

Loads the real call logs (numeric columns of two public experiments: prompt-verbosity
levels on eight exams, 1-16 few-shot examples), fits tokens and quality by maximum
likelihood, prints the in-sample and leave-one-exam-out figures, and saves a
predicted-vs-observed plot.

    python examples/calibrate_real_logs.py --data-dir ../shared/data/real-api --plot calibration.png
"""

import argparse
from pathlib import Path

import numpy as np

from stackjax.governance import calibrate, data


def cell_means(records, predictions):
    cells = records.cells()
    rows = [cells == c for c in np.unique(cells)]
    observed = np.array([[records.tokens[r].mean(), np.nanmean(records.accuracy[r])] for r in rows])
    predicted = np.array([[predictions.tokens[r].mean(), predictions.quality[r].mean()] for r in rows])
    return observed, predicted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-api"
    parser.add_argument("--data-dir", type=Path, default=default)
    parser.add_argument("--plot", default="calibration.png", help="where to save the plot ('' for none)")
    parser.add_argument("--steps", type=int, default=400, help="L-BFGS iterations per fit")
    parser.add_argument(
        "--exams", type=int, default=None, help="hold out only the first N exams (quick runs)"
    )
    args = parser.parse_args(argv)

    records = data.load(sorted(args.data_dir.glob("*.csv")))
    print(f"{len(records)} calls loaded, skipped: {records.skipped or 'none'}")
    model = calibrate.fit_response_model(records, steps=args.steps)
    in_sample = calibrate.predict(model, records)
    report = calibrate.calibration_report(records, in_sample)

    exams = sorted({g for g, p in zip(records.group, records.action[:, 1], strict=True) if p > 0})
    held_out, predictions = calibrate.leave_one_group_out(
        records, groups=exams[: args.exams], steps=args.steps, anchor_level="answer_only"
    )
    print("\n| figure | in-sample | leave-one-exam-out (anchored on answer-only) | paper's surrogate |")
    print("|---|---|---|---|")
    paper = {"token_r2_call": "0.912", "quality_r2_call": "0.427"}
    for key in (
        "token_r2_cell",
        "quality_mae_cell",
        "verbosity_effect_mae",
        "token_r2_call",
        "quality_r2_call",
    ):
        print(f"| {key} | {report[key]:.3f} | {held_out[key]:.3f} | {paper.get(key, '-')} |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        unseen = ~np.isnan(predictions.tokens)
        sub = records.subset(unseen)
        observed, predicted = cell_means(
            sub, calibrate.Predictions(predictions.tokens[unseen], predictions.quality[unseen])
        )
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
        left.loglog(observed[:, 0], predicted[:, 0], "o", alpha=0.7)
        lims = [observed[:, 0].min() * 0.8, observed[:, 0].max() * 1.2]
        left.plot(lims, lims, "k--", lw=1)
        left.set_xlabel("observed mean tokens per answer (cell)")
        left.set_ylabel("predicted")
        left.set_title(f"tokens, held-out exams (R² {held_out['token_r2_cell']:.3f})")
        right.plot(observed[:, 1], predicted[:, 1], "o", alpha=0.7)
        right.plot([0.3, 1], [0.3, 1], "k--", lw=1)
        right.set_xlabel("observed accuracy (cell)")
        right.set_ylabel("predicted")
        right.set_title(f"quality, held-out exams (MAE {held_out['quality_mae_cell']:.3f})")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nsaved {args.plot}")
    return held_out


if __name__ == "__main__":
    main()
