"""Held-out metrics of an LRM, the ridge baseline it is always reported beside, and the calibration plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import stats


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def pairwise_accuracy(pred, target, max_pairs: int = 200_000, seed: int = 0) -> float:
    """Fraction of pairs (i, j) with target_i != target_j whose order the prediction gets right (ties = 0.5).

    Exact over all pairs when n(n-1)/2 <= max_pairs, else over ``max_pairs`` random pairs.
    """
    p, y = _np(pred), _np(target)
    n = len(y)
    if n < 2:
        return float("nan")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, n, max_pairs), rng.integers(0, n, max_pairs)
    dy, dp = y[i] - y[j], p[i] - p[j]
    keep = dy != 0
    if not keep.any():
        return float("nan")
    agree = np.sign(dy[keep]) * np.sign(dp[keep])
    return float(np.mean(np.where(agree > 0, 1.0, np.where(agree == 0, 0.5, 0.0))))


def regression_metrics(pred, target) -> dict[str, float]:
    """MSE, R^2, Pearson, Spearman, Kendall tau and pairwise ranking accuracy (in the units given)."""
    p, y = _np(pred), _np(target)
    if p.shape != y.shape:
        raise ValueError(f"pred and target must have the same length, got {p.shape} and {y.shape}")
    ok = np.isfinite(y) & np.isfinite(p)
    p, y = p[ok], y[ok]
    if len(y) < 3:
        raise ValueError(f"need at least 3 finite (pred, target) pairs for metrics, got {len(y)}")
    mse = float(np.mean((p - y) ** 2))
    var = float(np.var(y))
    const = np.std(p) == 0 or np.std(y) == 0
    return {
        "n": int(len(y)),
        "mse": mse,
        "r2": float(1 - mse / var) if var > 0 else float("nan"),
        "pearson": float("nan") if const else float(stats.pearsonr(p, y)[0]),
        "spearman": float("nan") if const else float(stats.spearmanr(p, y)[0]),
        "kendall_tau": float("nan") if const else float(stats.kendalltau(p, y)[0]),
        "pairwise_accuracy": pairwise_accuracy(p, y),
    }


def spearman(pred, target) -> float:
    p, y = _np(pred), _np(target)
    if len(y) < 3 or np.std(p) == 0 or np.std(y) == 0:
        return float("nan")
    return float(stats.spearmanr(p, y)[0])


def pooled_features(latents: torch.Tensor, text_pooled: torch.Tensor | None = None) -> np.ndarray:
    """Ridge-baseline features: per-channel mean and std of the latents (over frames and space for videos),
    per-frame channel means for videos (keeps temporal order), plus the pooled text embedding when given."""
    x = latents.float()
    feats = [x.mean(dim=tuple(range(2, x.dim())) if x.dim() == 4 else (1, 3, 4)),
             x.std(dim=(2, 3)) if x.dim() == 4 else x.std(dim=(1, 3, 4))]
    if x.dim() == 5:
        feats.append(x.mean(dim=(3, 4)).flatten(1))  # (B, T*C)
    if text_pooled is not None:
        feats.append(text_pooled.float())
    return torch.cat(feats, 1).cpu().numpy().astype(np.float64)


def ridge_baseline(train_latents: torch.Tensor, train_y: torch.Tensor, val_latents: torch.Tensor,
                   train_text: torch.Tensor | None = None, val_text: torch.Tensor | None = None,
                   alphas=(0.01, 0.1, 1.0, 10.0, 100.0)) -> tuple[np.ndarray, dict]:
    """scikit-learn ridge regression (alpha by built-in leave-one-out CV) on pooled latents (+ pooled text).

    Returns (validation predictions, info) in the target's units.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr = pooled_features(train_latents, train_text)
    xva = pooled_features(val_latents, val_text)
    ytr = _np(train_y)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    model.fit(xtr, ytr)
    return model.predict(xva), {"features": int(xtr.shape[1]), "alpha": float(model[-1].alpha_),
                                "uses_text": train_text is not None}


def calibration_figure(pred, target, title: str = "LRM calibration", units: str = "reward", baseline=None,
                       baseline_metrics: dict | None = None):
    """Scatter of predicted vs true reward with the y = x line (a matplotlib Figure).

    ``baseline``: the ridge baseline's predictions on the same rows (drawn in grey). ``baseline_metrics``: its
    metrics when only those are known (e.g. copied from a checkpoint): named in the legend, no points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, y = _np(pred), _np(target)
    m = regression_metrics(p, y)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    if baseline is not None:
        b = _np(baseline)
        mb = regression_metrics(b, y)
        ax.scatter(y, b, s=6, alpha=0.35, color="tab:gray",
                   label=f"ridge baseline (Spearman {mb['spearman']:.3f}, R² {mb['r2']:.3f})")
    elif baseline_metrics is not None:
        ax.plot([], [], " ", label=f"ridge baseline, training run's split (Spearman "
                                   f"{baseline_metrics['spearman']:.3f}, R² {baseline_metrics['r2']:.3f})")
    ax.scatter(y, p, s=6, alpha=0.5, color="tab:blue",
               label=f"LRM (Spearman {m['spearman']:.3f}, R² {m['r2']:.3f})")
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel(f"true {units}")
    ax.set_ylabel(f"predicted {units}")
    ax.set_title(f"{title} (n = {m['n']})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def calibration_plot(pred, target, path: str | Path, title: str = "LRM calibration", units: str = "reward",
                     baseline=None, baseline_metrics: dict | None = None) -> Path:
    """``calibration_figure`` saved as PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = calibration_figure(pred, target, title, units, baseline, baseline_metrics)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
