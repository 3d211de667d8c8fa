"""Before compare ranks runs: are they on equal footing, and is the winner's lead larger than the noise?

`footing` lists what differs between the rows being ranked: tokens seen, training data (content
fingerprint), seeds per row, steps completed (a run stopped early, or planned shorter). A loss difference
between runs that saw different tokens or text measures the budget or the data, not the attention variant,
so compare marks no best row while any of these is flagged, and says why.

`ranking` decides the best mark: the lowest best val loss, and whether its lead over the runner-up is larger
than NOISE_SIGMAS standard errors of the difference. A row's error is its seed group's sd / sqrt(n) combined
with the eval's own standard error over its batches (pretrain/stats.py); one seed gives no seed-to-seed
spread, which the verdict says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pretrain.stats import NOISE_SIGMAS, combined_se
from pretrain.units import finite_number, fmt_count

TOKEN_TOLERANCE = 0.01  # budgets within 1 % are equal (the last step of a budget rounds up to a whole batch)
KEY = "best_val_loss"  # the figure compare ranks by


def ranked_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a ranking compares: counted ones (not left out of a seed group) with a val loss."""
    return [r for r in rows if not r.get("left_out") and finite_number(r.get(KEY)) is not None]


def footing(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per way the ranked rows are not comparable ([] when they are, or fewer than two)."""
    rows = ranked_rows(rows)
    if len(rows) < 2:
        return []
    flags = []
    tokens = {r["run"]: r.get("tokens") for r in rows}
    known = [t for t in tokens.values() if finite_number(t) is not None]
    if len(known) < len(tokens) or (known and max(known) > min(known) * (1 + TOKEN_TOLERANCE)):
        flags.append("tokens differ: " + _listing(tokens, lambda t: fmt_count(t)) + "; train every variant to "
                     "the same budget (run_1b_launch.py --target-tokens N, the default for a size's variants)")
    prints = {r["run"]: r.get("data_fingerprint") for r in rows}
    if len(set(prints.values())) > 1 or None in prints.values():
        flags.append("training data differ: " + _listing(prints, lambda p: str(p)[:12]) + " (content "
                     "fingerprints; - = not recorded); train them on the same --data")
    seeds = {r["run"]: r.get("seeds") or 1 for r in rows}
    if len(set(seeds.values())) > 1:
        flags.append("seed counts differ: " + _listing(seeds, str) + "; run the same seeds for every variant")
    steps = {r["run"]: (r.get("steps"), r.get("planned_steps")) for r in rows}
    short = {k: v for k, v in steps.items() if isinstance(v[1], int) and isinstance(v[0], int) and v[0] < v[1]}
    if short or len({s for s, _ in steps.values()}) > 1:
        flags.append("steps completed differ: " + _listing(steps, lambda s: f"{s[0]}/{s[1]}" if s[1] else str(s[0]))
                     + "; finish the runs (rerun the same command resumes) before ranking them")
    return flags


def _listing(values: dict[str, Any], fmt: Any) -> str:
    return ", ".join(f"{run} {'-' if v is None else fmt(v)}" for run, v in values.items())


def row_error(row: dict[str, Any], key: str = KEY) -> float | None:
    """Standard error of a row's figure: seed spread sd/sqrt(n) (a group) combined with its eval's own error."""
    n = row.get("seeds") or 1
    eval_se = finite_number(row.get(f"{key}_se"))
    if n > 1:
        sd = finite_number(row.get(f"{key}_sd")) or 0.0  # no _sd: identical across seeds
        return math.sqrt((sd / math.sqrt(n)) ** 2 + (eval_se or 0.0) ** 2)
    return eval_se


def ranking(rows: Sequence[dict[str, Any]]) -> tuple[str | None, str, list[str]]:
    """(run to mark, its mark, verdict lines). Mark "*" = best with a lead outside the noise; "~" = lowest, but
    inside the noise or unknown noise; None = nothing marked (unequal footing, or fewer than two rows)."""
    ranked = sorted(ranked_rows(rows), key=lambda r: r[KEY])
    if len(ranked) < 2:
        return None, "", []
    flags = footing(rows)
    if flags:
        return None, "", ["not on equal footing, so no best is marked:"] + [f"  - {f}" for f in flags]
    best, second = ranked[0], ranked[1]
    diff = second[KEY] - best[KEY]
    se = combined_se(row_error(best), row_error(second))
    lead = f"{best['run']} {best[KEY]:.4f} leads {second['run']} {second[KEY]:.4f} by {diff:.4f}"
    one_seed = all((r.get("seeds") or 1) == 1 for r in ranked)
    caveat = ("; one seed each: the seed-to-seed spread is unknown, the error is the eval's alone "
              "(run more --seed values for a seed group)") if one_seed else ""
    if se is None:
        return best["run"], "~", [f"best val: {lead}, noise unknown (no standard error recorded){caveat}: "
                                  "marked ~, not a winner"]
    if diff <= NOISE_SIGMAS * se:
        return best["run"], "~", [f"best val: {lead}, inside the noise ({NOISE_SIGMAS:g} x standard error of the "
                                  f"difference = {NOISE_SIGMAS * se:.4f}){caveat}: marked ~, not a winner"]
    return best["run"], "*", [f"best val: {lead}, {diff / se:.1f} standard errors of the difference{caveat}: "
                              "marked *"]


ERROR_LEGEND = ("± se: standard error of one run's figure (val loss over its eval batches, accuracy binomial "
                "over its items); ± sd: spread over a seed group's runs (n in the seeds column)")


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """The lines under compare's table: what ± means, then whether and how the runs were ranked."""
    return "\n".join([ERROR_LEGEND, *ranking(rows)[2]])
