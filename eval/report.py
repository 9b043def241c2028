"""One self-contained, offline HTML page per run directory.

``write_report(run_dir)`` looks at what the directory holds and writes ``report.html`` next to it:

- a study table ``study.csv`` (one row per checkpoint: ``step``, ``d``, ``gold/*``, ``proxy/*``, ``acc/*``,
  ``diversity`` with ``*_ci_low``/``*_ci_high``) -> plots of reward vs step and vs d with the fitted Gao et al.
  curves from ``fits.json``, the peak-gold marker and the early-stopping recommendations (``early_stop.json``,
  which may use gold, and the gold-free ``early_stop_proxy.json``); with a ``human_win_rate.csv`` beside it
  (``lrm human-eval results --into-report``), the human win rate against the initial model vs d next to the gold
  and proxy reward;
- a best-of-n table ``bon.csv`` (``n``, ``d``, ``gold``, ``proxy``) -> reward vs d_bon with the R_bon fit;
- a single evaluation ``summary.csv`` (``metric``, ``mean``, ``ci_low``, ``ci_high``) -> a bar chart with CIs;
- every CSV (or Parquet without a CSV twin) and small JSON file as a table;
- every PNG/GIF below the directory as sample images, grouped by folder (one group per checkpoint).

Plots are written to ``plots/`` as PNG; all images are referenced by relative paths, so the folder can be
copied and opened offline.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

MAX_TABLE_ROWS = 60
MAX_JSON_BYTES = 20_000
IMAGE_EXT = (".png", ".gif", ".jpg", ".jpeg")
COLORS = {"gold": "#b8860b", "proxy": "#1f77b4", "acc": "#2ca02c", "diversity": "#9467bd", "other": "#555555"}


# ---- plots -------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3,
                         "figure.dpi": 100, "savefig.dpi": 110})
    return plt


def _kind(col: str) -> str:
    return col.split("/", 1)[0] if "/" in col else ("diversity" if col == "diversity" else "other")


def _label(col: str) -> str:
    k = _kind(col)
    name = col.split("/", 1)[1] if "/" in col else col
    return {"gold": f"gold reward: {name}", "proxy": f"proxy reward: {name}",
            "acc": f"accuracy: {name} (fraction correct)", "diversity": "diversity (Vendi, eff. # samples)"}.get(k, col)


def _metric_cols(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.columns if (c.startswith(("gold/", "proxy/", "acc/")) or c == "diversity")
            and not c.endswith(("_ci_low", "_ci_high"))]
    order = {"gold": 0, "proxy": 1, "acc": 2, "diversity": 3}
    return sorted(cols, key=lambda c: (order.get(_kind(c), 9), c))


def _band(ax, x, df, col, color):
    lo, hi = f"{col}_ci_low", f"{col}_ci_high"
    if lo in df and hi in df and df[lo].notna().any():
        ax.fill_between(x, df[lo], df[hi], color=color, alpha=0.18, linewidth=0, label="95% CI")


def _grid(n: int, plt, width: float = 5.2, height: float = 3.6):
    ncol = min(n, 2)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_vs_step(study: pd.DataFrame, out: Path, early: dict | None = None,
                 early_proxy: dict | None = None) -> Path | None:
    """One panel per reward (gold, proxy), one panel for all accuracies, one for diversity."""
    cols = _metric_cols(study)
    if not cols or "step" not in study:
        return None
    panels: list[list[str]] = [[c] for c in cols if _kind(c) in ("gold", "proxy")]
    acc = [c for c in cols if _kind(c) == "acc"]
    if acc:
        panels.append(acc)
    panels += [[c] for c in cols if _kind(c) == "diversity"]
    plt = _plt()
    fig, axes = _grid(len(panels), plt)
    x = study["step"].to_numpy()
    for ax, group in zip(axes, panels):
        if len(group) == 1:
            c = group[0]
            color = COLORS[_kind(c)]
            _band(ax, x, study, c, color)
            ax.plot(x, study[c], "o-", color=color, label="mean over samples")
            ylabel, title = _label(c), f"{_label(c)} vs step"
        else:
            markers = "osD^v<>p"
            for k, c in enumerate(group):
                ax.plot(x, study[c], marker=markers[k % len(markers)], linestyle="-",
                        linewidth=2.5 if c == "acc/all" else 1.2, label=c.split("/", 1)[1])
            ax.set_ylim(-0.05, 1.05)
            ylabel, title = "accuracy (fraction of samples correct)", "attribute accuracy vs step"
        c = group[0]
        if _kind(c) == "gold" and study[c].notna().any():
            i = int(study[c].idxmax())
            ax.plot([x[i]], [study[c][i]], marker="*", markersize=16, color="#d62728", linestyle="none",
                    label=f"peak gold (step {int(x[i])})")
        if early is not None and "step" in early:
            ax.axvline(early["step"], color="#d62728", linestyle="--", linewidth=1,
                       label=f"recommended stop ({early.get('rule', '?')})")
        if early_proxy is not None and "step" in early_proxy:
            ax.axvline(early_proxy["step"], color="#555", linestyle=":", linewidth=1.5,
                       label=f"proxy-only stop ({early_proxy.get('rule', '?')})")
        ax.set_xlabel("fine-tuning step (optimizer steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _fit_curve(fit: dict, d: np.ndarray) -> np.ndarray:
    from eval.overopt import CurveFit

    f = CurveFit(form=fit["form"], alpha=fit["alpha"], beta=fit["beta"], r0=fit["r0"], r0_fitted=fit["r0_fitted"],
                 rmse=fit["rmse"], n_points=fit["n_points"])
    return f(d)


def plot_vs_d(study: pd.DataFrame, fits: dict, out: Path, d_note: str = "",
              early_proxy: dict | None = None) -> Path | None:
    cols = [c for c in _metric_cols(study) if _kind(c) in ("gold", "proxy")]
    if not cols or "d" not in study or not study["d"].notna().any():
        return None
    plt = _plt()
    fig, axes = _grid(len(cols), plt)
    d = study["d"].to_numpy(dtype=float)
    for ax, c in zip(axes, cols):
        color = COLORS[_kind(c)]
        y = study[c].to_numpy(dtype=float)
        lo, hi = f"{c}_ci_low", f"{c}_ci_high"
        if lo in study and study[lo].notna().any():
            err = np.stack([y - study[lo].to_numpy(float), study[hi].to_numpy(float) - y])
            ax.errorbar(d, y, yerr=np.clip(err, 0, None), fmt="o", color=color, capsize=3, label="checkpoints (95% CI)")
        else:
            ax.plot(d, y, "o", color=color, label="checkpoints")
        for s, dd, yy in zip(study["step"], d, y):
            ax.annotate(str(int(s)), (dd, yy), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#444")
        fit = fits.get(c)
        if fit:
            dmax = float(np.nanmax(d)) if np.isfinite(d).any() else 1.0
            peak_d = fit.get("peak_d", math.inf)
            span = max(dmax, peak_d if math.isfinite(peak_d) and peak_d < 3 * dmax else 0) * 1.05
            grid = np.linspace(0, span, 200)
            form = "d(α − β log d)" if fit["form"] == "rl" else "d(α − β d)"
            ax.plot(grid, _fit_curve(fit, grid), "-", color="#333", linewidth=1.5,
                    label=f"fit R0 + {form}: α={fit['alpha']:.3g}, β={fit['beta']:.3g}")
            if _kind(c) == "gold" and math.isfinite(peak_d) and peak_d <= span:
                ax.plot([peak_d], [fit["peak_reward"]], marker="*", markersize=16, color="#d62728", linestyle="none",
                        label=f"fitted peak gold (d={peak_d:.3g})")
        if early_proxy is not None and early_proxy.get("d") is not None:
            ax.axvline(early_proxy["d"], color="#555", linestyle=":", linewidth=1.5,
                       label=f"proxy-only stop (d={early_proxy['d']:.3g})")
        ax.set_xlabel("d = sqrt(KL to reference) (sqrt nats)" + (f" {d_note}" if d_note else ""))
        ax.set_ylabel(_label(c))
        ax.set_title(f"{_label(c)} vs distance d")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_bon(bon: pd.DataFrame, fits: dict, out: Path) -> Path | None:
    cols = [c for c in ("gold", "proxy") if c in bon]
    if not cols or "d" not in bon:
        return None
    plt = _plt()
    fig, axes = _grid(len(cols), plt)
    for ax, c in zip(axes, cols):
        ax.plot(bon["d"], bon[c], "o", color=COLORS[c], label="best-of-n (unbiased estimate)")
        for n, dd, yy in zip(bon["n"], bon["d"], bon[c]):
            ax.annotate(f"n={int(n)}", (dd, yy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fit = fits.get(f"bon/{c}")
        if fit:
            grid = np.linspace(0, float(bon["d"].max()) * 1.05, 200)
            ax.plot(grid, _fit_curve(fit, grid), "-", color="#333",
                    label=f"fit R0 + d(α − β d): α={fit['alpha']:.3g}, β={fit['beta']:.3g}")
        ax.set_xlabel("d_bon = sqrt(log n − (n−1)/n) (sqrt nats)")
        ax.set_ylabel(f"{c} reward of the best of n")
        ax.set_title(f"best-of-n: {c} reward vs d")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_summary(summary: pd.DataFrame, out: Path, title: str = "evaluation summary") -> Path | None:
    """Compact view of one evaluation: a panel per reward (own units), all accuracies in one panel, diversity."""
    rows = summary[summary["metric"].str.match(r"^(gold|proxy|acc)/|^diversity$")].reset_index(drop=True)
    if rows.empty:
        return None
    single = [r for _, r in rows.iterrows() if _kind(r["metric"]) != "acc"]
    acc = rows[rows["metric"].str.startswith("acc/")]
    n = len(single) + (1 if len(acc) else 0)
    plt = _plt()
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    axes = list(axes.flat[:n])

    def err(r):
        if not np.isfinite(r.get("ci_low", np.nan)):
            return None
        return [[max(r["mean"] - r["ci_low"], 0)], [max(r["ci_high"] - r["mean"], 0)]]

    for ax, r in zip(axes, single):
        color = COLORS[_kind(r["metric"])]
        ax.barh([0], [r["mean"]], xerr=err(r), color=color, capsize=6, height=0.5)
        ax.set_yticks([])
        ax.set_xlabel(_label(r["metric"]))
        ax.set_title(f"{r['metric']} = {r['mean']:.4g}", fontsize=11)
    if len(acc):
        ax = axes[-1]
        y = np.arange(len(acc))
        xerr = np.array([[max(a["mean"] - a["ci_low"], 0), max(a["ci_high"] - a["mean"], 0)]
                         if np.isfinite(a["ci_low"]) else [0, 0] for _, a in acc.iterrows()]).T
        ax.barh(y, acc["mean"], xerr=xerr, color=COLORS["acc"], capsize=4, height=0.6)
        ax.set_yticks(y, [m.split("/", 1)[1] for m in acc["metric"]])
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("fraction of samples correct")
        ax.set_title("attribute accuracy", fontsize=11)
    fig.text(0.5, 0.005, "bars: mean over samples; whiskers: 95% bootstrap CI over prompts", ha="center",
             fontsize=9, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out)
    plt.close(fig)
    return out


# ---- html ----------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px;line-height:1.4}
h1{font-size:24px;margin-bottom:2px} h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:30px}
h3{font-size:15px;margin:18px 0 6px} .meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 12px} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:right} th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.scroll{overflow-x:auto;max-width:100%} .card{background:#fafafa;border:1px solid #e4e4e4;border-radius:6px;
padding:10px 14px;margin:10px 0} img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}
.samples{display:flex;flex-wrap:wrap;gap:14px} .samples figure{margin:0} figcaption{font-size:12px;color:#555}
img.sample{image-rendering:pixelated;max-width:520px;border:1px solid #eee} code{background:#f2f2f2;padding:0 3px}
"""


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return v


def _table_html(df: pd.DataFrame) -> str:
    more = ""
    if len(df) > MAX_TABLE_ROWS:
        more = f"<p class='meta'>showing {MAX_TABLE_ROWS} of {len(df)} rows</p>"
        df = df.head(MAX_TABLE_ROWS)
    body = df.map(_fmt).to_html(index=False, escape=True, border=0)
    return f"<div class='scroll'>{body}</div>{more}"


def _read_table(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as e:  # a damaged or non-tabular file is listed, not fatal for the whole report
        return pd.DataFrame({"error": [f"could not read {path.name}: {e}"]})


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _json_card(path: Path, root: Path) -> str:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"<p>could not read {html.escape(_rel(path, root))}: {html.escape(str(e))}</p>"
    if isinstance(obj, dict) and all(not isinstance(v, (dict, list)) for v in obj.values()):
        df = pd.DataFrame({"key": list(obj), "value": [_fmt(v) for v in obj.values()]})
        return _table_html(df)
    return f"<pre style='font-size:12px;white-space:pre-wrap'>{html.escape(json.dumps(obj, indent=1)[:6000])}</pre>"


def _study_highlights(root: Path) -> str:
    parts = []
    early = root / "early_stop.json"
    if early.exists():
        e = json.loads(early.read_text())
        uses = " &mdash; uses the gold reward, known only in a study" if e.get("rule") == "peak-gold" else ""
        parts.append(f"<p><b>Early-stopping recommendation</b> ({html.escape(str(e.get('rule')))}{uses}): keep step "
                     f"<b>{e.get('step')}</b> &mdash; {html.escape(str(e.get('reason', '')))}</p>")
    early_p = root / "early_stop_proxy.json"
    if early_p.exists():
        e = json.loads(early_p.read_text())
        gold_note = (f"; gold there, measured afterwards: {_fmt(e['gold_at_stop'])}" if e.get("gold_at_stop")
                     is not None else "")
        parts.append(f"<p><b>Proxy-only early-stopping recommendation</b> ({html.escape(str(e.get('rule')))}, from "
                     f"d and {html.escape(str(e.get('proxy_column') or 'd only'))}, no gold reward): keep step "
                     f"<b>{e.get('step')}</b> (d = {_fmt(e.get('d'))}) &mdash; {html.escape(str(e.get('reason', '')))}"
                     f"{html.escape(gold_note)}</p>")
    bon_p = root / "bon.csv"
    if bon_p.exists():
        b = pd.read_csv(bon_p)
        if len(b) and {"n", "d", "gold"} <= set(b.columns):
            first, last = b.iloc[0], b.iloc[-1]
            pool = int(last["pool"]) if "pool" in b else int(last["n"])
            proxy = (f", proxy {_fmt(float(first['proxy']))} &rarr; {_fmt(float(last['proxy']))}"
                     if "proxy" in b else "")
            parts.append(f"<p><b>Best-of-n</b> (initial model, pool of {pool} per prompt, unbiased estimator): "
                         f"n = 1 &rarr; {int(last['n'])} moves d_bon from 0 to {_fmt(float(last['d']))}, gold "
                         f"{_fmt(float(first['gold']))} &rarr; {_fmt(float(last['gold']))}{proxy}. d_bon is the "
                         "analytic best-of-n KL, not the fine-tuning d estimator: compare the shapes of the two "
                         "curves, not their d values.</p>")
    fits_p = root / "fits.json"
    if fits_p.exists():
        fits = json.loads(fits_p.read_text())
        rows = []
        for name, f in fits.items():
            if not isinstance(f, dict) or "alpha" not in f:
                continue
            rows.append({"reward": name, "form": f["form"], "alpha": f["alpha"], "beta": f["beta"], "R0": f["r0"],
                         "peak d": f.get("peak_d"), "peak reward": f.get("peak_reward"), "rmse": f["rmse"],
                         "points": f["n_points"]})
        if rows:
            parts.append("<p><b>Fitted Gao et al. curves</b> (RL: R(d) = R0 + d(α − β log d); best-of-n: "
                         "R(d) = R0 + d(α − β d))</p>" + _table_html(pd.DataFrame(rows)))
    peak = root / "peak.json"
    if peak.exists():
        p = json.loads(peak.read_text())
        obs = p.get("observed", {})
        if obs:
            parts.append(f"<p><b>Peak gold</b> ({html.escape(str(p.get('gold')))}): observed at step {obs.get('step')} "
                         f"(d = {_fmt(obs.get('d'))}, gold = {_fmt(obs.get('value'))})"
                         + (f"; fitted peak at d = {_fmt(p['fitted']['d'])} (gold = {_fmt(p['fitted']['value'])})"
                            if p.get("fitted") else "") + "</p>")
    return "<div class='card'>" + "".join(parts) + "</div>" if parts else ""


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (and ``RUN_DIR/plots/*.png``) from the files in ``run_dir``."""
    root = Path(run_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist; pass the directory a run or study wrote")
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots: list[tuple[str, Path]] = []

    fits = json.loads((root / "fits.json").read_text()) if (root / "fits.json").exists() else {}
    early = json.loads((root / "early_stop.json").read_text()) if (root / "early_stop.json").exists() else None
    early_p = root / "early_stop_proxy.json"
    early_proxy = json.loads(early_p.read_text()) if early_p.exists() else None
    d_note = ""
    if (root / "study.json").exists():
        sj = json.loads((root / "study.json").read_text())
        if sj.get("kl_sigma"):
            d_note = f"[σ = {sj['kl_sigma']:g}]"
    if (root / "study.csv").exists():
        study = pd.read_csv(root / "study.csv").sort_values("step").reset_index(drop=True)
        p = plot_vs_step(study, plots_dir / "reward_vs_step.png", early, early_proxy)
        if p:
            plots.append(("Rewards, accuracy and diversity vs fine-tuning step", p))
        p = plot_vs_d(study, fits, plots_dir / "reward_vs_d.png", d_note, early_proxy)
        if p:
            plots.append(("Rewards vs distance from the reference, with fitted Gao et al. curves", p))
        if (root / "human_win_rate.csv").exists():  # `lrm human-eval results --into-report`
            from eval.human_eval.analysis import plot_human_vs_d

            p = plot_human_vs_d(study, pd.read_csv(root / "human_win_rate.csv"), plots_dir / "human_vs_d.png", d_note)
            if p:
                plots.append(("Human win rate against the initial model vs d, beside gold and proxy reward", p))
    if (root / "bon.csv").exists():
        p = plot_bon(pd.read_csv(root / "bon.csv"), fits, plots_dir / "best_of_n.png")
        if p:
            plots.append(("Best-of-n from the initial model: reward vs d_bon, with the R_bon fit", p))
    if (root / "summary.csv").exists() and not (root / "study.csv").exists():
        p = plot_summary(pd.read_csv(root / "summary.csv"), plots_dir / "summary.png", title=root.name)
        if p:
            plots.append(("Evaluation summary", p))

    # tables: CSVs, plus Parquet files without a CSV twin
    # per-sample tables of checkpoints below the top level are linked, not inlined (they are long)
    # (and in a study, whose study.csv already holds every checkpoint's summary, all of theirs are linked)
    is_study = (root / "study.csv").exists()

    def inline(p: Path) -> bool:
        return p.parent == root or (not is_study and p.stem not in ("samples", "per_prompt"))

    found = sorted((p for p in root.rglob("*.csv") if "plots" not in p.relative_to(root).parts),
                   key=lambda p: (p.parent != root, str(p)))
    found += sorted(p for p in root.rglob("*.parquet") if not p.with_suffix(".csv").exists())
    tables = [p for p in found if inline(p)]
    linked = [p for p in found if not inline(p)]
    jsons = sorted(p for p in root.glob("*.json") if p.stat().st_size <= MAX_JSON_BYTES)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT and plots_dir not in p.parents)

    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title or root.name)}"
           f"</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title or root.name)}</h1>",
           f"<p class='meta'>run directory <code>{html.escape(str(root))}</code> &middot; report written "
           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
           _study_highlights(root)]
    if plots:
        out.append("<h2>Plots</h2>")
        for caption, p in plots:
            out.append(f"<h3>{html.escape(caption)}</h3><img class='plot' src='{_rel(p, root)}' "
                       f"alt='{html.escape(caption)}'>")
    if images:
        out.append("<h2>Samples</h2>")
        out.append("<p class='meta'>one figure per checkpoint / folder; rows are prompts, columns are seeds</p>"
                   "<div class='samples'>")
        for p in images:
            out.append(f"<figure><img class='sample' src='{_rel(p, root)}' alt='{html.escape(p.name)}'>"
                       f"<figcaption>{html.escape(_rel(p, root))}</figcaption></figure>")
        out.append("</div>")
    if tables:
        out.append("<h2>Tables</h2>")
        for p in tables:
            df = _read_table(p)
            ci = [c for c in df.columns if str(c).endswith(("_ci_low", "_ci_high"))]
            note = ""
            if ci:  # means here; the CIs are in the file (and in the plots)
                df = df.drop(columns=ci)
                note = (f"<p class='meta'>means only; 95% CIs in <a href='{_rel(p, root)}'>{html.escape(p.name)}"
                        "</a></p>")
            out.append(f"<h3>{html.escape(_rel(p, root))}</h3>{_table_html(df)}{note}")
    if jsons:
        out.append("<h2>Metadata</h2>")
        for p in jsons:
            out.append(f"<h3>{html.escape(_rel(p, root))}</h3>{_json_card(p, root)}")
    if linked:
        out.append("<h2>Other files</h2><ul>" + "".join(
            f"<li><a href='{_rel(p, root)}'>{html.escape(_rel(p, root))}</a></li>" for p in linked) + "</ul>")
    config = root / "config.yaml"
    if config.exists():
        out.append(f"<h2>Config</h2><pre style='font-size:12px'>{html.escape(config.read_text()[:8000])}</pre>")
    out.append("</body></html>")
    path = root / "report.html"
    from lrm.io import atomic_write_bytes

    atomic_write_bytes(path, "\n".join(out).encode())
    return path
