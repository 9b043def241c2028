"""Reward-overoptimization curves (Gao, Schulman & Hilton 2022, "Scaling laws for reward model overoptimization").

With d = sqrt(KL(pi || pi_init)), the gold reward gain over the initial policy follows
    best-of-n:  R_bon(d) = d (alpha - beta d)
    RL:         R_RL(d)  = d (alpha - beta log d)
Both are linear in (alpha, beta), so the fit is an ordinary least-squares problem (scipy.linalg.lstsq).
Gao et al. fit the gain R(d) - R(0); pass ``r0`` (the initial policy's reward) or let the fit estimate an
intercept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from scipy.linalg import lstsq
from scipy.special import gammaln

Form = Literal["rl", "bon"]


def _dlogd(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    pos = d > 0
    out[pos] = d[pos] * np.log(d[pos])  # lim_{d->0} d log d = 0
    return out


@dataclass
class CurveFit:
    """A fitted Gao et al. curve: ``reward(d) = r0 + d (alpha - beta f(d))`` with f = log (rl) or identity (bon)."""

    form: str
    alpha: float
    beta: float
    r0: float
    r0_fitted: bool
    rmse: float
    n_points: int

    def gain(self, d: np.ndarray | float) -> np.ndarray:
        d = np.asarray(d, dtype=np.float64)
        if self.form == "rl":
            return self.alpha * d - self.beta * _dlogd(np.atleast_1d(d)).reshape(d.shape)
        return d * (self.alpha - self.beta * d)

    def __call__(self, d: np.ndarray | float) -> np.ndarray:
        return self.r0 + self.gain(d)

    @property
    def peak_d(self) -> float:
        """argmax_d of the fitted curve (inf when beta <= 0: no overoptimization within the fit)."""
        if self.beta <= 0:
            return math.inf
        if self.form == "rl":  # d/dd [alpha d - beta d log d] = alpha - beta (log d + 1) = 0
            return math.exp(self.alpha / self.beta - 1)
        return self.alpha / (2 * self.beta)  # d/dd [alpha d - beta d^2] = 0

    @property
    def peak_reward(self) -> float:
        d = self.peak_d
        return math.inf if math.isinf(d) else float(self(d))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_d"] = self.peak_d
        out["peak_reward"] = self.peak_reward
        return out


def fit_overoptimization(d: Sequence[float], reward: Sequence[float], form: Form = "rl",
                         r0: float | None = None) -> CurveFit:
    """Least-squares fit of alpha, beta (and the intercept r0 when ``r0`` is None) to (d, reward) points."""
    if form not in ("rl", "bon"):
        raise ValueError(f"form must be 'rl' (d(alpha - beta log d)) or 'bon' (d(alpha - beta d)), got {form!r}")
    d = np.asarray(d, dtype=np.float64).ravel()
    y = np.asarray(reward, dtype=np.float64).ravel()
    if d.shape != y.shape:
        raise ValueError(f"d has {d.size} points but reward has {y.size}")
    keep = np.isfinite(d) & np.isfinite(y)
    d, y = d[keep], y[keep]
    if (d < 0).any():
        raise ValueError(f"d = sqrt(KL) must be >= 0, got min {d.min()}")
    need = 2 if r0 is not None else 3
    if d.size < need:
        raise ValueError(f"need at least {need} finite (d, reward) points to fit {form!r}, got {d.size}")
    cols = [d, -(_dlogd(d) if form == "rl" else d * d)]
    if r0 is None:
        A = np.stack([np.ones_like(d)] + cols, axis=1)
        coef, *_ = lstsq(A, y)
        r0_val, alpha, beta = coef
    else:
        A = np.stack(cols, axis=1)
        coef, *_ = lstsq(A, y - r0)
        (alpha, beta), r0_val = coef, r0
    fit = CurveFit(form=form, alpha=float(alpha), beta=float(beta), r0=float(r0_val), r0_fitted=r0 is None,
                   rmse=0.0, n_points=int(d.size))
    fit.rmse = float(np.sqrt(np.mean((fit(d) - y) ** 2)))
    return fit


# ---- best-of-n ---------------------------------------------------------------------------------------

def bon_distance(n: int | np.ndarray) -> np.ndarray | float:
    """Analytic KL distance of best-of-n from the base policy: d = sqrt(log n - (n - 1) / n)."""
    n_arr = np.asarray(n, dtype=np.float64)
    if (n_arr < 1).any():
        raise ValueError(f"n must be >= 1, got {n}")
    out = np.sqrt(np.maximum(np.log(n_arr) - (n_arr - 1) / n_arr, 0.0))
    return float(out) if np.isscalar(n) else out


def best_of_n_estimate(proxy: Sequence[float], gold: Sequence[float], n: int) -> float:
    """Unbiased estimate of E[gold(argmax_proxy of n samples)] from a pool of N >= n scored samples.

    Sort the pool by proxy; the i-th smallest (1-based) is the proxy-best of a uniformly random n-subset
    with probability C(i-1, n-1) / C(N, n) (Nakano et al. 2021 / Gao et al. 2022). Ties in the proxy are
    broken by pool order (a stable sort), the same rule as ``max`` over the subset in pool order.
    """
    p = np.asarray(proxy, dtype=np.float64).ravel()
    g = np.asarray(gold, dtype=np.float64).ravel()
    if p.shape != g.shape:
        raise ValueError(f"proxy has {p.size} scores but gold has {g.size}")
    N = p.size
    if not 1 <= n <= N:
        raise ValueError(f"n must be in 1..{N} (the pool size), got {n}")
    # Stable sort by proxy, later pool items win ties among equals -> sort key (proxy, -index) reversed below.
    order = np.lexsort((-np.arange(N), p))  # ascending proxy; for ties, the earliest index comes LAST (wins)
    gs = g[order]
    i = np.arange(1, N + 1)
    logw = np.full(N, -np.inf)
    ok = i >= n
    logw[ok] = (gammaln(i[ok]) - gammaln(n) - gammaln(i[ok] - n + 1)) - (
        gammaln(N + 1) - gammaln(n + 1) - gammaln(N - n + 1))
    w = np.exp(logw)  # sums to 1
    return float((w * gs).sum())


def best_of_n_curve(proxy: Sequence[float], gold: Sequence[float], ns: Sequence[int] | None = None) -> pd.DataFrame:
    """Table n, d_bon, proxy_bon, gold_bon for best-of-n over one pool (ns default: 1, 2, 4, ... <= N)."""
    N = len(proxy)
    if ns is None:
        ns = [2**k for k in range(int(math.log2(N)) + 1)]
    rows = [{"n": int(n), "d": bon_distance(int(n)), "proxy": best_of_n_estimate(proxy, proxy, int(n)),
             "gold": best_of_n_estimate(proxy, gold, int(n))} for n in ns]
    return pd.DataFrame(rows)


def bon_kl(n: int | np.ndarray) -> np.ndarray | float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022, Eq. 1)."""
    return bon_distance(n) ** 2


def best_of_n_by_prompt(samples: pd.DataFrame, proxy: str, gold: str | Sequence[str],
                        ns: Sequence[int] | None = None, group: str = "prompt_id") -> pd.DataFrame:
    """Best-of-n per prompt (selection by ``proxy`` within one prompt's pool), averaged over prompts.

    ``samples`` holds one row per sample with a ``group`` column (the prompt) and the score columns. Every
    prompt's pool must have the same size N; ``ns`` defaults to 1, 2, 4, ... <= N. For each n the unbiased
    estimator (``best_of_n_estimate``) is applied to each prompt's pool and the estimates are averaged.

    Returns one row per n: ``n``, ``kl`` = log n - (n-1)/n, ``d`` = sqrt(kl), ``proxy`` (E max of n proxy scores),
    ``gold`` (E gold of the proxy-best of n, for the first ``gold`` column), one column per further gold column
    (its own name), ``*_se`` standard errors over prompts, ``n_prompts`` and ``pool``.
    """
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("gold must name at least one column")
    missing = [c for c in [group, proxy, *golds] if c not in samples]
    if missing:
        raise ValueError(f"samples has no column(s) {missing}; columns: {list(samples.columns)}")
    pools = [g for _, g in samples.groupby(group, sort=True)]
    sizes = sorted({len(g) for g in pools})
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs a pool of the same size N, got sizes {sizes}")
    N = sizes[0]
    ns = [2**k for k in range(int(math.log2(N)) + 1)] if ns is None else [int(n) for n in ns]
    out_names = ["gold"] + golds[1:]
    rows = []
    for n in ns:
        row: dict = {"n": n, "kl": float(bon_kl(n)), "d": float(bon_distance(n))}
        per = {"proxy": [best_of_n_estimate(g[proxy], g[proxy], n) for g in pools]}
        for name, col in zip(out_names, golds):
            per[name] = [best_of_n_estimate(g[proxy], g[col], n) for g in pools]
        for name, v in per.items():
            a = np.asarray(v, dtype=np.float64)
            row[name] = float(a.mean())
            row[f"{name}_se"] = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
        row.update(n_prompts=len(pools), pool=N)
        rows.append(row)
    return pd.DataFrame(rows)


def fit_best_of_n(table: pd.DataFrame, cols: Sequence[str] | None = None) -> dict[str, dict]:
    """R_bon fits ``r0 + d(alpha - beta d)`` of each reward column of a ``best_of_n_by_prompt`` table, anchored at
    r0 = the n = 1 value; keys ``bon/<col>`` (the names ``eval.report.plot_bon`` reads)."""
    if cols is None:
        cols = [c for c in table.columns if (c in ("gold", "proxy") or c.startswith("gold/"))]
    base = table[table["n"] == 1]
    out = {}
    for c in cols:
        ok = np.isfinite(table["d"].to_numpy(float)) & np.isfinite(table[c].to_numpy(float))
        r0 = float(base[c].iloc[0]) if len(base) else None
        if int((ok & (table["d"].to_numpy(float) > 0)).sum()) < 2:
            continue  # two points with d > 0 are needed for alpha and beta
        out[f"bon/{c}"] = fit_overoptimization(table["d"][ok], table[c][ok], form="bon", r0=r0).to_dict()
    return out


# ---- early stopping ----------------------------------------------------------------------------------

def recommend_early_stop(steps: Sequence[int], gold: Sequence[float] | None = None,
                         proxy: Sequence[float] | None = None, holdout: Sequence[float] | None = None,
                         d: Sequence[float] | None = None, d_budget: float | None = None,
                         tolerance: float = 0.1) -> dict:
    """Which checkpoint to keep.

    Rules, first that applies:
      1. ``gold`` given: the checkpoint with the highest gold reward (earliest on ties) -- "peak-gold".
      2. ``proxy`` and ``holdout`` given (holdout = a reward the run did NOT optimise, e.g. an independently
         trained LRM or a held-out ensemble member, standing in for gold): both curves are rescaled to
         [0, 1] over the run (0 = first checkpoint, 1 = their max); divergence begins at the first
         checkpoint where the held-out reward is more than ``tolerance`` below its best so far while the
         proxy is above its value at that best; keep the held-out best before divergence (the last
         checkpoint if they never diverge) -- "divergence".
      3. ``d`` and ``d_budget`` given: the last checkpoint with d <= d_budget -- "kl-budget".
    The optimised proxy alone cannot reveal overoptimisation (it rises by construction), so with nothing
    else this raises.
    """
    steps = np.asarray(steps)
    n = steps.size
    if n == 0:
        raise ValueError("no checkpoints given")

    def arr(x, name):
        a = np.asarray(x, dtype=np.float64).ravel()
        if a.size != n:
            raise ValueError(f"{name} has {a.size} values for {n} checkpoints")
        return a

    if gold is not None:
        g = arr(gold, "gold")
        i = int(np.nanargmax(g))
        return {"rule": "peak-gold", "index": i, "step": int(steps[i]), "gold": float(g[i]),
                "reason": f"highest gold reward {g[i]:.4g} at step {int(steps[i])}"}
    if proxy is not None and holdout is not None:
        p, h = arr(proxy, "proxy"), arr(holdout, "holdout")

        def gain(a):
            span = np.nanmax(a) - a[0]
            return (a - a[0]) / span if span > 0 else np.zeros_like(a)

        gp, gh = gain(p), gain(h)
        start = n  # first checkpoint where the held-out reward has fallen off while the proxy kept rising
        for j in range(1, n):
            best = int(np.nanargmax(gh[:j]))
            if gh[j] < gh[best] - tolerance and gp[j] > gp[best]:
                start = j
                break
        i = int(np.nanargmax(gh[:start])) if start < n else n - 1
        reason = (f"held-out reward falls more than {tolerance} (normalised) below its best while the proxy keeps "
                  f"rising from step {int(steps[start])}; keep its best checkpoint before that"
                  if start < n else "proxy and held-out reward never diverge; keep the last checkpoint")
        return {"rule": "divergence", "index": int(i), "step": int(steps[i]), "reason": reason}
    if d is not None and d_budget is not None:
        dd = arr(d, "d")
        ok = np.nonzero(dd <= d_budget)[0]
        if ok.size == 0:
            raise ValueError(f"no checkpoint has d <= d_budget={d_budget} (min d {np.nanmin(dd):.4g})")
        i = int(ok[-1])
        return {"rule": "kl-budget", "index": i, "step": int(steps[i]), "d": float(dd[i]),
                "reason": f"last checkpoint with d = sqrt(KL) <= {d_budget}"}
    raise ValueError(
        "cannot recommend a checkpoint from the optimised proxy alone (it rises by construction): pass gold "
        "rewards, a held-out reward (holdout=) with the proxy, or d with d_budget="
    )


def recommend_proxy_stop(steps: Sequence[int], d: Sequence[float], proxy: Sequence[float] | None = None,
                         d_budget: float | None = None, min_slope_frac: float | None = None) -> dict:
    """Which checkpoint to keep WITHOUT the gold reward: from the distance d and the optimised proxy only.

    Rules (at least one must be set; with both, the earlier checkpoint wins):
      * "kl-budget" (``d_budget``): the last checkpoint with d <= d_budget.
      * "proxy-slope" (``min_slope_frac`` in (0, 1], needs ``proxy``): walking the checkpoints in order, the
        marginal proxy gain per unit distance from the last kept checkpoint a to checkpoint j is
        s_j = (p_j - p_a) / (d_j - d_a); the first interval's slope s_1 is the initial rate. Stop at the first j
        with s_j < min_slope_frac * s_1 and keep a. Checkpoints that are no farther than the last kept one
        (d_j <= d_a, e.g. estimator noise) are skipped. If the proxy does not rise on the first interval,
        keep the first checkpoint. (Gao et al.'s gold curves bend down where the proxy's return per unit KL has
        fallen off; the threshold is relative, so it needs no reward units.)
    Returns a dict with ``rule``, ``index``, ``step``, ``d``, ``proxy`` (when given), ``reason`` and
    ``uses_gold: False``; the per-rule picks are under ``kl_budget`` / ``proxy_slope``.
    """
    steps = np.asarray(steps)
    n = steps.size
    if n == 0:
        raise ValueError("no checkpoints given")
    dd = np.asarray(d, dtype=np.float64).ravel()
    if dd.size != n:
        raise ValueError(f"d has {dd.size} values for {n} checkpoints")
    if not np.isfinite(dd).all():
        raise ValueError("d must be finite at every checkpoint for a proxy-only recommendation (no d estimate?)")
    p = None
    if proxy is not None:
        p = np.asarray(proxy, dtype=np.float64).ravel()
        if p.size != n:
            raise ValueError(f"proxy has {p.size} values for {n} checkpoints")
    if d_budget is None and min_slope_frac is None:
        raise ValueError("set d_budget and/or min_slope_frac for a proxy-only recommendation")
    picks: dict[str, dict] = {}
    if d_budget is not None:
        if not d_budget > 0:
            raise ValueError(f"d_budget must be > 0, got {d_budget}")
        ok = np.nonzero(dd <= d_budget)[0]
        if ok.size == 0:
            raise ValueError(f"no checkpoint has d <= d_budget={d_budget} (min d {dd.min():.4g})")
        i = int(ok[-1])
        picks["kl_budget"] = {"index": i, "reason": f"last checkpoint with d = sqrt(KL) <= {d_budget:g}"}
    if min_slope_frac is not None:
        if not 0 < min_slope_frac <= 1:
            raise ValueError(f"min_slope_frac must be in (0, 1], got {min_slope_frac}")
        if p is None or not np.isfinite(p).all():
            raise ValueError("the proxy-slope rule needs finite proxy rewards at every checkpoint")
        a, s_ref, stop, reason = 0, None, None, None
        for j in range(1, n):
            if dd[j] <= dd[a] + 1e-12:
                continue
            s = (p[j] - p[a]) / (dd[j] - dd[a])
            if s_ref is None:
                s_ref = s
                if s_ref <= 0:
                    stop, reason = j, "the proxy does not rise on the first interval; keep the first checkpoint"
                    break
            elif s < min_slope_frac * s_ref:
                stop = j
                reason = (f"proxy gain per unit d falls to {s:.3g} (< {min_slope_frac:g} x the initial {s_ref:.3g}) "
                          f"from step {int(steps[a])} to step {int(steps[j])}; keep step {int(steps[a])}")
                break
            a = j
        if reason is None and a < n - 1:
            reason = (f"proxy gain per unit d stays above {min_slope_frac:g} x its initial rate, and the checkpoints "
                      f"after step {int(steps[a])} are no farther from the initial model; keep step {int(steps[a])}")
        elif reason is None:
            reason = f"proxy gain per unit d stays above {min_slope_frac:g} x its initial rate; keep the last one"
        picks["proxy_slope"] = {"index": int(a), "reason": reason, "initial_slope": s_ref,
                                "stopped_at_step": None if stop is None else int(steps[stop])}
    for v in picks.values():
        v["step"] = int(steps[v["index"]])
        v["d"] = float(dd[v["index"]])
    key = min(picks, key=lambda k: picks[k]["index"])
    i = picks[key]["index"]
    rule = "+".join(k.replace("_", "-") for k in picks) if len(picks) > 1 else key.replace("_", "-")
    out = {"rule": rule, "index": i, "step": int(steps[i]), "d": float(dd[i]), "uses_gold": False,
           "reason": picks[key]["reason"] + (f" (earlier of {' and '.join(picks)})" if len(picks) > 1 else ""),
           **picks}
    if p is not None:
        out["proxy"] = float(p[i])
    return out
