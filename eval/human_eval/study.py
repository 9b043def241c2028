"""A human pairwise study on disk: which samples, of which checkpoints, for which prompts and seeds.

``prepare_study(out_dir, rows)`` checks the samples and writes ``OUT/study.json``; ``Study.load(out_dir)`` reads
it back and ``Study.verify()`` re-hashes every file. The rows come from

- runs that saved one file per sample (``evaluate(..., save_samples=True)``: the ``sample_file`` column of
  ``samples.csv``): ``rows_from_run(dir)`` takes an evaluation directory (one checkpoint: the folder name), a
  study directory (``checkpoints/step_XXXXXX/``, one checkpoint each) or an ``lrm overopt`` run (``study/``);
- a manifest for samples made elsewhere (``read_manifest``): CSV or JSONL with ``prompt``, ``checkpoint``,
  ``seed``, ``path`` (relative paths are relative to the manifest).

Checks, each a ``StudyError`` naming the bad value and the fix: at least two checkpoints; every file exists and is
an image (PNG, JPEG, WebP, GIF; animated WebP/GIF count as videos) or a video (MP4, WebM); no (checkpoint, prompt,
seed) twice; the same prompts and the same seeds for every checkpoint; one modality (images or videos) throughout.
The sha256 of every file is recorded: a sample changed after ``prepare`` is refused at serve time.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from lrm.io import read_records

STUDY_FILE = "study.json"
VOTES_DB = "votes.sqlite"
STUDY_FORMAT = 1
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif"}
VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}
MEDIA_TYPES = {**IMAGE_TYPES, **VIDEO_TYPES}
MANIFEST_COLUMNS = ("prompt", "checkpoint", "seed", "path")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=@-]{0,99}$")


class StudyError(OSError):
    """A study whose files or inputs are wrong (missing, changed, mismatched). An ``OSError``, so ``lrm`` prints it
    as a one-line user error."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _few(items: list, n: int = 5) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(str(x) for x in items[:n]) + more


# ---- reading sources ----------------------------------------------------------------------------------------

def checkpoint_step(name: str) -> int | None:
    """The fine-tuning step of a checkpoint named like ``step_000010`` (``lrm overopt``'s folders), else None."""
    m = re.search(r"step[_-]?(\d+)$", name)
    return int(m.group(1)) if m else None


def find_checkpoint_dirs(path: str | Path) -> list[tuple[str, Path]]:
    """(name, directory) of every checkpoint below ``path``: an evaluation directory (``samples.csv``: itself), a
    study (``checkpoints/*/samples.csv``) or an ``lrm overopt`` run (``study/checkpoints/*/samples.csv``)."""
    p = Path(path)
    if not p.is_dir():
        raise StudyError(f"{p} is not a directory; pass an `lrm eval` output, a study or an `lrm overopt` run "
                         "directory (or --manifest FILE for samples made elsewhere)")
    if (p / "samples.csv").exists():
        return [(p.resolve().name, p)]
    for root in (p / "checkpoints", p / "study" / "checkpoints"):
        found = sorted((d.name, d) for d in root.glob("*") if (d / "samples.csv").exists()) if root.is_dir() else []
        if found:
            return found
    raise StudyError(f"no samples.csv in {p}, {p}/checkpoints/*/ or {p}/study/checkpoints/*/: pass the output "
                     "directory of `lrm eval` / `lrm overopt` (or --manifest FILE)")


def rows_from_run(path: str | Path, name: str | None = None) -> list[dict[str, Any]]:
    """Sample rows (checkpoint, prompt, prompt_id, seed, path) of the checkpoints below ``path``
    (``find_checkpoint_dirs``); ``name`` renames a single checkpoint."""
    import pandas as pd

    dirs = find_checkpoint_dirs(path)
    if name is not None and len(dirs) != 1:
        raise StudyError(f"NAME={path} names one checkpoint, but {path} holds {len(dirs)} "
                         f"({_few([d for d, _ in dirs])}); drop the NAME= to use the folder names")
    rows = []
    for ckpt, d in dirs:
        df = pd.read_csv(d / "samples.csv")
        missing = [c for c in ("prompt_id", "prompt", "seed") if c not in df.columns]
        if missing:
            raise StudyError(f"{d / 'samples.csv'} has no column(s) {missing}: not an `lrm eval` samples table")
        if "sample_file" not in df.columns or df["sample_file"].isna().any():
            raise StudyError(f"{d} has no per-sample files (samples.csv has no sample_file column): evaluate with "
                             "save_samples=True (eval.evaluate.evaluate / eval.study.run_study) or pass a manifest "
                             "of your own sample files with --manifest")
        for r in df.itertuples(index=False):
            rows.append({"checkpoint": name or ckpt, "prompt": str(r.prompt), "prompt_id": int(r.prompt_id),
                         "seed": int(r.seed), "path": str((d / str(r.sample_file)).resolve())})
    return rows


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV or JSONL manifest with columns ``prompt``, ``checkpoint``, ``seed``, ``path`` (optional
    ``prompt_id``); relative paths are taken relative to the manifest's folder."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"manifest {p} does not exist")
    if p.suffix.lower() not in (".csv", ".jsonl"):
        raise StudyError(f"manifest {p} must be .csv or .jsonl (columns {', '.join(MANIFEST_COLUMNS)})")
    try:
        raw = read_records(p)
    except ValueError as e:
        raise StudyError(str(e)) from None
    if not raw:
        raise StudyError(f"manifest {p} has no rows")
    rows = []
    for k, r in raw:
        missing = [c for c in MANIFEST_COLUMNS if r.get(c) in (None, "")]
        if missing:
            raise StudyError(f"{p} line {k}: missing {missing}; every row needs {', '.join(MANIFEST_COLUMNS)}")
        try:
            seed = int(str(r["seed"]).strip())
        except ValueError:
            raise StudyError(f"{p} line {k}: seed {r['seed']!r} is not an integer") from None
        fp = Path(str(r["path"]))
        rows.append({"checkpoint": str(r["checkpoint"]).strip(), "prompt": str(r["prompt"]), "seed": seed,
                     "path": str((fp if fp.is_absolute() else p.parent / fp).resolve()),
                     **({"prompt_id": int(r["prompt_id"])} if r.get("prompt_id") not in (None, "") else {})})
    return rows


# ---- media probing --------------------------------------------------------------------------------------------

def probe_media(path: str | Path) -> dict[str, Any]:
    """kind ('image' | 'animation' | 'video'), width, height, frames, fps of one sample file."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in IMAGE_TYPES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                n = int(getattr(im, "n_frames", 1))
                w, h = im.size
                dur = float(im.info.get("duration") or 0)
                im.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise StudyError(f"{p} is not a readable {ext[1:].upper()} image ({e})") from None
        if n > 1:
            return {"kind": "animation", "width": w, "height": h, "frames": n,
                    "fps": round(1000.0 / dur, 3) if dur > 0 else 8.0}
        return {"kind": "image", "width": w, "height": h, "frames": 1, "fps": None}
    if ext in VIDEO_TYPES:
        import cv2

        cap = cv2.VideoCapture(str(p))
        try:
            ok, _ = cap.read()
            if not ok:
                raise StudyError(f"{p} is not a readable {ext[1:].upper()} video")
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            n, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS) or 0)
        finally:
            cap.release()
        return {"kind": "video", "width": w, "height": h, "frames": max(n, 1), "fps": fps or None}
    raise StudyError(f"{p}: unsupported sample type {ext or '(no extension)'!r}; use one of "
                     f"{', '.join(sorted(MEDIA_TYPES))}")


def media_type(path: str | Path) -> str:
    return MEDIA_TYPES[Path(path).suffix.lower()]


# ---- the study ----------------------------------------------------------------------------------------------

@dataclass
class Sample:
    checkpoint: str
    prompt_id: int
    seed: int
    path: str
    sha256: str
    kind: str  # image | animation | video
    width: int
    height: int
    frames: int = 1
    fps: float | None = None


@dataclass
class Study:
    """A prepared study (``study.json``). ``prompts[i]`` is prompt id i; every checkpoint has a sample for every
    (prompt id, seed)."""

    root: Path
    study_id: str
    checkpoints: list[str]
    prompts: list[str]
    seeds: list[int]
    samples: list[Sample]
    quota: int = 60
    repeat_fraction: float = 0.05
    repeat_gap: int = 3
    seed: int = 0
    initial: str | None = None
    title: str = "Which sample is better?"
    sources: list[str] = field(default_factory=list)
    created: str = ""

    def __post_init__(self) -> None:
        self._index = {(s.checkpoint, s.prompt_id, s.seed): s for s in self.samples}

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every unordered checkpoint pair, in study order (a before b)."""
        c = self.checkpoints
        return [(c[i], c[j]) for i in range(len(c)) for j in range(i + 1, len(c))]

    @property
    def modality(self) -> str:
        return "image" if all(s.kind == "image" for s in self.samples) else "video"

    def sample(self, checkpoint: str, prompt_id: int, seed: int) -> Sample:
        try:
            return self._index[(checkpoint, int(prompt_id), int(seed))]
        except KeyError:
            raise StudyError(f"study {self.root} has no sample for checkpoint {checkpoint!r}, prompt {prompt_id}, "
                             f"seed {seed}") from None

    def check_file(self, s: Sample, data: bytes | None = None) -> None:
        """Raise ``StudyError`` unless ``s``'s file (or ``data``, its bytes already read) still has its sha256."""
        if data is None:
            if not Path(s.path).is_file():
                raise StudyError(f"sample file {s.path} ({s.checkpoint}, prompt {s.prompt_id}, seed {s.seed}) is "
                                 "missing; restore it or prepare a new study")
            digest = sha256_file(s.path)
        else:
            digest = hashlib.sha256(data).hexdigest()
        if digest != s.sha256:
            raise StudyError(f"sample file {s.path} ({s.checkpoint}, prompt {s.prompt_id}, seed {s.seed}) changed "
                             f"since `lrm human-eval prepare` (sha256 {digest[:12]}..., recorded {s.sha256[:12]}...); "
                             "votes on it would not be about the prepared sample: restore the file or prepare a new "
                             "study")

    def verify(self) -> None:
        """Re-hash every sample; one ``StudyError`` naming every missing or changed file."""
        bad = []
        for s in self.samples:
            try:
                self.check_file(s)
            except StudyError as e:
                bad.append(str(e).split(";")[0])
        if bad:
            raise StudyError(f"{len(bad)} of {len(self.samples)} sample files of {self.root} are missing or changed "
                             f"since prepare: {_few(bad, 3)}; restore them or prepare a new study")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("study_id", "checkpoints", "prompts", "seeds", "quota", "repeat_fraction",
                                           "repeat_gap", "seed", "initial", "title", "sources", "created")}
        return {"format": STUDY_FORMAT, **d, "samples": [asdict(s) for s in self.samples]}

    def save(self) -> Path:
        from lrm.io import atomic_write_bytes

        path = self.root / STUDY_FILE
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, root: str | Path) -> Study:
        root = Path(root)
        path = root / STUDY_FILE
        if not path.is_file():
            raise StudyError(f"{root} is not a prepared study (no {STUDY_FILE}); run `lrm human-eval prepare "
                             f"{root} --from RUN_DIR` first")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != STUDY_FORMAT:
                raise StudyError(f"{path} has format {d.get('format')!r}, this version reads {STUDY_FORMAT}")
            samples = [Sample(**s) for s in d.pop("samples")]
            d.pop("format")
            return cls(root=root, samples=samples, **d)
        except (ValueError, TypeError, KeyError) as e:
            raise StudyError(f"{path} is damaged ({e}); prepare the study again") from None


def prepare_study(out_dir: str | Path, rows: Iterable[dict[str, Any]], quota: int = 60,
                  repeat_fraction: float = 0.05, repeat_gap: int = 3, seed: int = 0, initial: str | None = None,
                  title: str = "Which sample is better?", sources: list[str] | None = None) -> Study:
    """Check ``rows`` (dicts with checkpoint, prompt, seed, path; optional prompt_id) and write ``OUT/study.json``.

    Args:
        quota: comparisons per rater (swap repeats included).
        repeat_fraction: probability that a rater's next pair repeats one of their earlier pairs with the sides
            swapped (rater consistency).
        repeat_gap: a pair is repeated only after this many later votes of the same rater.
        seed: seed of the pair scheduler.
        initial: the checkpoint human win rates are measured against (``human_win_rate_vs``); default: a
            checkpoint named step 0 (``step_000000``), else the first.
    """
    rows = list(rows)
    out = Path(out_dir)
    if quota < 1:
        raise StudyError(f"quota must be >= 1 comparisons per rater, got {quota}")
    if not 0 <= repeat_fraction < 1:
        raise StudyError(f"repeat_fraction must be in [0, 1), got {repeat_fraction}")
    if repeat_gap < 0:
        raise StudyError(f"repeat_gap must be >= 0, got {repeat_gap}")
    if (out / VOTES_DB).exists():
        from eval.human_eval.store import VoteStore

        n = VoteStore.count_votes_in(out / VOTES_DB)
        if n:
            raise StudyError(f"{out} already holds {n} votes ({VOTES_DB}); prepare the new study in another "
                             "directory (the votes belong to the samples they were cast on)")
    if not rows:
        raise StudyError("no samples given")
    checkpoints: list[str] = []
    for r in rows:
        if r["checkpoint"] not in checkpoints:
            checkpoints.append(r["checkpoint"])
    bad_names = [c for c in checkpoints if not NAME_RE.match(c)]
    if bad_names:
        raise StudyError(f"checkpoint names {bad_names} must be 1-100 letters, digits or _.+=@- (no spaces, no "
                         "leading symbol)")
    if len(checkpoints) < 2:
        raise StudyError(f"a pairwise study needs at least 2 checkpoints, got {checkpoints}; pass more runs")
    # 1. no duplicates; every file exists
    seen: dict[tuple, str] = {}
    for r in rows:
        key = (r["checkpoint"], r["prompt"], int(r["seed"]))
        if key in seen:
            raise StudyError(f"checkpoint {key[0]!r} has two samples for prompt {key[1][:60]!r}, seed {key[2]} "
                             f"({seen[key]} and {r['path']}); one sample per (checkpoint, prompt, seed)")
        seen[key] = r["path"]
    missing = [r["path"] for r in rows if not Path(r["path"]).is_file()]
    if missing:
        raise StudyError(f"{len(missing)} of {len(rows)} sample files do not exist: {_few(missing, 3)}; fix the "
                         "paths (a manifest's relative paths are relative to the manifest)")
    # 2. the same prompts and seeds for every checkpoint
    by_ckpt: dict[str, set] = {c: set() for c in checkpoints}
    for r in rows:
        by_ckpt[r["checkpoint"]].add((r["prompt"], int(r["seed"])))
    ref_name, ref = checkpoints[0], by_ckpt[checkpoints[0]]
    problems = []
    for c in checkpoints[1:]:
        lack = sorted(ref - by_ckpt[c])
        extra = sorted(by_ckpt[c] - ref)
        if lack or extra:
            desc = []
            if lack:
                desc.append(f"lacks {len(lack)} (prompt, seed) that {ref_name!r} has, e.g. "
                            f"({lack[0][0][:50]!r}, {lack[0][1]})")
            if extra:
                desc.append(f"has {len(extra)} that {ref_name!r} lacks, e.g. ({extra[0][0][:50]!r}, {extra[0][1]})")
            problems.append(f"{c!r} {' and '.join(desc)}")
    if problems:
        raise StudyError("every checkpoint must have samples for the same prompts and seeds: " + "; ".join(problems)
                         + "; evaluate every checkpoint on the same prompts with the same seeds")
    prompt_seeds = sorted({s for _, s in ref})
    per_prompt = {}
    for p, s in ref:
        per_prompt.setdefault(p, set()).add(s)
    uneven = [p for p, s in per_prompt.items() if s != set(prompt_seeds)]
    if uneven:
        raise StudyError(f"prompt {uneven[0][:60]!r} has seeds {sorted(per_prompt[uneven[0]])}, others "
                         f"{prompt_seeds}: every prompt needs the same seeds")
    # prompt ids: the runs' own ids when every row has one and they agree, else the order of first appearance
    ids: dict[str, int] = {}
    if all("prompt_id" in r for r in rows):
        for r in rows:
            if ids.setdefault(r["prompt"], int(r["prompt_id"])) != int(r["prompt_id"]):
                ids = {}
                break
        if ids and len(set(ids.values())) != len(ids):
            ids = {}
    if not ids:
        for r in rows:
            ids.setdefault(r["prompt"], len(ids))
    order = sorted(ids, key=ids.get)
    remap = {p: i for i, p in enumerate(order)}  # dense ids 0..n-1 in the runs' order
    # 3. hash and probe
    samples = []
    for r in rows:
        info = probe_media(r["path"])
        samples.append(Sample(checkpoint=r["checkpoint"], prompt_id=remap[r["prompt"]], seed=int(r["seed"]),
                              path=str(Path(r["path"]).resolve()), sha256=sha256_file(r["path"]), **info))
    kinds = {s.kind == "image" for s in samples}
    if len(kinds) > 1:
        vid = next(s for s in samples if s.kind != "image")
        img = next(s for s in samples if s.kind == "image")
        raise StudyError(f"a study compares images or videos, not both: {vid.path} is a {vid.kind}, {img.path} an "
                         "image")
    if initial is None:
        initial = next((c for c in checkpoints if checkpoint_step(c) == 0), checkpoints[0])
    elif initial not in checkpoints:
        raise StudyError(f"initial checkpoint {initial!r} is not one of the study's checkpoints {checkpoints}")
    out.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):  # no votes (checked above): an older study's pending pairs go with it
        (out / (VOTES_DB + suffix)).unlink(missing_ok=True)
    study = Study(root=out, study_id=uuid.uuid4().hex, checkpoints=checkpoints, prompts=order, seeds=prompt_seeds,
                  samples=sorted(samples, key=lambda s: (checkpoints.index(s.checkpoint), s.prompt_id, s.seed)),
                  quota=int(quota), repeat_fraction=float(repeat_fraction), repeat_gap=int(repeat_gap),
                  seed=int(seed), initial=initial, title=title, sources=list(sources or []),
                  created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    study.save()
    return study
