"""How much narrower is the paired interval? Finished sweeps' confirmation runs, each non-default config against
the default: the 95 % interval of the test margin by paired t (per-seed differences, what ssl-tune prints) and by
Welch's t (the two groups as if independent), on the same runs.

    python -m bench.paired_interval TRACKING_URI EXPERIMENT SWEEP [SWEEP ...] [--objective knn_acc] [--write]
"""

from __future__ import annotations

import argparse

import pandas as pd

from bench.common import append_section, markdown_table
from tuning.confirm import DEFAULT_CANDIDATE, seed_margin, welch_margin
from tuning.report import load_confirmation, load_report


def interval_rows(tracking_uri: str, experiment: str, sweep: str, objective: str) -> list[dict[str, object]]:
    report = load_report(tracking_uri, sweep, experiment)
    loaded = load_confirmation(report, tracking_uri, objective, experiment)
    if loaded is None:
        return []
    confirmation = loaded[0]
    default = confirmation.scores(DEFAULT_CANDIDATE)
    rows = []
    for candidate in confirmation.summary()["candidate"]:
        if candidate == DEFAULT_CANDIDATE:
            continue
        scores = confirmation.scores(candidate)
        paired, welch = seed_margin(scores, default), welch_margin(scores.tolist(), default.tolist())
        rows.append({
            "sweep": sweep, "config": candidate, "seeds": len(scores), "margin": paired.difference,
            "paired 95 %": f"[{paired.low:+.4f}, {paired.high:+.4f}]",
            "Welch 95 %": f"[{welch.low:+.4f}, {welch.high:+.4f}]",
            "paired width / Welch width": (paired.high - paired.low) / (welch.high - welch.low),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tracking_uri")
    parser.add_argument("experiment")
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("--objective", default="knn_acc", help="the sweeps' objective (their val selection)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    table = pd.DataFrame([row for sweep in args.sweeps for row in interval_rows(args.tracking_uri, args.experiment,
                                                                                sweep, args.objective)])
    text = ("## Paired against Welch intervals on the same confirmation runs\n\n"
            f"`python -m bench.paired_interval {args.tracking_uri} {args.experiment} {' '.join(args.sweeps)} "
            f"--objective {args.objective}`; "
            f"median width ratio {table['paired width / Welch width'].median():.2f}.\n\n" + markdown_table(table, 4))
    print(text)
    if args.write:
        append_section(text)


if __name__ == "__main__":
    main()
