"""Best-of-n over per-prompt pools (unbiased estimator, d_bon, R_bon fit) and the gold-free early-stopping rule."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from eval.overopt import (
    best_of_n_by_prompt,
    bon_kl,
    fit_best_of_n,
    recommend_early_stop,
    recommend_proxy_stop,
)


def _pool(rng, n_prompts=3, N=8):
    rows = []
    for i in range(n_prompts):
        proxy = rng.integers(0, 5, N).astype(float)  # ties on purpose
        gold = rng.normal(size=N)
        for j in range(N):
            rows.append({"prompt_id": i, "sample": j, "proxy/lrm": proxy[j], "gold/g": gold[j],
                         "gold/h": -proxy[j] + gold[j]})
    return pd.DataFrame(rows)


def test_best_of_n_by_prompt_matches_brute_force_per_prompt():
    rng = np.random.default_rng(0)
    df = _pool(rng)
    t = best_of_n_by_prompt(df, "proxy/lrm", ["gold/g", "gold/h"])
    assert list(t["n"]) == [1, 2, 4, 8]
    assert list(t.columns[:3]) == ["n", "kl", "d"] and {"gold", "gold/h", "proxy", "gold_se"} <= set(t.columns)
    np.testing.assert_allclose(t["kl"], [0.0, math.log(2) - 0.5, math.log(4) - 0.75, math.log(8) - 7 / 8])
    np.testing.assert_allclose(t["d"], np.sqrt(t["kl"]))
    for col, out in (("gold/g", "gold"), ("gold/h", "gold/h"), ("proxy/lrm", "proxy")):
        for n in (1, 2, 4, 8):
            per = []
            for _, g in df.groupby("prompt_id"):
                p, y = g["proxy/lrm"].to_numpy(), g[col].to_numpy()
                # brute force: every n-subset, the proxy-best (first index among ties, as max over pool order)
                per.append(np.mean([y[list(c)][int(np.argmax(p[list(c)]))]
                                    for c in itertools.combinations(range(len(p)), n)]))
            assert t.loc[t["n"] == n, out].item() == pytest.approx(np.mean(per), abs=1e-10)
    # n = 1 is the plain mean; n = N the proxy-best sample of each prompt
    assert t["gold"].iloc[0] == pytest.approx(df["gold/g"].mean())
    assert t["proxy"].is_monotonic_increasing
    assert t["pool"].iloc[0] == 8 and t["n_prompts"].iloc[0] == 3
    with pytest.raises(ValueError, match="same size"):
        best_of_n_by_prompt(df.iloc[:-1], "proxy/lrm", "gold/g")
    with pytest.raises(ValueError, match="no column"):
        best_of_n_by_prompt(df, "proxy/nope", "gold/g")


def test_fit_best_of_n_recovers_alpha_beta():
    ns = np.array([1, 2, 4, 8, 16, 32, 64])
    d = np.sqrt(bon_kl(ns))
    t = pd.DataFrame({"n": ns, "d": d, "gold": 0.2 + d * (0.9 - 0.4 * d), "proxy": 0.2 + 1.1 * d})
    fits = fit_best_of_n(t)
    assert set(fits) == {"bon/gold", "bon/proxy"}
    g = fits["bon/gold"]
    assert g["form"] == "bon" and not g["r0_fitted"] and g["r0"] == pytest.approx(0.2)
    assert g["alpha"] == pytest.approx(0.9, abs=1e-9) and g["beta"] == pytest.approx(0.4, abs=1e-9)
    assert g["peak_d"] == pytest.approx(0.9 / 0.8)
    assert fits["bon/proxy"]["beta"] == pytest.approx(0.0, abs=1e-9)
    # one point with d > 0 cannot give alpha and beta: no fit rather than a degenerate one
    assert fit_best_of_n(t.iloc[:2]) == {}


STEPS = [0, 10, 20, 30, 40, 50]
D = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
PROXY = [0.0, 1.0, 1.8, 2.3, 2.45, 2.5]  # slopes per unit d: 2.0, 1.6, 1.0, 0.3, 0.1
GOLD = [0.0, 0.6, 0.9, 0.8, 0.5, 0.1]


def test_proxy_only_stop_rules_on_synthetic_rows():
    r = recommend_proxy_stop(STEPS, D, PROXY, min_slope_frac=0.25)
    # 0.3 < 0.25 * 2.0 = 0.5 on 30 -> 40: keep step 30
    assert r["rule"] == "proxy-slope" and r["step"] == 30 and r["d"] == 1.5 and r["uses_gold"] is False
    assert r["proxy_slope"]["initial_slope"] == pytest.approx(2.0)
    assert r["proxy_slope"]["stopped_at_step"] == 40 and r["proxy"] == 2.3
    assert recommend_proxy_stop(STEPS, D, PROXY, min_slope_frac=0.6)["step"] == 20  # 1.0 < 1.2 on 20 -> 30
    assert recommend_proxy_stop(STEPS, D, PROXY, min_slope_frac=0.01)["step"] == 50  # never falls that low
    r = recommend_proxy_stop(STEPS, D, d_budget=1.2)
    assert r["rule"] == "kl-budget" and r["step"] == 20 and "proxy" not in r
    both = recommend_proxy_stop(STEPS, D, PROXY, d_budget=2.2, min_slope_frac=0.25)
    assert both["rule"] == "kl-budget+proxy-slope" and both["step"] == 30  # the earlier of 40 and 30
    assert both["kl_budget"]["step"] == 40 and both["proxy_slope"]["step"] == 30
    # a checkpoint no farther than the last kept one is skipped, not a zero-length interval
    r = recommend_proxy_stop([0, 1, 2, 3], [0.0, 1.0, 0.9, 2.0], [0.0, 1.0, 0.5, 1.9], min_slope_frac=0.5)
    assert r["step"] == 3
    # a proxy that does not rise on the first interval: keep the initial model
    assert recommend_proxy_stop([0, 1, 2], [0, 1, 2], [1.0, 0.5, 0.7], min_slope_frac=0.5)["step"] == 0
    # the gold rule on the same rows picks its peak (step 20); the proxy-only rule never saw GOLD
    assert recommend_early_stop(STEPS, gold=GOLD)["step"] == 20


def test_proxy_only_stop_errors():
    with pytest.raises(ValueError, match="d_budget and/or min_slope_frac"):
        recommend_proxy_stop(STEPS, D, PROXY)
    with pytest.raises(ValueError, match="needs finite proxy"):
        recommend_proxy_stop(STEPS, D, None, min_slope_frac=0.5)
    with pytest.raises(ValueError, match="d must be finite"):
        recommend_proxy_stop(STEPS, [0.0] + [float("nan")] * 5, PROXY, d_budget=1.0)
    with pytest.raises(ValueError, match=r"min_slope_frac must be in \(0, 1\]"):
        recommend_proxy_stop(STEPS, D, PROXY, min_slope_frac=1.5)
    with pytest.raises(ValueError, match="no checkpoint has d <= d_budget"):
        recommend_proxy_stop(STEPS, [0.1] + D[1:], d_budget=0.05)
