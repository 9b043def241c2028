"""Human pairwise evaluation of generator checkpoints (``lrm human-eval``).

    prepare_study, read_manifest, rows_from_run, Study, StudyError   (eval.human_eval.study)
    VoteStore, VoteError, CHOICES                                    (eval.human_eval.store)
    HumanEvalServer, serve                                           (eval.human_eval.server)
    analyze, bradley_terry, human_win_rate_vs, write_results         (eval.human_eval.analysis)

A study directory holds ``study.json`` (checkpoints, prompts, seeds, every sample's path and sha256),
``votes.sqlite`` (every served pair and vote) and, after ``results``, ``results/``.
"""

from eval.human_eval.analysis import analyze, bradley_terry, human_win_rate_vs, load_votes, write_results
from eval.human_eval.store import CHOICES, VoteError, VoteStore
from eval.human_eval.study import Study, StudyError, prepare_study, read_manifest, rows_from_run

__all__ = [
    "Study", "StudyError", "prepare_study", "read_manifest", "rows_from_run",
    "VoteStore", "VoteError", "CHOICES",
    "analyze", "bradley_terry", "human_win_rate_vs", "load_votes", "write_results",
]
