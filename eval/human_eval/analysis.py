"""Analyses of a human pairwise study: win rates, Bradley-Terry scores, both-bad counts, rater consistency.

Which votes count: first-time votes. Swap repeats (``repeat_of`` set) measure consistency only; counting them too
would weigh some comparisons twice. "Both bad" answers say nothing about which sample is better: they are counted
apart (per pair and per checkpoint) and left out of win rates and Bradley-Terry.

1. Win rate of checkpoint a over b: ``(W + T/2) / N`` over the pair's counted votes (W wins of a, T ties,
   N = W + L + T).
2. Bradley-Terry: P(i beats j) = p_i / (p_i + p_j) = sigmoid(theta_i - theta_j), theta = log p; a tie counts half a
   win for each side. Fitted by the MM algorithm (Hunter 2004, "MM algorithms for generalized Bradley-Terry
   models", Eq. 3; Zermelo 1929)::

       p_i <- (W_i + prior/2) / (sum_j N_ij / (p_i + p_j) + prior / (p_i + 1))

   with W_i = wins + ties/2 of i and N_ij the counted comparisons of i and j. ``prior`` (default 1) adds that many
   virtual ties of every checkpoint against a fixed player of strength 1 (theta = 0): the maximiser of the
   log-likelihood plus ``(prior/2) sum_i [log sigmoid(theta_i) + log sigmoid(-theta_i)]``, finite even when a
   checkpoint wins or loses every comparison (prior = 0 is the plain maximum likelihood, which then does not exist).
   Scores are reported centred (mean theta = 0), in natural-log units.
3. Intervals: 95 % percentile bootstrap resampling whole PROMPTS with replacement (a prompt's votes stay together:
   raters judge a prompt's samples alike); the same resamples give every win rate and every score's interval.
4. Swap consistency per rater: a repeat is consistent when it names the same checkpoint (left <-> right swapped),
   or tie / both bad again.

``write_results(study_dir)`` writes ``results/``: ``results.json``, ``votes.csv``, ``win_rates.csv``,
``bt_scores.csv``, ``consistency.csv``, ``human_win_rate.csv`` (every checkpoint against the study's initial one:
``human_win_rate_vs``) and ``results.html`` (offline). ``plot_human_vs_d`` draws the human win rate against d
beside the gold and proxy rewards of an ``lrm overopt`` study (``eval.report`` shows it when the study directory has
a ``human_win_rate.csv``).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.human_eval.store import CHOICES, VoteStore
from eval.human_eval.study import Study, checkpoint_step

SWAPPED_CHOICE = {"left": "right", "right": "left", "tie": "tie", "both_bad": "both_bad"}


# ---- Bradley-Terry ------------------------------------------------------------------------------------------

def bradley_terry(W: np.ndarray, prior: float = 1.0, tol: float = 1e-10, max_iter: int = 20_000) -> np.ndarray:
    """Centred Bradley-Terry scores theta from ``W[i, j]`` = wins of i over j plus half their ties (module doc, 2.).

    ``W + W.T`` are the comparisons. ``W`` may be a stack ``(B, K, K)`` (bootstrap resamples, fitted together).
    With ``prior`` = 0 a checkpoint that never wins gets -inf (the maximum likelihood does not exist); keep
    ``prior`` > 0 for finite scores."""
    W = np.asarray(W, dtype=np.float64)
    single = W.ndim == 2
    W = W[None] if single else W
    if W.ndim != 3 or W.shape[-1] != W.shape[-2] or (W < 0).any():
        raise ValueError(f"W must be a square matrix (or a stack of them) of non-negative win counts, got shape "
                         f"{W.shape}")
    if prior < 0:
        raise ValueError(f"prior must be >= 0 virtual ties, got {prior}")
    K = W.shape[-1]
    W = W * (1 - np.eye(K))
    N = W + np.swapaxes(W, -1, -2)  # (B, K, K) comparisons
    wins = W.sum(-1) + prior / 2  # (B, K): W_i + prior/2
    p = np.ones(wins.shape)
    tiny = 1e-300
    for _ in range(max_iter):
        pp = p[..., :, None] + p[..., None, :]
        denom = np.divide(N, pp, out=np.zeros_like(N), where=pp > 0).sum(-1) + prior / (p + 1)
        new = np.divide(wins, denom, out=np.ones_like(wins), where=denom > 0)
        if prior == 0:  # no anchor: fix the scale (geometric mean 1 over positive strengths)
            logs = np.where(new > 0, np.log(np.maximum(new, tiny)), 0.0)
            npos = np.maximum((new > 0).sum(-1, keepdims=True), 1)
            new = new / np.exp(logs.sum(-1, keepdims=True) / npos)
        delta = np.abs(np.log(np.maximum(new, tiny)) - np.log(np.maximum(p, tiny))).max()
        p = new
        if delta < tol:
            break
    with np.errstate(divide="ignore"):
        theta = np.log(p)
    finite = np.isfinite(theta)
    mean = np.where(finite, theta, 0.0).sum(-1, keepdims=True) / np.maximum(finite.sum(-1, keepdims=True), 1)
    theta = theta - mean
    return theta[0] if single else theta


# ---- votes -> counts ----------------------------------------------------------------------------------------------

def load_votes(study_dir: str | Path) -> tuple[Study, pd.DataFrame]:
    """(study, votes table) of a study directory."""
    study = Study.load(study_dir)
    store = VoteStore(study)
    try:
        votes = store.votes_frame()
    finally:
        store.close()
    return study, votes


def _outcomes(votes: pd.DataFrame, checkpoints: list[str]) -> pd.DataFrame:
    """One row per vote in study order: a < b (checkpoint indices), score of a (1 / 0 / 0.5, NaN for both bad)."""
    idx = {c: i for i, c in enumerate(checkpoints)}
    unknown = sorted(set(votes["left_ckpt"]).union(votes["right_ckpt"]) - set(idx))
    if unknown:
        raise ValueError(f"votes name checkpoints {unknown} that are not in the study {checkpoints}")
    bad = sorted(set(votes["choice"]) - set(CHOICES))
    if bad:
        raise ValueError(f"votes hold choices {bad}; valid: {list(CHOICES)}")
    li = votes["left_ckpt"].map(idx).to_numpy()
    ri = votes["right_ckpt"].map(idx).to_numpy()
    a, b = np.minimum(li, ri), np.maximum(li, ri)
    choice = votes["choice"].to_numpy()
    left_score = np.select([choice == "left", choice == "right", choice == "tie"], [1.0, 0.0, 0.5], np.nan)
    s_a = np.where(li == a, left_score, 1 - left_score)
    return pd.DataFrame({"vote_id": votes["id"].to_numpy() if "id" in votes else np.arange(len(votes)),
                         "rater": votes["rater"].to_numpy(), "prompt_id": votes["prompt_id"].to_numpy(),
                         "a": a, "b": b, "s_a": s_a, "both_bad": choice == "both_bad",
                         "repeat": votes["repeat_of"].notna().to_numpy() if "repeat_of" in votes
                         else np.zeros(len(votes), bool)})


def _per_prompt(out: pd.DataFrame, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Counted (first-time, not both-bad) votes as per-prompt matrices: ``Wp[p, i, j]`` = wins + ties/2 of i over j
    and the prompt ids p stands for."""
    counted = out[~out["repeat"] & ~out["both_bad"]]
    prompts = np.array(sorted(set(out.loc[~out["repeat"], "prompt_id"])), dtype=np.int64)
    pos = {int(p): k for k, p in enumerate(prompts)}
    Wp = np.zeros((len(prompts), K, K))
    for r in counted.itertuples(index=False):
        k = pos[int(r.prompt_id)]
        Wp[k, r.a, r.b] += r.s_a
        Wp[k, r.b, r.a] += 1 - r.s_a
    return Wp, prompts


# ---- results -----------------------------------------------------------------------------------------------------

@dataclass
class HumanEvalResults:
    """``win_rates``: one row per checkpoint pair; ``bt``: one row per checkpoint; ``consistency``: one row per
    rater; ``vs_initial``: every checkpoint's win rate against ``initial``; ``votes``: every vote."""

    checkpoints: list[str]
    initial: str
    votes: pd.DataFrame
    win_rates: pd.DataFrame
    bt: pd.DataFrame
    consistency: pd.DataFrame
    vs_initial: pd.DataFrame
    settings: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def records(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records"))  # NaN -> null

        return {"checkpoints": self.checkpoints, "initial": self.initial, "summary": self.summary,
                "settings": self.settings, "win_rates": records(self.win_rates),
                "bradley_terry": records(self.bt), "consistency": records(self.consistency),
                "human_win_rate_vs_initial": records(self.vs_initial)}


def _pct(vals: np.ndarray, ci: float) -> tuple[float, float]:
    v = vals[np.isfinite(vals)]
    if v.size == 0:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def consistency_table(votes: pd.DataFrame) -> pd.DataFrame:
    """Per rater: votes, swap repeats, repeats that agree with the original (sides swapped), their fraction."""
    by_id = votes.set_index("id")
    rows = []
    for rater, g in votes.groupby("rater", sort=True):
        reps = g[g["repeat_of"].notna()]
        ok = sum(SWAPPED_CHOICE[by_id.loc[int(r.repeat_of), "choice"]] == r.choice for r in reps.itertuples())
        rows.append({"rater": rater, "n_votes": int(len(g)), "n_repeats": int(len(reps)), "n_consistent": int(ok),
                     "consistency": ok / len(reps) if len(reps) else float("nan")})
    return pd.DataFrame(rows, columns=["rater", "n_votes", "n_repeats", "n_consistent", "consistency"])


def analyze(study: Study, votes: pd.DataFrame, n_bootstrap: int = 1000, ci: float = 0.95, prior: float = 1.0,
            seed: int = 0, initial: str | None = None) -> HumanEvalResults:
    """Every analysis of the module doc from a study and its votes (``load_votes``)."""
    ck = list(study.checkpoints)
    K = len(ck)
    initial = initial or study.initial or ck[0]
    if initial not in ck:
        raise ValueError(f"initial checkpoint {initial!r} is not one of {ck}")
    out = _outcomes(votes, ck) if len(votes) else pd.DataFrame(
        columns=["vote_id", "rater", "prompt_id", "a", "b", "s_a", "both_bad", "repeat"])
    if len(votes) == 0:
        out = out.astype({"a": int, "b": int, "both_bad": bool, "repeat": bool, "s_a": float})
    Wp, prompts = _per_prompt(out, K)
    W = Wp.sum(0) if len(prompts) else np.zeros((K, K))
    theta = bradley_terry(W, prior=prior)

    # 1. bootstrap over prompts
    rng = np.random.default_rng(seed)
    P = len(prompts)
    boot_wr = np.full((max(n_bootstrap, 0), K, K), np.nan)
    boot_bt = np.full((max(n_bootstrap, 0), K), np.nan)
    if P >= 2 and n_bootstrap > 0:
        counts = np.stack([np.bincount(rng.integers(0, P, P), minlength=P) for _ in range(n_bootstrap)])  # (B, P)
        Wb = np.tensordot(counts.astype(np.float64), Wp, axes=1)  # (B, K, K)
        Nb = Wb + np.swapaxes(Wb, 1, 2)
        boot_wr = np.divide(Wb, Nb, out=np.full_like(Wb, np.nan), where=Nb > 0)
        boot_bt = bradley_terry(Wb, prior=prior)

    # 2. pairs
    first = out[~out["repeat"]]
    rows = []
    for i in range(K):
        for j in range(i + 1, K):
            g = first[(first["a"] == i) & (first["b"] == j)]
            c = g[~g["both_bad"]]
            wins_a, wins_b, ties = int((c["s_a"] == 1).sum()), int((c["s_a"] == 0).sum()), int((c["s_a"] == 0.5).sum())
            n = wins_a + wins_b + ties
            lo, hi = _pct(boot_wr[:, i, j], ci) if n else (float("nan"), float("nan"))
            rows.append({"checkpoint_a": ck[i], "checkpoint_b": ck[j], "n": n, "wins_a": wins_a, "wins_b": wins_b,
                         "ties": ties, "both_bad": int(g["both_bad"].sum()),
                         "win_rate_a": (wins_a + ties / 2) / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
                         "n_prompts": int(g["prompt_id"].nunique())})
    win_rates = pd.DataFrame(rows)

    # 3. checkpoints
    rows = []
    for i in range(K):
        mine = first[(first["a"] == i) | (first["b"] == i)]
        c = mine[~mine["both_bad"]]
        my_score = np.where(c["a"] == i, c["s_a"], 1 - c["s_a"])
        lo, hi = _pct(boot_bt[:, i], ci)
        rows.append({"checkpoint": ck[i], "score": float(theta[i]), "ci_low": lo, "ci_high": hi,
                     "wins": int((my_score == 1).sum()), "losses": int((my_score == 0).sum()),
                     "ties": int((my_score == 0.5).sum()), "n": int(len(c)), "both_bad": int(mine["both_bad"].sum()),
                     "both_bad_rate": float(mine["both_bad"].mean()) if len(mine) else float("nan"),
                     "step": checkpoint_step(ck[i])})
    bt = pd.DataFrame(rows)
    bt["rank"] = bt["score"].rank(ascending=False, method="min").astype(int)

    results = HumanEvalResults(
        checkpoints=ck, initial=initial, votes=votes, win_rates=win_rates, bt=bt,
        consistency=consistency_table(votes) if len(votes) else consistency_table(
            pd.DataFrame(columns=["id", "rater", "repeat_of", "choice"])),
        vs_initial=pd.DataFrame(),
        settings={"n_bootstrap": int(n_bootstrap), "ci": float(ci), "bt_prior": float(prior), "seed": int(seed),
                  "bootstrap_unit": "prompt", "counted": "first-time votes, both-bad apart"},
        summary={"n_votes": int(len(votes)), "n_counted": int((~out["repeat"] & ~out["both_bad"]).sum()),
                 "n_both_bad": int(out.loc[~out["repeat"], "both_bad"].sum()), "n_repeats": int(out["repeat"].sum()),
                 "n_raters": int(votes["rater"].nunique()) if len(votes) else 0, "n_prompts_voted": int(P),
                 "n_prompts": len(study.prompts), "n_seeds": len(study.seeds), "quota": study.quota})
    results.vs_initial = human_win_rate_vs(results, initial)
    return results


def human_win_rate_vs(results: HumanEvalResults, reference: str | None = None) -> pd.DataFrame:
    """Every checkpoint's human win rate ``(W + T/2)/N`` against ``reference`` (default: the study's initial
    checkpoint), with its bootstrap interval and the step parsed from ``step_XXXXXX`` names: the column an
    overoptimization report shows beside gold and proxy reward vs d. The reference's own row is 0.5 by definition."""
    ref = reference or results.initial
    if ref not in results.checkpoints:
        raise ValueError(f"reference checkpoint {ref!r} is not one of {results.checkpoints}")
    rows = []
    for c in results.checkpoints:
        row = {"checkpoint": c, "step": checkpoint_step(c), "reference": ref}
        if c == ref:
            rows.append({**row, "win_rate": 0.5, "ci_low": float("nan"), "ci_high": float("nan"), "n": 0,
                         "both_bad": 0})
            continue
        wr = results.win_rates
        r = wr[((wr["checkpoint_a"] == c) & (wr["checkpoint_b"] == ref)) |
               ((wr["checkpoint_a"] == ref) & (wr["checkpoint_b"] == c))].iloc[0]
        if r["checkpoint_a"] == c:
            rate, lo, hi = r["win_rate_a"], r["ci_low"], r["ci_high"]
        else:
            rate, lo, hi = 1 - r["win_rate_a"], 1 - r["ci_high"], 1 - r["ci_low"]
        rows.append({**row, "win_rate": float(rate), "ci_low": float(lo), "ci_high": float(hi), "n": int(r["n"]),
                     "both_bad": int(r["both_bad"])})
    return pd.DataFrame(rows)


# ---- files -------------------------------------------------------------------------------------------------------

def write_results(study_dir: str | Path, out_dir: str | Path | None = None, n_bootstrap: int = 1000,
                  ci: float = 0.95, prior: float = 1.0, seed: int = 0) -> dict[str, Path]:
    """Analyse a study's votes and write ``results/`` (module doc); returns the written paths."""
    from lrm.io import atomic_write_bytes

    study, votes = load_votes(study_dir)
    res = analyze(study, votes, n_bootstrap=n_bootstrap, ci=ci, prior=prior, seed=seed)
    out = Path(out_dir) if out_dir is not None else Path(study_dir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, df in (("votes", votes), ("win_rates", res.win_rates), ("bt_scores", res.bt),
                     ("consistency", res.consistency), ("human_win_rate", res.vs_initial)):
        paths[name] = out / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    paths["json"] = out / "results.json"
    atomic_write_bytes(paths["json"], (json.dumps({"study": str(Path(study_dir).resolve()), **res.to_dict()},
                                                  indent=1) + "\n").encode())
    paths["html"] = out / "results.html"
    atomic_write_bytes(paths["html"], results_html(study, res).encode())
    return paths


# ---- the results page ------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;
padding:0 16px;line-height:1.4} h1{font-size:23px;margin-bottom:2px} h2{font-size:18px;border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:28px} .meta{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px;
margin:6px 0 12px} th,td{border:1px solid #ddd;padding:3px 9px;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left} .card{background:#fafafa;border:1px solid #e4e4e4;border-radius:6px;
padding:10px 14px;margin:10px 0} td.hi{background:#e3f1e3} td.lo{background:#f8e4e4} code{background:#f2f2f2;
padding:0 3px} svg text{font-family:inherit}
"""


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def _table(df: pd.DataFrame, cols: list[str], heads: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>"]
    for _, r in df.iterrows():
        out.append("<tr>" + "".join(f"<td>{_f(r[c])}</td>" for c in cols) + "</tr>")
    return "".join(out) + "</table>"


def _bt_svg(bt: pd.DataFrame) -> str:
    """Scores with their intervals as an inline SVG (no scripts, no external files)."""
    if bt.empty:
        return ""
    vals = np.concatenate([bt["score"].to_numpy(float), bt["ci_low"].to_numpy(float), bt["ci_high"].to_numpy(float)])
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (-1.0, 1.0)
    pad = max(hi - lo, 0.2) * 0.08
    lo, hi = lo - pad, hi + pad
    W, left, row = 720, 190, 30
    H = row * len(bt) + 40
    x = lambda v: left + (v - lo) / (hi - lo) * (W - left - 20)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' role='img' "
             "aria-label='Bradley-Terry scores with 95% intervals'>",
             f"<line x1='{x(0):.1f}' y1='8' x2='{x(0):.1f}' y2='{H - 26}' stroke='#bbb' stroke-dasharray='4 3'/>"]
    for k, r in enumerate(bt.sort_values("score", ascending=False).itertuples()):
        y = 20 + k * row
        parts.append(f"<text x='{left - 10}' y='{y + 4}' text-anchor='end' font-size='13'>"
                     f"{html.escape(str(r.checkpoint))}</text>")
        if math.isfinite(r.ci_low) and math.isfinite(r.ci_high):
            parts.append(f"<line x1='{x(r.ci_low):.1f}' y1='{y}' x2='{x(r.ci_high):.1f}' y2='{y}' stroke='#4a78c2' "
                         "stroke-width='3'/>")
        if math.isfinite(r.score):
            parts.append(f"<circle cx='{x(r.score):.1f}' cy='{y}' r='6' fill='#1f4f99'/>"
                         f"<text x='{x(r.score):.1f}' y='{y - 9}' text-anchor='middle' font-size='11' fill='#333'>"
                         f"{r.score:.2f}</text>")
    for v in np.linspace(lo, hi, 5):
        parts.append(f"<text x='{x(v):.1f}' y='{H - 8}' text-anchor='middle' font-size='11' fill='#666'>"
                     f"{0.0 if abs(v) < 5e-3 else v:.2f}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _matrix(res: HumanEvalResults) -> str:
    ck = res.checkpoints
    cell = {}
    for r in res.win_rates.itertuples():
        cell[(r.checkpoint_a, r.checkpoint_b)] = (r.win_rate_a, r.ci_low, r.ci_high, r.n)
        cell[(r.checkpoint_b, r.checkpoint_a)] = (1 - r.win_rate_a, 1 - r.ci_high, 1 - r.ci_low, r.n)
    out = ["<table><tr><th>row beats column</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in ck) + "</tr>"]
    for a in ck:
        out.append(f"<tr><td><b>{html.escape(a)}</b></td>")
        for b in ck:
            if a == b or (a, b) not in cell or not cell[(a, b)][3]:
                out.append("<td>&ndash;</td>")
                continue
            w, lo, hi, n = cell[(a, b)]
            cls = " class='hi'" if math.isfinite(lo) and lo > 0.5 else " class='lo'" if math.isfinite(hi) and \
                hi < 0.5 else ""
            out.append(f"<td{cls}>{w:.2f} <span class='meta'>[{_f(lo, 2)}, {_f(hi, 2)}] n={n}</span></td>")
        out.append("</tr>")
    return "".join(out) + "</table>"


def results_html(study: Study, res: HumanEvalResults) -> str:
    s = res.summary
    st = res.settings
    title = f"Human pairwise evaluation: {html.escape(study.root.resolve().name)}"
    cons = res.consistency
    tot_rep = int(cons["n_repeats"].sum()) if len(cons) else 0
    tot_ok = int(cons["n_consistent"].sum()) if len(cons) else 0
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
        f"</head><body><h1>{title}</h1>",
        f"<p class='meta'>{len(res.checkpoints)} checkpoints, {s['n_prompts']} prompts x {s['n_seeds']} seeds; "
        f"written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        f"<div class='card'><b>{s['n_votes']}</b> votes by <b>{s['n_raters']}</b> raters on {s['n_prompts_voted']} "
        f"prompts: {s['n_counted']} counted, {s['n_both_bad']} both bad (counted apart), {s['n_repeats']} swap "
        f"repeats (consistency only; {tot_ok} of {tot_rep} consistent).</div>",
        "<h2>Bradley&ndash;Terry scores</h2>",
        "<p class='meta'>theta (natural-log strength, centred); P(i beats j) = sigmoid(theta_i &minus; theta_j). Ties "
        f"are half wins; MM iterations with {st['bt_prior']:g} virtual tie(s) per checkpoint against a theta = 0 "
        f"player; 95% percentile intervals from {st['n_bootstrap']} bootstrap resamples of prompts.</p>",
        _bt_svg(res.bt),
        _table(res.bt.sort_values("rank"), ["rank", "checkpoint", "score", "ci_low", "ci_high", "wins", "losses",
                                            "ties", "n", "both_bad", "both_bad_rate"],
               ["rank", "checkpoint", "score", "95% low", "95% high", "wins", "losses", "ties", "n", "both bad",
                "both-bad rate"]),
        "<h2>Win rates</h2>",
        "<p class='meta'>(W + T/2) / N of the row over the column, N without both-bad votes; [95% interval, bootstrap "
        "over prompts]; green / red: the interval excludes 0.5.</p>",
        _matrix(res),
        _table(res.win_rates, ["checkpoint_a", "checkpoint_b", "win_rate_a", "ci_low", "ci_high", "n", "wins_a",
                               "wins_b", "ties", "both_bad", "n_prompts"],
               ["a", "b", "win rate of a", "95% low", "95% high", "n", "a wins", "b wins", "ties", "both bad",
                "prompts"]),
        f"<h2>Against the initial checkpoint ({html.escape(res.initial)})</h2>",
        _table(res.vs_initial, ["checkpoint", "step", "win_rate", "ci_low", "ci_high", "n", "both_bad"],
               ["checkpoint", "step", "human win rate", "95% low", "95% high", "n", "both bad"]),
        "<h2>Rater consistency (swap repeats)</h2>",
        "<p class='meta'>about " + f"{study.repeat_fraction:.0%}" + " of pairs are shown again with the sides swapped; "
        "consistent = the same checkpoint chosen again, or tie / both bad again.</p>",
        _table(cons, ["rater", "n_votes", "n_repeats", "n_consistent", "consistency"],
               ["rater", "votes", "repeats", "consistent", "consistency"]),
        "<p class='meta'>Files: results.json, win_rates.csv, bt_scores.csv, consistency.csv, human_win_rate.csv, "
        "votes.csv.</p></body></html>",
    ]
    return "\n".join(parts)


# ---- the overoptimization report ---------------------------------------------------------------------------------

def plot_human_vs_d(study: pd.DataFrame, human: pd.DataFrame, out: Path, d_note: str = "") -> Path | None:
    """Gold reward, proxy reward and human win rate against the initial model, each vs d, side by side; checkpoints
    matched on ``step``. None when nothing matches."""
    if not {"step", "win_rate"} <= set(human.columns) or not {"step", "d"} <= set(study.columns):
        return None
    h = human.dropna(subset=["step"]).astype({"step": int})
    m = study.astype({"step": int}).merge(h[["step", "win_rate", "ci_low", "ci_high"]], on="step", how="inner")
    if m.empty or not m["d"].notna().any():
        return None
    from eval.report import COLORS, _label, _metric_cols, _plt

    cols = [c for c in _metric_cols(study) if c.startswith("gold/")][:1] + \
        [c for c in _metric_cols(study) if c.startswith("proxy/")][:1]
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols) + 1, figsize=(4.6 * (len(cols) + 1), 3.6), squeeze=False)
    axes = list(axes.flat)
    d = m["d"].to_numpy(float)
    y = m["win_rate"].to_numpy(float)
    for ax, yy in zip(axes, [m[c].to_numpy(float) for c in cols] + [y]):
        for s, dx, v in zip(m["step"], d, yy):
            ax.annotate(str(int(s)), (dx, v), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#444")
        ax.set_xlabel("d = sqrt(KL to reference)" + (f" {d_note}" if d_note else ""))
    for ax, c in zip(axes, cols):
        ax.plot(d, m[c], "o-", color=COLORS[c.split("/", 1)[0]])
        ax.set_ylabel(_label(c))
        ax.set_title(f"{c} vs d")
    ax = axes[-1]
    err = np.stack([y - m["ci_low"].to_numpy(float), m["ci_high"].to_numpy(float) - y])
    ax.errorbar(d, y, yerr=np.nan_to_num(np.clip(err, 0, None)), fmt="o-", color="#d62728", capsize=3,
                label="human win rate (95% CI)")
    ax.axhline(0.5, color="#888", linestyle="--", linewidth=1, label="as good as the initial model")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("human win rate vs initial model")
    ax.set_title("human judgement vs d")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
