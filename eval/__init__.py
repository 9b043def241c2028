"""Evaluation of generators: rewards (gold and proxy), attribute accuracy, diversity, speed, distance from
the reference model, reward-overoptimization curve fits, studies over checkpoints, and HTML reports.

Public API:
    vendi_score, keyframe_diversity, prompt_diversity      (eval.vendi)
    gaussian_chain_kl, smoothed_output_kl, kl_to_distance   (eval.kl)
    fit_overoptimization, best_of_n_estimate, bon_distance  (eval.overopt)
    best_of_n_by_prompt, fit_best_of_n, recommend_early_stop, recommend_proxy_stop  (eval.overopt)
    evaluate, EvalResult                                    (eval.evaluate)
    run_study                                               (eval.study)
    write_report                                            (eval.report)
    OveroptConfig, run_overopt (`lrm overopt`)               (eval.overopt_run)
"""

from eval.kl import gaussian_chain_kl, kl_to_distance, paired_output_kl, smoothed_output_kl
from eval.overopt import (
    CurveFit,
    best_of_n_by_prompt,
    best_of_n_curve,
    best_of_n_estimate,
    bon_distance,
    bon_kl,
    fit_best_of_n,
    fit_overoptimization,
    recommend_early_stop,
    recommend_proxy_stop,
)
from eval.vendi import keyframe_diversity, prompt_diversity, vendi_from_kernel, vendi_score

__all__ = [
    "vendi_score", "vendi_from_kernel", "keyframe_diversity", "prompt_diversity",
    "gaussian_chain_kl", "smoothed_output_kl", "paired_output_kl", "kl_to_distance",
    "CurveFit", "fit_overoptimization", "best_of_n_estimate", "best_of_n_curve", "bon_distance", "bon_kl",
    "best_of_n_by_prompt", "fit_best_of_n", "recommend_early_stop", "recommend_proxy_stop",
]
