"""``lrm human-eval prepare | serve | results``: a human pairwise study of generator checkpoints.

    lrm human-eval prepare runs/he --from runs/overopt/study       # every checkpoint's saved samples
    lrm human-eval serve runs/he                                   # http://127.0.0.1:8765/ for the raters
    lrm human-eval results runs/he --into-report runs/overopt/study  # results/ + the win rate in the report
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def _prepare(ns: argparse.Namespace) -> None:
    from eval.human_eval.study import StudyError, prepare_study, read_manifest, rows_from_run

    if not ns.sources and not ns.manifest:
        raise StudyError("nothing to prepare: pass --from RUN_DIR (outputs of `lrm eval` / `lrm overopt` with "
                         "per-sample files) or --manifest FILE (prompt, checkpoint, seed, path)")
    rows, sources = [], []
    for spec in [s for group in ns.sources or [] for s in group]:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        rows += rows_from_run(path, name or None)
        sources.append(str(Path(path).resolve()))
    for m in ns.manifest or []:
        rows += read_manifest(m)
        sources.append(str(Path(m).resolve()))
    study = prepare_study(ns.out_dir, rows, quota=ns.quota, repeat_fraction=ns.repeat_fraction,
                          repeat_gap=ns.repeat_gap, seed=ns.seed, initial=ns.initial, title=ns.title, sources=sources)
    print(f"prepared {study.root / 'study.json'}: {len(study.checkpoints)} checkpoints {study.checkpoints} "
          f"({len(study.pairs)} pairs), {len(study.prompts)} prompts x {len(study.seeds)} seeds, "
          f"{len(study.samples)} {study.modality} samples (sha256 recorded), {study.quota} comparisons per rater, "
          f"initial checkpoint {study.initial!r}")
    print(f"next: lrm human-eval serve {ns.out_dir}")


def _serve(ns: argparse.Namespace) -> None:
    from eval.human_eval.server import serve

    serve(ns.study_dir, host=ns.host, port=ns.port)


def _report_title(report: Path) -> str | None:
    if not report.exists():
        return None
    m = re.search(r"<title>(.*?)</title>", report.read_text(errors="replace"), re.S)
    if not m:
        return None
    import html

    return html.unescape(m.group(1))


def _results(ns: argparse.Namespace) -> None:
    import pandas as pd

    from eval.human_eval.analysis import write_results
    from eval.human_eval.study import StudyError

    paths = write_results(ns.study_dir, ns.out, n_bootstrap=ns.n_bootstrap, prior=ns.prior, seed=ns.seed)
    bt = pd.read_csv(paths["bt_scores"]).sort_values("rank")
    print(bt[["rank", "checkpoint", "score", "ci_low", "ci_high", "n", "both_bad"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {paths['html']} (+ results.json, win_rates.csv, bt_scores.csv, consistency.csv, "
          "human_win_rate.csv, votes.csv)")
    if ns.into_report:
        target = Path(ns.into_report)
        if not (target / "study.csv").exists() and (target / "study" / "study.csv").exists():
            target = target / "study"
        if not (target / "study.csv").exists():
            raise StudyError(f"--into-report {ns.into_report}: no study.csv there (or in its study/); pass an "
                             "`lrm overopt` run or its study directory")
        hw = pd.read_csv(paths["human_win_rate"])
        steps = set(pd.read_csv(target / "study.csv")["step"].astype(int))
        if not set(hw["step"].dropna().astype(int)) & steps:
            raise StudyError(f"no checkpoint of this human study matches a step of {target / 'study.csv'} "
                             f"(human study checkpoints {list(hw['checkpoint'])}; study steps {sorted(steps)}); "
                             "prepare the human study from that run's checkpoints (names step_XXXXXX)")
        hw.to_csv(target / "human_win_rate.csv", index=False)
        from eval.report import write_report

        report = write_report(target, title=_report_title(target / "report.html"))
        print(f"wrote {target / 'human_win_rate.csv'} and {report}")


def register(sub: argparse._SubParsersAction) -> None:
    from lrm.cli import add_command

    help_ = ("human pairwise evaluation of generator checkpoints: prepare a study from saved samples, serve the "
             "voting page, analyse the votes (win rates, Bradley-Terry)")
    p = sub.add_parser("human-eval", help=help_, description=help_ + ". See eval/human_eval/.")
    hs = p.add_subparsers(dest="human_eval_command", metavar="SUBCOMMAND")

    def prepare_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("out_dir", help="study directory to create (study.json; the votes go next to it)")
        a.add_argument("--from", dest="sources", nargs="+", action="append", metavar="[NAME=]DIR",
                       help="`lrm eval` output (one checkpoint, named after the folder or NAME), study or `lrm "
                            "overopt` run (every checkpoints/step_XXXXXX); samples saved with save_samples")
        a.add_argument("--manifest", action="append", metavar="FILE",
                       help="CSV / JSONL of samples made elsewhere: columns prompt, checkpoint, seed, path (relative "
                            "to the manifest)")
        a.add_argument("--quota", type=int, default=60, help="comparisons per rater, swap repeats included")
        a.add_argument("--repeat-fraction", type=float, default=0.05,
                       help="share of pairs shown again with the sides swapped (rater consistency)")
        a.add_argument("--repeat-gap", type=int, default=3, help="repeat a pair only after this many later votes")
        a.add_argument("--initial", default=None,
                       help="checkpoint the human win rate is measured against (default: step_000000, else the "
                            "first)")
        a.add_argument("--seed", type=int, default=0, help="seed of the pair scheduler")
        a.add_argument("--title", default="Which sample is better?", help="heading of the voting page")

    def serve_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("study_dir", help="a prepared study directory")
        a.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network, "
                            "with no login: a warning is printed)")
        a.add_argument("--port", type=int, default=8765, help="TCP port")

    def results_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("study_dir", help="a study directory with votes")
        a.add_argument("--out", default=None, help="output directory (default STUDY/results)")
        a.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples of prompts for the 95%% "
                                                                     "intervals")
        a.add_argument("--prior", type=float, default=1.0,
                       help="Bradley-Terry: virtual ties per checkpoint against a score-0 player (keeps scores finite)")
        a.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        a.add_argument("--into-report", default=None, metavar="STUDY_DIR",
                       help="an `lrm overopt` run or its study/: write human_win_rate.csv there and rewrite its "
                            "report.html (human win rate vs d beside gold and proxy)")

    add_command(hs, "prepare", _prepare, help="check the samples (same prompts and seeds for every checkpoint, "
                                              "sha256 of every file) and write STUDY/study.json", args=prepare_args)
    add_command(hs, "serve", _serve, help="serve the voting page (127.0.0.1 by default); votes go to "
                                          "STUDY/votes.sqlite", args=serve_args)
    add_command(hs, "results", _results, help="win rates, Bradley-Terry scores, both-bad counts, rater consistency: "
                                              "STUDY/results/ (results.html, results.json, CSVs)", args=results_args)
