"""Overoptimization study over a sequence of checkpoints: evaluate each, compute d, fit curves, find the peak.

``run_study(checkpoints, prompts, out_dir, ...)`` takes any sequence of ``(step, generator, extra)``:
``generator`` follows the ``eval.evaluate`` protocol; ``extra`` is a dict of scalars logged with the row
(e.g. the trainer's loss). The distance d of a checkpoint comes from, first that applies:
``extra["d"]``; ``extra["kl"]`` (d = sqrt(kl)); the per-sample ``kl`` the generator returns (a stochastic
chain's KL, ``eval.kl.gaussian_chain_kl``); the smoothed-output KL against ``reference`` under shared
noise (``eval.kl``, at ``kl_sigma``). Checkpoint step 0 is usually the reference itself (d = 0).

Writes to ``out_dir``: ``checkpoints/step_XXXXXX/`` (each evaluation: tables, preview grid), ``study.csv``
and ``.parquet`` (one row per checkpoint, means with CIs), ``fits.json`` (Gao et al. RL fits of every gold
and proxy reward vs d), ``peak.json``, ``early_stop.json`` (peak gold when a gold column exists),
``early_stop_proxy.json`` (a recommendation that does not look at gold: ``eval.overopt.recommend_proxy_stop``
from d and the optimised proxy), ``study.json`` and ``report.html``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from eval.evaluate import EvalResult, evaluate
from eval.overopt import fit_overoptimization, recommend_early_stop, recommend_proxy_stop


@dataclass
class StudyResult:
    table: pd.DataFrame  # one row per checkpoint
    fits: dict  # metric -> CurveFit.to_dict()
    peak: dict
    early_stop: dict | None
    out_dir: Path
    report: Path | None
    early_stop_proxy: dict | None = None  # the proxy-only (gold-free) recommendation


def _row(step: int, res: EvalResult, extra: dict) -> dict:
    row: dict[str, Any] = {"step": int(step)}
    for _, r in res.summary.iterrows():
        m = r["metric"]
        row[m] = r["mean"]
        if np.isfinite(r["ci_low"]):
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = r["ci_low"], r["ci_high"]
    for k, v in extra.items():
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            row[k if k in ("d", "kl") else f"extra/{k}"] = float(v)
    if "d" in extra:
        row["d_source"] = "given d"
    elif "kl" in extra:
        row["d"] = math.sqrt(max(float(extra["kl"]), 0.0))
        row["d_source"] = "given kl"
    elif "d" in row:
        row["d_source"] = "chain kl" if res.meta.get("kl_sigma") is None else "smoothed output kl"
    else:
        row["d"] = float("nan")
        row["d_source"] = "none"
    return row


def run_study(
    checkpoints: Iterable[tuple[int, Callable, dict]],
    prompts: Sequence[str],
    out_dir: str | Path,
    reference: Callable | None = None,
    fit_form: str = "rl",
    gold: str | None = None,
    holdout: str | None = None,
    d_budget: float | None = None,
    stop_proxy: str | None = None,
    min_slope_frac: float | None = None,
    title: str | None = None,
    write_html: bool = True,
    **evaluate_kwargs: Any,
) -> StudyResult:
    """Evaluate checkpoints in order and write the study (see module doc).

    Args:
        checkpoints: ``(step, generator, extra)`` triples (a generator / list; evaluated one at a time).
        prompts: evaluation prompts (the same for every checkpoint, with the same seeds).
        reference: the reference generator for the smoothed-output distance (used when a checkpoint gives
            no d/kl of its own).
        fit_form: "rl" (R = R0 + d(α − β log d)) for fine-tuning runs, "bon" for a sequence of best-of-n.
        gold: the gold column that decides the peak and early stopping (default: the first gold reward).
        holdout: a proxy-like column not optimised by the run (e.g. "proxy/lrm-b"), used for the divergence
            rule when there is no gold reward.
        d_budget: d budget (sqrt nats, the study's own d) of the proxy-only rule (and of the fallback rule of
            ``early_stop.json`` when there is neither gold nor a held-out column).
        stop_proxy: the optimised reward column for the proxy-only rule (default: the first proxy column
            other than ``holdout``).
        min_slope_frac: proxy-only rule: stop once the proxy's gain per unit d falls below this fraction of its
            initial rate (``recommend_proxy_stop``). With neither this nor ``d_budget``: no proxy-only rule.
        **evaluate_kwargs: passed to ``eval.evaluate.evaluate`` (gold_rewards, proxy_rewards, decode, ...).
    """
    from lrm.io import write_json
    from lrm.run import get_logger

    log = get_logger("lrm.eval")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for step, generator, extra in checkpoints:
        res = evaluate(generator, prompts, reference=reference, name=f"step {step}", **evaluate_kwargs)
        res.save(out / "checkpoints" / f"step_{int(step):06d}")
        rows.append(_row(step, res, dict(extra or {})))
        r = rows[-1]
        log.info("step %d: d=%.4g %s", step, r.get("d", float("nan")),
                 " ".join(f"{k}={r[k]:.4g}" for k in r if k.startswith(("gold/", "proxy/"))
                          and not k.endswith(("_ci_low", "_ci_high"))))
    if not rows:
        raise ValueError("no checkpoints given")
    table = pd.DataFrame(rows).sort_values("step").reset_index(drop=True)
    table.to_csv(out / "study.csv", index=False)
    table.to_parquet(out / "study.parquet", index=False)

    # 1. fits vs d, anchored at the reference's reward when a d = 0 checkpoint exists
    reward_cols = [c for c in table.columns if c.startswith(("gold/", "proxy/"))
                   and not c.endswith(("_ci_low", "_ci_high"))]
    fits: dict[str, dict] = {}
    d = table["d"].to_numpy(dtype=float)
    at0 = np.isfinite(d) & (d == 0)
    for c in reward_cols:
        y = table[c].to_numpy(dtype=float)
        ok = np.isfinite(d) & np.isfinite(y)
        r0 = float(y[at0].mean()) if at0.any() else None
        if ok.sum() < (2 if r0 is not None else 3):
            continue
        fits[c] = fit_overoptimization(d[ok], y[ok], form=fit_form, r0=r0).to_dict()
    write_json(out / "fits.json", fits)

    # 2. peak gold, observed and fitted
    gold_cols = [c for c in reward_cols if c.startswith("gold/")]
    gold = gold or (gold_cols[0] if gold_cols else None)
    if gold is not None and gold not in table:
        raise ValueError(f"gold={gold!r} is not a column of the study; gold columns: {gold_cols}")
    peak: dict[str, Any] = {"gold": gold}
    if gold is not None:
        i = int(table[gold].idxmax())
        peak["observed"] = {"step": int(table["step"][i]), "d": float(table["d"][i]), "value": float(table[gold][i])}
        f = fits.get(gold)
        if f and math.isfinite(f["peak_d"]):
            peak["fitted"] = {"d": f["peak_d"], "value": f["peak_reward"],
                              "extrapolated": bool(f["peak_d"] > np.nanmax(d))}
    write_json(out / "peak.json", peak)

    # 3. early stopping
    early = None
    proxy_cols = [c for c in reward_cols if c.startswith("proxy/") and c != holdout]
    try:
        early = recommend_early_stop(
            table["step"], gold=table[gold] if gold is not None else None,
            proxy=table[proxy_cols[0]] if holdout and proxy_cols else None,
            holdout=table[holdout] if holdout else None,
            d=table["d"] if d_budget is not None else None, d_budget=d_budget)
        write_json(out / "early_stop.json", early)
    except ValueError as e:
        log.warning("no early-stopping recommendation: %s", e)
    early_proxy = None
    if d_budget is not None or min_slope_frac is not None:
        pcol = stop_proxy or (proxy_cols[0] if proxy_cols else None)
        if pcol is not None and pcol not in table:
            raise ValueError(f"stop_proxy={pcol!r} is not a column of the study; reward columns: {reward_cols}")
        try:
            early_proxy = recommend_proxy_stop(table["step"], table["d"], None if pcol is None else table[pcol],
                                               d_budget=d_budget,
                                               min_slope_frac=min_slope_frac if pcol is not None else None)
            early_proxy["proxy_column"] = pcol
            if gold is not None:  # how the gold-free pick fares, measured afterwards (not used by the rule)
                early_proxy["gold_at_stop"] = float(table[gold][early_proxy["index"]])
            write_json(out / "early_stop_proxy.json", early_proxy)
        except ValueError as e:
            log.warning("no proxy-only early-stopping recommendation: %s", e)
    meta = {"n_checkpoints": len(table), "prompts": list(prompts), "fit_form": fit_form, "gold": gold,
            "holdout": holdout, "d_budget": d_budget, "min_slope_frac": min_slope_frac,
            "d_source": sorted(set(table["d_source"])),
            "kl_sigma": evaluate_kwargs.get("kl_sigma", 1.0) if reference is not None else None}
    write_json(out / "study.json", meta)
    report = None
    if write_html:
        from eval.report import write_report

        report = write_report(out, title=title)
        log.info("wrote %s", report)
    return StudyResult(table=table, fits=fits, peak=peak, early_stop=early, out_dir=out, report=report,
                       early_stop_proxy=early_proxy)
