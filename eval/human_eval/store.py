"""Votes of a human pairwise study in SQLite (``OUT/votes.sqlite``), and the pair scheduler.

Two tables. ``served``: one row per pair shown, keyed by a random server-side token (rater, prompt id, seed, left
and right checkpoints, whether the sides are swapped against study order, the vote it repeats, when it was served,
the page version, pending / voted). ``votes``: one row per answer (the served row's fields plus the choice, the
answer time and the time the rater looked at the pair in the browser), ``UNIQUE(token)``.

Every read-modify-write runs in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock), so raters voting at the
same moment from the server's threads neither lose nor duplicate a vote; WAL with ``synchronous=FULL`` keeps every
committed vote across a crash or restart. A vote is refused (``VoteError``, with the HTTP status the server
answers) for a token that was never served, a token voted already, a token served to another rater, a page of
another version, or a malformed choice; nothing is stored then.

Scheduling (``next_pair``), for one rater:
  1. quota reached -> nothing (the page thanks the rater);
  2. a pending pair of this rater -> the same pair again (a reload shows what was on screen, no new token);
  3. with probability ``repeat_fraction``: one of the rater's earlier pairs, voted at least ``repeat_gap`` votes
     ago and not repeated yet, with the sides swapped (rater consistency);
  4. else the checkpoint pair with the fewest votes (plus pairs being shown right now), ties at random; a prompt
     uniformly at random among those the rater has not seen with this pair (any prompt once all are seen), a seed
     uniformly among that prompt's unseen seeds; left / right flipped by a fair coin, kept server-side only.
The random draws of a call come from a generator seeded by (study seed, rater, pairs served to the rater so far):
whether a rater gets a repeat at their k-th pair is reproducible, however the other raters' votes interleave.
"""

from __future__ import annotations

import math
import random
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from eval.human_eval.study import VOTES_DB, Study, StudyError

CHOICES = ("left", "right", "tie", "both_bad")
RATER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
PENDING_WINDOW_S = 600.0  # a pair shown but not answered counts toward its pair's load for this long

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS served (
    token TEXT PRIMARY KEY,
    rater TEXT NOT NULL,
    prompt_id INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    left_ckpt TEXT NOT NULL,
    right_ckpt TEXT NOT NULL,
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    repeat_of INTEGER,
    served_at REAL NOT NULL,
    page_version TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'voted'))
);
CREATE INDEX IF NOT EXISTS served_rater ON served (rater, status);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE REFERENCES served (token),
    rater TEXT NOT NULL,
    prompt_id INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    left_ckpt TEXT NOT NULL,
    right_ckpt TEXT NOT NULL,
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    repeat_of INTEGER REFERENCES votes (id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
    shown_at REAL NOT NULL,
    answered_at REAL NOT NULL,
    client_ms REAL,
    page_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_rater ON votes (rater);
"""


class VoteError(Exception):
    """A request the study refuses; ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


def check_rater(rater: Any) -> str:
    if not isinstance(rater, str) or not RATER_RE.match(rater):
        raise VoteError(400, f"rater id {rater!r} must be 1-64 letters, digits or _.@+- (starting with a letter or "
                             "digit), e.g. your initials")
    return rater


class VoteStore:
    """The study's SQLite file; safe to use from many threads (one connection per thread)."""

    def __init__(self, study: Study, path: str | Path | None = None, seed: int | None = None):
        self.study = study
        self.path = Path(path) if path is not None else study.root / VOTES_DB
        self.seed = int(study.seed if seed is None else seed)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        with self._write() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'study_id'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta (key, value) VALUES ('study_id', ?)", (study.study_id,))
            elif row[0] != study.study_id:
                raise StudyError(f"{self.path} holds the votes of another study (id {row[0]}, this study is "
                                 f"{study.study_id}); keep each study's votes in its own directory")

    # ---- connections -----------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE`` takes SQLite's write lock before anything is read."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                try:
                    c.close()
                except sqlite3.ProgrammingError:  # made in another thread that has gone: closed with it
                    pass
            self._all.clear()
        self._local = threading.local()

    @staticmethod
    def count_votes_in(path: str | Path) -> int:
        try:
            with sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True) as c:
                return int(c.execute("SELECT COUNT(*) FROM votes").fetchone()[0])
        except sqlite3.Error:
            return 0

    # ---- reads -------------------------------------------------------------------------------------------------
    def progress(self, rater: str) -> dict[str, int]:
        n = self._conn().execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]
        return {"done": int(n), "quota": self.study.quota}

    def served(self, token: str) -> sqlite3.Row | None:
        return self._conn().execute("SELECT * FROM served WHERE token = ?", (token,)).fetchone()

    def n_votes(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM votes").fetchone()[0])

    def votes_frame(self):
        """Every vote as a pandas DataFrame (the ``votes`` table, ordered by id)."""
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM votes ORDER BY id", self._conn())

    # ---- scheduling ----------------------------------------------------------------------------------------------
    def _pair(self, row: sqlite3.Row) -> dict[str, Any]:
        s = self.study
        return {"token": row["token"], "rater": row["rater"], "prompt_id": int(row["prompt_id"]),
                "prompt": s.prompts[int(row["prompt_id"])], "seed": int(row["seed"]),
                "left": s.sample(row["left_ckpt"], row["prompt_id"], row["seed"]),
                "right": s.sample(row["right_ckpt"], row["prompt_id"], row["seed"]),
                "swapped": bool(row["swapped"]), "repeat_of": row["repeat_of"], "served_at": float(row["served_at"]),
                "page_version": row["page_version"]}

    def next_pair(self, rater: str, page_version: str) -> dict[str, Any] | None:
        """The pair to show ``rater`` now (see the module doc), or None once their quota is done."""
        check_rater(rater)
        s = self.study
        with self._write() as c:
            done = c.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]
            if done >= s.quota:
                return None
            row = c.execute("SELECT * FROM served WHERE rater = ? AND status = 'pending' ORDER BY served_at DESC "
                            "LIMIT 1", (rater,)).fetchone()
            if row is not None and row["page_version"] == page_version:
                return self._pair(row)
            if row is not None:  # shown by an older page: it cannot be answered any more
                c.execute("DELETE FROM served WHERE token = ?", (row["token"],))
            now = time.time()
            n_served = c.execute("SELECT COUNT(*) FROM served WHERE rater = ?", (rater,)).fetchone()[0]
            rng = random.Random(f"{self.seed}:{rater}:{n_served}")  # a rater's coin flips, whoever else votes
            order = {name: i for i, name in enumerate(s.checkpoints)}
            fields: dict[str, Any] | None = None
            candidates = c.execute(
                "SELECT v.* FROM votes v WHERE v.rater = ? AND v.repeat_of IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM served r WHERE r.repeat_of = v.id) "
                "AND (SELECT COUNT(*) FROM votes w WHERE w.rater = v.rater AND w.id > v.id) >= ? ORDER BY v.id",
                (rater, s.repeat_gap)).fetchall()
            if candidates and s.repeat_fraction > 0 and rng.random() < s.repeat_fraction:
                v = rng.choice(candidates)  # the same pair, prompt and seed, sides swapped
                fields = {"prompt_id": v["prompt_id"], "seed": v["seed"], "left_ckpt": v["right_ckpt"],
                          "right_ckpt": v["left_ckpt"], "swapped": 1 - v["swapped"], "repeat_of": v["id"]}
            if fields is None:
                load = {p: 0 for p in s.pairs}
                busy = c.execute("SELECT left_ckpt, right_ckpt FROM votes WHERE repeat_of IS NULL UNION ALL "
                                 "SELECT left_ckpt, right_ckpt FROM served WHERE status = 'pending' AND repeat_of IS "
                                 "NULL AND served_at > ?", (now - PENDING_WINDOW_S,)).fetchall()
                for a, b in busy:
                    key = (a, b) if order[a] < order[b] else (b, a)
                    if key in load:
                        load[key] += 1
                least = min(load.values())
                a, b = rng.choice([p for p in s.pairs if load[p] == least])
                seen = {(r[0], r[1]) for r in c.execute(
                    "SELECT prompt_id, seed FROM served WHERE rater = ? AND ((left_ckpt = ? AND right_ckpt = ?) OR "
                    "(left_ckpt = ? AND right_ckpt = ?))", (rater, a, b, b, a))}
                fresh = {p: [sd for sd in s.seeds if (p, sd) not in seen] for p in range(len(s.prompts))}
                fresh = {p: sds for p, sds in fresh.items() if sds} or {p: list(s.seeds) for p in range(len(s.prompts))}
                prompt_id = rng.choice(sorted(fresh))
                seed = rng.choice(fresh[prompt_id])
                swapped = rng.random() < 0.5
                fields = {"prompt_id": prompt_id, "seed": seed, "left_ckpt": b if swapped else a,
                          "right_ckpt": a if swapped else b, "swapped": int(swapped), "repeat_of": None}
            token = secrets.token_urlsafe(18)
            c.execute("INSERT INTO served (token, rater, prompt_id, seed, left_ckpt, right_ckpt, swapped, repeat_of, "
                      "served_at, page_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (token, rater, fields["prompt_id"], fields["seed"], fields["left_ckpt"], fields["right_ckpt"],
                       fields["swapped"], fields["repeat_of"], now, page_version))
            return self._pair(c.execute("SELECT * FROM served WHERE token = ?", (token,)).fetchone())

    # ---- votes ---------------------------------------------------------------------------------------------------
    def vote(self, token: Any, rater: Any, choice: Any, page_version: Any, client_ms: Any = None) -> dict[str, int]:
        """Store one answer; ``VoteError`` (nothing stored) for anything but an answer to a pending pair served to
        this rater by a page of this version. Returns the rater's progress."""
        check_rater(rater)
        if not isinstance(token, str) or not token or len(token) > 100:
            raise VoteError(400, "token must be the string the server gave with the pair")
        if choice not in CHOICES:
            raise VoteError(400, f"choice {choice!r} is not one of {list(CHOICES)}")
        if not isinstance(page_version, str):
            raise VoteError(400, "page_version must be a string")
        if client_ms is not None:
            if isinstance(client_ms, bool) or not isinstance(client_ms, (int, float)) or not math.isfinite(client_ms) \
                    or not 0 <= client_ms < 1e9:
                raise VoteError(400, f"client_ms must be a number of milliseconds >= 0 or null, got {client_ms!r}")
        with self._write() as c:
            row = c.execute("SELECT * FROM served WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise VoteError(404, "this pair was not served by this study (unknown token); reload the page")
            if row["rater"] != rater:
                raise VoteError(403, f"this pair was served to rater {row['rater']!r}, not {rater!r}")
            if row["status"] == "voted":
                raise VoteError(409, "this pair has been voted on already (a token counts once); reload the page")
            if row["page_version"] != page_version:
                raise VoteError(409, f"the page is version {page_version!r}, the pair was served by version "
                                     f"{row['page_version']!r}; reload the page")
            c.execute("INSERT INTO votes (token, rater, prompt_id, prompt, seed, left_ckpt, right_ckpt, swapped, "
                      "repeat_of, choice, shown_at, answered_at, client_ms, page_version) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (token, rater, row["prompt_id"], self.study.prompts[row["prompt_id"]], row["seed"],
                       row["left_ckpt"], row["right_ckpt"], row["swapped"], row["repeat_of"], choice,
                       row["served_at"], time.time(), None if client_ms is None else float(client_ms),
                       row["page_version"]))
            c.execute("UPDATE served SET status = 'voted' WHERE token = ?", (token,))
            done = c.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]
        return {"done": int(done), "quota": self.study.quota}

