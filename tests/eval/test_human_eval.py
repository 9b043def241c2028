"""lrm human-eval without a browser: per-sample files of evaluate, prepare (runs, manifests, bad input), the vote
store and scheduler, the HTTP API (malformed requests, concurrency, restart, tampering) and the analyses (win rates,
Bradley-Terry, bootstrap over prompts, consistency) against values computed by hand."""

import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import urllib.error
import urllib.request
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageSequence

from eval.evaluate import evaluate
from eval.human_eval import (
    Study,
    StudyError,
    VoteError,
    VoteStore,
    analyze,
    bradley_terry,
    human_win_rate_vs,
    load_votes,
    prepare_study,
    read_manifest,
    rows_from_run,
    write_results,
)
from eval.human_eval.server import PAGE_VERSION, HumanEvalServer
from lrm.cli import main

PROMPTS = ["a red circle", "two blue squares", "a green triangle at the top"]


# ---- helpers ------------------------------------------------------------------------------------------------------

def write_png(path, value, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def make_rows(root, checkpoints=("ckA", "ckB", "ckC"), prompts=PROMPTS, seeds=(0, 1)):
    """One distinct PNG per (checkpoint, prompt, seed)."""
    rows = []
    for c, ck in enumerate(checkpoints):
        for p, prompt in enumerate(prompts):
            for s in seeds:
                f = write_png(root / "src" / ck / f"p{p}_s{s}.png", (60 * c + 10 * p + s) % 251)
                rows.append({"checkpoint": ck, "prompt": prompt, "seed": s, "path": str(f)})
    return rows


def make_study(tmp_path, **kw):
    return prepare_study(tmp_path / "study", make_rows(tmp_path), **kw)


class Client:
    def __init__(self, url):
        self.url = url

    def request(self, path, body=None, method=None, headers=None, raw=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json"} if data is not None else {}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers

    def post(self, path, body=None, **kw):
        status, data, _ = self.request(path, body, method="POST", **kw)
        return status, json.loads(data)

    def next(self, rater):
        status, j = self.post("api/next", {"rater": rater, "page_version": PAGE_VERSION})
        assert status == 200, j
        return j

    def vote(self, token, rater, choice, **extra):
        return self.post("api/vote", {"token": token, "rater": rater, "choice": choice, "page_version": PAGE_VERSION,
                                      **extra})


@pytest.fixture
def served(tmp_path):
    make_study(tmp_path, quota=6, repeat_fraction=0.0)
    srv = HumanEvalServer(tmp_path / "study", port=0).start()
    yield srv, Client(srv.url)
    srv.close()


def db_votes(study_dir):
    with sqlite3.connect(study_dir / "votes.sqlite") as c:
        return c.execute("SELECT token, rater, choice FROM votes ORDER BY id").fetchall()


# ---- evaluate(save_samples=True) ------------------------------------------------------------------------------------

def test_evaluate_saves_one_lossless_file_per_sample(tmp_path):
    decode = lambda z: torch.sigmoid(z[:, :3])  # noqa: E731
    gen = lambda noise, tok, mask: noise  # noqa: E731
    res = evaluate(gen, PROMPTS[:2], n_per_prompt=2, seeds=[5, 9], decode=decode, latent_shape=(4, 8, 8),
                   n_bootstrap=0, progress=False, save_samples=True)
    paths = res.save(tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / "samples.csv")
    assert sorted(table["sample_file"]) == ["samples/p0000_s5.webp", "samples/p0000_s9.webp",
                                            "samples/p0001_s5.webp", "samples/p0001_s9.webp"]
    assert paths["sample_files"] == tmp_path / "run" / "samples"
    from eval.evaluate import noise_seed, sample_noise
    from shapes.grid import to_uint8

    for r in table.itertuples():  # the file holds exactly the decoded pixels (lossless)
        want = to_uint8(decode(sample_noise((4, 8, 8), noise_seed(r.seed, r.prompt_id))[None])[0])
        got = np.asarray(Image.open(tmp_path / "run" / r.sample_file).convert("RGB"))
        np.testing.assert_array_equal(got, want)
    # videos: an animated WebP with every frame
    vdecode = lambda z: torch.sigmoid(z[:, :, :3])  # noqa: E731
    v = evaluate(gen, PROMPTS[:1], n_per_prompt=1, seeds=[3], decode=vdecode, latent_shape=(5, 4, 8, 8),
                 n_bootstrap=0, progress=False, save_samples=True, keyframe_stride=1)
    v.save(tmp_path / "vrun")
    with Image.open(tmp_path / "vrun" / "samples" / "p0000_s3.webp") as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    want = to_uint8(vdecode(sample_noise((5, 4, 8, 8), noise_seed(3, 0))[None])[0])
    np.testing.assert_array_equal(np.stack(frames), want)
    # off by default; repeated seeds cannot name the files
    assert "sample_file" not in evaluate(gen, PROMPTS[:1], n_per_prompt=1, decode=decode, latent_shape=(4, 8, 8),
                                         n_bootstrap=0, progress=False).samples.columns
    with pytest.raises(ValueError, match="repeat"):
        evaluate(gen, PROMPTS[:1], n_per_prompt=2, seeds=[1, 1], decode=decode, latent_shape=(4, 8, 8),
                 progress=False, save_samples=True)


# ---- prepare --------------------------------------------------------------------------------------------------------

def _eval_run(out, shift, prompts=PROMPTS[:2], seeds=(0, 1)):
    gen = lambda noise, tok, mask: noise + shift  # noqa: E731
    res = evaluate(gen, prompts, n_per_prompt=len(seeds), seeds=list(seeds), decode=lambda z: torch.sigmoid(z[:, :3]),
                   latent_shape=(4, 8, 8), n_bootstrap=0, progress=False, save_samples=True)
    res.save(out)
    return out


def test_prepare_from_eval_runs_and_overopt_layout(tmp_path, capsys):
    a, b = _eval_run(tmp_path / "runA", 0.0), _eval_run(tmp_path / "runB", 1.0)
    assert main(["human-eval", "prepare", str(tmp_path / "he"), "--from", f"base={a}", f"{b}", "--quota", "7"]) == 0
    assert "2 checkpoints" in capsys.readouterr().out
    st = Study.load(tmp_path / "he")
    assert st.checkpoints == ["base", "runB"] and st.prompts == PROMPTS[:2] and st.seeds == [0, 1]
    assert st.quota == 7 and st.initial == "base" and len(st.samples) == 8
    for s in st.samples:  # sha256 of every file, its size and kind
        assert s.sha256 == hashlib.sha256(open(s.path, "rb").read()).hexdigest()
        assert (s.kind, s.width, s.height) == ("image", 8, 8)
    st.verify()
    # an overopt-style study: checkpoints/step_XXXXXX, step 0 is the initial checkpoint
    for step, shift in ((10, 0.5), (0, 0.0)):
        _eval_run(tmp_path / "ov" / "study" / "checkpoints" / f"step_{step:06d}", shift)
    rows = rows_from_run(tmp_path / "ov")
    st2 = prepare_study(tmp_path / "he2", rows)
    assert st2.checkpoints == ["step_000000", "step_000010"] and st2.initial == "step_000000"


def test_prepare_from_manifests(tmp_path):
    rows = make_rows(tmp_path, checkpoints=("m1", "m2"))
    man = pd.DataFrame(rows)
    man["path"] = [os.path.relpath(p, tmp_path) for p in man["path"]]  # relative to the manifest
    man.to_csv(tmp_path / "manifest.csv", index=False)
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for r in man.to_dict(orient="records"):
            f.write(json.dumps(r) + "\n")
    for name in ("manifest.csv", "manifest.jsonl"):
        got = read_manifest(tmp_path / name)
        assert [(r["checkpoint"], r["prompt"], r["seed"], r["path"]) for r in got] == \
            [(r["checkpoint"], r["prompt"], r["seed"], r["path"]) for r in rows]
    assert main(["human-eval", "prepare", str(tmp_path / "he"), "--manifest", str(tmp_path / "manifest.csv"),
                 "--initial", "m2"]) == 0
    st = Study.load(tmp_path / "he")
    assert st.checkpoints == ["m1", "m2"] and st.initial == "m2" and len(st.samples) == 12


def test_prepare_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    rows = make_rows(tmp_path)
    out = tmp_path / "he"

    def refused(rs, match, **kw):
        with pytest.raises(StudyError, match=match):
            prepare_study(out, rs, **kw)
        assert not (out / "study.json").exists()

    # missing files
    gone = [dict(r) for r in rows]
    gone[4]["path"] = str(tmp_path / "nowhere.png")
    refused(gone, r"1 of 18 sample files do not exist: .*nowhere\.png")
    # mismatched prompts / seeds between checkpoints
    refused([r for r in rows if not (r["checkpoint"] == "ckB" and r["prompt"] == PROMPTS[2])],
            r"same prompts and seeds: 'ckB' lacks 2 \(prompt, seed\) that 'ckA' has")
    other = [dict(r, seed=7) if r["checkpoint"] == "ckC" and r["seed"] == 1 else r for r in rows]
    refused(other, r"'ckC' lacks 3 .* and has 3 that 'ckA' lacks, e\.g\. \('a green triangle at the top', 7\)")
    refused([r for r in rows if r["checkpoint"] == "ckA"], "at least 2 checkpoints")
    refused(rows + rows[:1], "two samples for prompt")
    bad_type = [dict(r) for r in rows]
    (tmp_path / "x.txt").write_text("hello")
    bad_type[0]["path"] = str(tmp_path / "x.txt")
    refused(bad_type, "unsupported sample type '.txt'")
    broken = [dict(r) for r in rows]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken[0]["path"] = str(tmp_path / "broken.png")
    refused(broken, "not a readable PNG")
    refused([dict(r, checkpoint="a b") if r["checkpoint"] == "ckA" else r for r in rows], "checkpoint names")
    refused(rows, "initial checkpoint 'nope'", initial="nope")
    # manifests: missing columns, bad seeds, missing files through the CLI (one line, exit 2)
    pd.DataFrame([{"prompt": "p", "checkpoint": "a", "path": "x.png"}]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(StudyError, match=r"line 2: missing \['seed'\]"):
        read_manifest(tmp_path / "m.csv")
    pd.DataFrame([{"prompt": "p", "checkpoint": "a", "seed": "x1", "path": "x.png"}]).to_csv(tmp_path / "m.csv",
                                                                                             index=False)
    with pytest.raises(StudyError, match="seed 'x1' is not an integer"):
        read_manifest(tmp_path / "m.csv")
    pd.DataFrame([{"prompt": "p", "checkpoint": c, "seed": 0, "path": f"{c}.png"} for c in "ab"]).to_csv(
        tmp_path / "m.csv", index=False)
    capsys.readouterr()
    assert main(["human-eval", "prepare", str(out), "--manifest", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert "lrm human-eval: error: 2 of 2 sample files do not exist" in err and len(err.strip().splitlines()) == 1
    assert not (out / "study.json").exists()
    # an eval run without per-sample files
    res = evaluate(lambda n, t, m: n, PROMPTS[:1], n_per_prompt=1, decode=lambda z: torch.sigmoid(z[:, :3]),
                   latent_shape=(4, 8, 8), n_bootstrap=0, progress=False)
    res.save(tmp_path / "plain")
    with pytest.raises(StudyError, match="no per-sample files.*save_samples=True"):
        rows_from_run(tmp_path / "plain")
    with pytest.raises(StudyError, match="no samples.csv"):
        rows_from_run(tmp_path / "src")


def test_prepare_keeps_votes_of_an_existing_study(tmp_path):
    st = make_study(tmp_path)
    store = VoteStore(st)
    pair = store.next_pair("r1", PAGE_VERSION)
    store.vote(pair["token"], "r1", "tie", PAGE_VERSION)
    store.close()
    with pytest.raises(StudyError, match="already holds 1 votes"):
        prepare_study(tmp_path / "study", make_rows(tmp_path))
    assert Study.load(tmp_path / "study").study_id == st.study_id


# ---- tampering ------------------------------------------------------------------------------------------------------

def test_tampered_sample_is_refused_at_serve_time(tmp_path, capsys):
    st = make_study(tmp_path)
    victim = st.sample("ckB", 1, 0)
    write_png(Path(victim.path), 255)
    with pytest.raises(StudyError, match=r"1 of 18 sample files .* changed since"):
        HumanEvalServer(tmp_path / "study", port=0)
    assert main(["human-eval", "serve", str(tmp_path / "study"), "--port", "0"]) == 2
    assert "changed since" in capsys.readouterr().err
    # changed while serving: the sample is not sent and votes on its pairs are refused
    write_png(Path(victim.path), 60 + 10 + 0)  # restored: the same bytes again
    srv = HumanEvalServer(tmp_path / "study", port=0).start()
    try:
        cl = Client(srv.url)
        hit = None
        for _ in range(40):
            j = cl.next("r1")
            shown = {srv.store.served(j["token"])[k] for k in ("left_ckpt", "right_ckpt")}
            pid = srv.store.served(j["token"])["prompt_id"]
            if "ckB" in shown and pid == 1 and srv.store.served(j["token"])["seed"] == 0:
                hit = j
                break
            assert cl.vote(j["token"], "r1", "tie")[0] == 200
        assert hit is not None
        side = "left" if srv.store.served(hit["token"])["left_ckpt"] == "ckB" else "right"
        status, body, _ = cl.request(hit[side]["url"])
        assert status == 200 and hashlib.sha256(body).hexdigest() == victim.sha256
        write_png(Path(victim.path), 254)
        status, body, _ = cl.request(hit[side]["url"])
        assert status == 409 and "changed since `lrm human-eval prepare`" in json.loads(body)["error"]
        n = srv.store.n_votes()
        status, j = cl.vote(hit["token"], "r1", "left")
        assert status == 409 and "changed since" in j["error"] and srv.store.n_votes() == n
    finally:
        srv.close()


# ---- the HTTP API ---------------------------------------------------------------------------------------------------

def test_page_and_pairs_hide_checkpoint_names(served):
    srv, cl = served
    status, page, headers = cl.request("")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    text = page.decode()
    assert "http://" not in text and "https://" not in text and "<script src" not in text  # offline, no CDN
    for key, choice in (("1", "left"), ("2", "right"), ("3", "tie"), ("4", "both_bad")):
        assert f"'{key}': '{choice}'" in text
    j = cl.next("r1")
    blob = json.dumps(j).replace(j["token"], "TOKEN")
    for ck in srv.study.checkpoints:
        assert ck not in blob
    assert "src" not in blob and "sha256" not in blob  # nor paths or hashes
    assert j["progress"] == {"done": 0, "quota": 6} and j["box"]["width"] == j["box"]["height"] == 448
    assert j["left"]["url"] == f"media/{j['token']}/left"
    # the sides the server keeps are the ones it sends
    row = srv.store.served(j["token"])
    for side in ("left", "right"):
        status, body, headers = cl.request(j[side]["url"])
        s = srv.study.sample(row[f"{side}_ckpt"], row["prompt_id"], row["seed"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert hashlib.sha256(body).hexdigest() == s.sha256
    assert row["swapped"] == int(srv.study.checkpoints.index(row["left_ckpt"]) >
                                 srv.study.checkpoints.index(row["right_ckpt"]))
    # a reload gets the same pending pair, not a new token
    assert cl.next("r1")["token"] == j["token"]


def test_malformed_vote_requests_are_refused_and_store_nothing(served):
    srv, cl = served
    a, b = cl.next("alice"), cl.next("bob")
    tok = a["token"]
    good = {"token": tok, "rater": "alice", "choice": "left", "page_version": PAGE_VERSION}
    cases = [
        (dict(raw=b"{not json"), 400, "not valid JSON"),
        (dict(raw=b"[1, 2]"), 400, "must be a JSON object"),
        (dict(raw=json.dumps(good).encode(), headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
        (dict(raw=b"x" * 5000), 413, "at most 4096"),
        (dict(body={**good, "extra": 1}), 400, r"unknown field\(s\) \['extra'\]"),
        (dict(body={k: v for k, v in good.items() if k != "choice"}), 400, r"a vote needs \['choice'\]"),
        (dict(body={**good, "choice": "LEFT"}), 400, "choice 'LEFT' is not one of"),
        (dict(body={**good, "choice": 1}), 400, "choice 1 is not one of"),
        (dict(body={**good, "rater": "al ice"}), 400, "rater id 'al ice'"),
        (dict(body={**good, "rater": "bob"}), 403, "served to rater 'alice', not 'bob'"),
        (dict(body={**good, "token": "never-served"}), 404, "not served by this study"),
        (dict(body={**good, "token": 5}), 400, "token must be the string"),
        (dict(body={**good, "page_version": "0"}), 409, "reload the page"),
        (dict(body={**good, "client_ms": -3}), 400, "client_ms"),
        (dict(body={**good, "client_ms": "fast"}), 400, "client_ms"),
        (dict(body={**good, "client_ms": True}), 400, "client_ms"),
    ]
    for kw, status, match in cases:
        got, body, _ = cl.request("api/vote", method="POST", **kw)
        msg = json.loads(body)["error"]
        assert got == status and re.search(match, msg), (kw, got, msg)
    assert cl.request("api/vote")[0] == 405 and cl.request("api/nope")[0] == 404
    assert cl.request("media/nope/left")[0] == 404 and cl.request("media/x/middle")[0] == 404
    assert cl.post("api/next", {"rater": "alice", "page_version": "0"})[0] == 409
    assert cl.post("api/next", {"rater": "", "page_version": PAGE_VERSION})[0] == 400
    assert db_votes(srv.study.root) == []  # nothing stored by any of them
    # the good vote counts once; the second time is refused
    assert cl.vote(tok, "alice", "left", client_ms=1234) == (200, {"ok": True, "progress": {"done": 1, "quota": 6}})
    status, j = cl.vote(tok, "alice", "right")
    assert status == 409 and "voted on already" in j["error"]
    assert db_votes(srv.study.root) == [(tok, "alice", "left")]
    assert cl.vote(b["token"], "bob", "both_bad")[0] == 200
    v = load_votes(srv.study.root)[1]
    assert list(v["rater"]) == ["alice", "bob"] and v["client_ms"].iloc[0] == 1234
    assert (v["answered_at"] >= v["shown_at"]).all() and (v["page_version"] == PAGE_VERSION).all()


def test_concurrent_raters_lose_and_duplicate_nothing(tmp_path):
    make_study(tmp_path, quota=8, repeat_fraction=0.2, repeat_gap=1)
    srv = HumanEvalServer(tmp_path / "study", port=0).start()
    cl = Client(srv.url)
    accepted, errors = [], []
    lock = threading.Lock()

    def rater(name):
        try:
            while True:
                j = cl.next(name)
                if j["done"]:
                    return
                results = []  # two tabs of one rater answer the same pair at the same moment: one vote counts

                def one(choice):
                    results.append(cl.vote(j["token"], name, choice))
                ts = [threading.Thread(target=one, args=(c,)) for c in ("left", "tie")]
                [t.start() for t in ts]
                [t.join() for t in ts]
                ok = [r for r in results if r[0] == 200]
                with lock:
                    accepted.extend((j["token"], name) for _ in ok)
                    if len(ok) != 1 or sorted(r[0] for r in results) != [200, 409]:
                        errors.append(results)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=rater, args=(f"r{i}",)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    srv.close()
    assert not errors
    rows = db_votes(tmp_path / "study")
    assert len(rows) == len(accepted) == 6 * 8
    assert len({t for t, _, _ in rows}) == len(rows)  # no token twice
    assert sorted((t, r) for t, r, _ in rows) == sorted(accepted)
    assert Counter(r for _, r, _ in rows) == {f"r{i}": 8 for i in range(6)}
    with sqlite3.connect(tmp_path / "study" / "votes.sqlite") as c:
        assert c.execute("SELECT COUNT(*) FROM served WHERE status = 'pending'").fetchone()[0] == 0


def test_restart_keeps_votes_and_the_pending_pair(tmp_path):
    make_study(tmp_path, quota=4)
    srv = HumanEvalServer(tmp_path / "study", port=0).start()
    cl = Client(srv.url)
    for _ in range(2):
        assert cl.vote(cl.next("r1")["token"], "r1", "right")[0] == 200
    pending = cl.next("r1")["token"]
    srv.close()
    srv = HumanEvalServer(tmp_path / "study", port=0).start()
    try:
        cl = Client(srv.url)
        assert json.loads(cl.request("api/health")[1]) == {"ok": True, "votes": 2}
        j = cl.next("r1")
        assert j["token"] == pending and j["progress"]["done"] == 2
        assert cl.vote(pending, "r1", "tie")[0] == 200
    finally:
        srv.close()
    assert len(db_votes(tmp_path / "study")) == 3
    # a votes file of another study is refused
    other = prepare_study(tmp_path / "other", make_rows(tmp_path / "o"))
    with pytest.raises(StudyError, match="votes of another study"):
        VoteStore(other, path=tmp_path / "study" / "votes.sqlite")


def test_host_other_than_loopback_warns(tmp_path):
    make_study(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HumanEvalServer(tmp_path / "study", host="127.0.0.1", port=0).close()
    assert not [w for w in caught if "binding" in str(w.message)]
    with pytest.warns(UserWarning, match="binding to 0.0.0.0: anyone who can reach"):
        HumanEvalServer(tmp_path / "study", host="0.0.0.0", port=0).close()


# ---- scheduling -----------------------------------------------------------------------------------------------------

def test_scheduler_balances_pairs_prompts_sides_and_repeats(tmp_path):
    st = make_study(tmp_path, quota=400, repeat_fraction=0.1, repeat_gap=3, seed=1)
    store = VoteStore(st)
    rng = np.random.default_rng(0)
    shown = []
    for k in range(240):
        rater = f"r{k % 3}"
        p = store.next_pair(rater, PAGE_VERSION)
        shown.append(p)
        store.vote(p["token"], rater, ["left", "right", "tie", "both_bad"][rng.integers(4)], PAGE_VERSION)
    v = store.votes_frame()
    store.close()
    first = v[v["repeat_of"].isna()]
    reps = v[v["repeat_of"].notna()]
    pairs = Counter(tuple(sorted((a, b))) for a, b in zip(first["left_ckpt"], first["right_ckpt"]))
    assert max(pairs.values()) - min(pairs.values()) <= 1  # the pair with the fewest votes first
    assert min(Counter(first["prompt_id"]).values()) >= 45  # prompts uniform: about 72 each
    assert 0.4 < first["swapped"].mean() < 0.6
    assert 0.05 < len(reps) / len(v) < 0.16
    by_id = v.set_index("id")
    for r in reps.itertuples():  # the same comparison, sides swapped, after at least repeat_gap later votes
        o = by_id.loc[int(r.repeat_of)]
        assert (r.prompt_id, r.seed, r.left_ckpt, r.right_ckpt) == (o.prompt_id, o.seed, o.right_ckpt, o.left_ckpt)
        assert r.swapped == 1 - o.swapped and r.rater == o.rater
        assert ((v["rater"] == r.rater) & (v["id"] > r.repeat_of) & (v["id"] < r.id)).sum() >= 3
    assert reps["repeat_of"].is_unique
    # a rater sees a (pair, prompt, seed) again only once every (prompt, seed) of that pair has been shown
    n_combos = len(st.prompts) * len(st.seeds)
    for _, g in first.groupby(["rater", first[["left_ckpt", "right_ckpt"]].apply(lambda r: "".join(sorted(r)),
                                                                                  axis=1)]):
        keys = list(zip(g.prompt_id, g.seed))[:n_combos]
        assert len(set(keys)) == len(keys)
    with pytest.raises(VoteError, match="rater id"):
        VoteStore(st).next_pair("bad id!", PAGE_VERSION)


def test_a_raters_repeats_do_not_depend_on_other_raters(tmp_path):
    def repeats_of_solo(root, others):
        st = prepare_study(root, make_rows(tmp_path), quota=100, repeat_fraction=0.3, repeat_gap=2, seed=4)
        store = VoteStore(st)
        at = []
        for k in range(30):
            for rater in ["solo"] + others * (k % 3):
                p = store.next_pair(rater, PAGE_VERSION)
                if rater == "solo" and p["repeat_of"] is not None:
                    at.append(k)
                store.vote(p["token"], rater, "left" if k % 2 else "tie", PAGE_VERSION)
        store.close()
        return at

    alone = repeats_of_solo(tmp_path / "a", [])
    assert len(alone) >= 3 and repeats_of_solo(tmp_path / "b", ["x", "y"]) == alone


def test_quota_then_done(tmp_path):
    st = make_study(tmp_path, quota=2)
    store = VoteStore(st)
    for _ in range(2):
        p = store.next_pair("r", PAGE_VERSION)
        assert store.vote(p["token"], "r", "tie", PAGE_VERSION)["quota"] == 2
    assert store.next_pair("r", PAGE_VERSION) is None
    assert store.progress("r") == {"done": 2, "quota": 2}
    store.close()


# ---- analyses -------------------------------------------------------------------------------------------------------

def _votes(rows):
    """rows: (rater, prompt_id, left, right, choice[, repeat_of]) -> a votes table like the store's."""
    order = ["ckA", "ckB", "ckC"]
    out = []
    for k, r in enumerate(rows, 1):
        rater, pid, left, right, choice = r[:5]
        out.append({"id": k, "rater": rater, "prompt_id": pid, "seed": 0, "left_ckpt": left, "right_ckpt": right,
                    "swapped": int(order.index(left) > order.index(right)), "choice": choice,
                    "repeat_of": r[5] if len(r) > 5 else None})
    return pd.DataFrame(out)


def bt_by_hand(W, prior):
    """Maximise the (penalised) Bradley-Terry log-likelihood directly with scipy (not the MM iterations)."""
    from scipy.optimize import minimize

    W = np.asarray(W, float)

    def nll(theta):
        d = theta[:, None] - theta[None, :]
        ll = (W * -np.logaddexp(0, -d)).sum()
        ll += prior / 2 * (-np.logaddexp(0, -theta) - np.logaddexp(0, theta)).sum()
        return -ll

    t = minimize(nll, np.zeros(len(W)), method="BFGS", options={"gtol": 1e-10}).x
    return t - t.mean()


def test_bradley_terry_mm_matches_direct_likelihood_maximisation():
    W = np.array([[0, 3, 5.5], [2, 0, 1], [0.5, 4, 0]])
    for prior in (1.0, 0.3):
        np.testing.assert_allclose(bradley_terry(W, prior=prior), bt_by_hand(W, prior), atol=1e-6)
    np.testing.assert_allclose(bradley_terry(W, prior=0), bt_by_hand(W, 0), atol=1e-5)  # the MLE exists here
    # two players, no prior: p1/(p1+p2) = wins share
    t = bradley_terry(np.array([[0, 3.0], [1.0, 0]]), prior=0)
    assert 1 / (1 + np.exp(-(t[0] - t[1]))) == pytest.approx(0.75, abs=1e-8)
    # a checkpoint that loses everything: finite with the prior
    t = bradley_terry(np.array([[0, 4.0], [0, 0]]), prior=1)
    assert np.isfinite(t).all() and t[0] > t[1]
    with pytest.raises(ValueError, match="square"):
        bradley_terry(np.ones((2, 3)))


def test_win_rates_bt_both_bad_consistency_by_hand(tmp_path):
    st = make_study(tmp_path)
    v = _votes([
        ("r1", 0, "ckA", "ckB", "left"),     # A beats B
        ("r1", 1, "ckB", "ckA", "left"),     # B beats A
        ("r1", 2, "ckA", "ckB", "tie"),      # tie
        ("r1", 0, "ckB", "ckA", "right"),    # A beats B
        ("r2", 1, "ckA", "ckB", "both_bad"),  # apart
        ("r2", 0, "ckC", "ckA", "left"),     # C beats A
        ("r2", 2, "ckB", "ckC", "right"),    # C beats B
        ("r2", 1, "ckA", "ckC", "tie"),      # tie A-C
        ("r2", 0, "ckA", "ckC", "right", 6),  # repeat of 6 (C left before, now right): C again -> consistent
        ("r1", 1, "ckA", "ckB", "left", 2),  # repeat of 2 (B was left and won; now B right, rater says left=A): no
        ("r2", 2, "ckC", "ckB", "left", 7),  # repeat of 7: C again, consistent
    ])
    res = analyze(st, v, n_bootstrap=300, seed=0)
    wr = res.win_rates.set_index(["checkpoint_a", "checkpoint_b"])
    ab, ac, bc = wr.loc[("ckA", "ckB")], wr.loc[("ckA", "ckC")], wr.loc[("ckB", "ckC")]
    assert (ab.n, ab.wins_a, ab.wins_b, ab.ties, ab.both_bad) == (4, 2, 1, 1, 1)
    assert ab.win_rate_a == pytest.approx((2 + 0.5) / 4)
    assert (ac.n, ac.wins_a, ac.wins_b, ac.ties) == (2, 0, 1, 1) and ac.win_rate_a == pytest.approx(0.25)
    assert (bc.n, bc.wins_b) == (1, 1) and bc.win_rate_a == 0.0
    W = np.array([[0, 2.5, 0.5], [1.5, 0, 0], [1.5, 1, 0]])
    np.testing.assert_allclose(res.bt["score"], bt_by_hand(W, 1.0), atol=1e-6)
    bt = res.bt.set_index("checkpoint")
    assert (bt.loc["ckA", "wins"], bt.loc["ckA", "losses"], bt.loc["ckA", "ties"], bt.loc["ckA", "both_bad"]) == \
        (2, 2, 2, 1)
    assert bt.loc["ckC", "rank"] == 1 and bt.loc["ckB", "rank"] == 3
    for _, r in res.bt.iterrows():
        assert r.ci_low <= r.score + 1e-9 and r.score - 1e-9 <= r.ci_high
    assert res.summary["n_both_bad"] == 1 and res.summary["n_repeats"] == 3 and res.summary["n_counted"] == 7
    cons = res.consistency.set_index("rater")
    assert (cons.loc["r1", "n_repeats"], cons.loc["r1", "n_consistent"]) == (1, 0)
    assert (cons.loc["r2", "n_repeats"], cons.loc["r2", "n_consistent"], cons.loc["r2", "consistency"]) == (2, 2, 1.0)
    vs = human_win_rate_vs(res, "ckA").set_index("checkpoint")
    assert vs.loc["ckA", "win_rate"] == 0.5
    assert vs.loc["ckB", "win_rate"] == pytest.approx(1 - 0.625) and vs.loc["ckC", "win_rate"] == pytest.approx(0.75)
    assert vs.loc["ckB", "ci_low"] == pytest.approx(1 - ab.ci_high)


def test_bootstrap_resamples_whole_prompts(tmp_path):
    st = make_study(tmp_path)
    # prompt 0: A wins 10 times; prompt 1: B wins 10 times. Resampling prompts can only give 0, 1/2 or 1; resampling
    # single votes would give a narrow interval around 1/2.
    rows = [("r", 0, "ckA", "ckB", "left")] * 10 + [("r", 1, "ckA", "ckB", "right")] * 10
    res = analyze(st, _votes(rows), n_bootstrap=400, seed=3)
    ab = res.win_rates.iloc[0]
    assert ab.win_rate_a == 0.5 and (ab.ci_low, ab.ci_high) == (0.0, 1.0)
    # the same votes spread over 20 prompts: a narrower interval
    rows = [("r", k, "ckA", "ckB", "left") for k in range(10)] + [("r", 10 + k, "ckA", "ckB", "right")
                                                                  for k in range(10)]
    st2 = prepare_study(tmp_path / "s2", make_rows(tmp_path / "b", prompts=[f"p{k}" for k in range(20)], seeds=(0,)))
    ab2 = analyze(st2, _votes(rows), n_bootstrap=400, seed=3).win_rates.iloc[0]
    assert 0.2 < ab2.ci_low < 0.5 < ab2.ci_high < 0.8
    # no bootstrap -> no interval; no votes -> NaN rates, zero counts
    assert np.isnan(analyze(st, _votes(rows[:3]), n_bootstrap=0).win_rates.iloc[0].ci_low)
    empty = analyze(st, _votes([]).reindex(columns=["id", "rater", "prompt_id", "seed", "left_ckpt", "right_ckpt",
                                                    "swapped", "choice", "repeat_of"]))
    assert empty.win_rates["n"].sum() == 0 and empty.win_rates["win_rate_a"].isna().all()


def test_results_files_page_and_overopt_report(tmp_path, capsys):
    st = prepare_study(tmp_path / "he", make_rows(tmp_path, checkpoints=("step_000000", "step_000005",
                                                                          "step_000010")))
    store = VoteStore(st)
    rng = np.random.default_rng(1)
    for k in range(30):
        p = store.next_pair(f"r{k % 2}", PAGE_VERSION)
        later = p["left"].checkpoint > p["right"].checkpoint
        choice = ("left" if later else "right") if rng.random() < 0.7 else str(rng.choice(["tie", "both_bad"]))
        store.vote(p["token"], p["rater"], choice, PAGE_VERSION)
    store.close()
    paths = write_results(tmp_path / "he", n_bootstrap=50)
    for name in ("votes", "win_rates", "bt_scores", "consistency", "human_win_rate", "json", "html"):
        assert paths[name].exists(), name
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["n_votes"] == 30 and len(data["win_rates"]) == 3 and len(data["bradley_terry"]) == 3
    assert [r["step"] for r in data["human_win_rate_vs_initial"]] == [0, 5, 10]
    page = paths["html"].read_text()
    assert "Bradley&ndash;Terry" in page and "<svg" in page and "step_000010" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script" not in page
    # into an overopt study's report: the win rate vs d beside gold and proxy
    ov = tmp_path / "ov" / "study"
    ov.mkdir(parents=True)
    pd.DataFrame({"step": [0, 5, 10], "d": [0.0, 0.4, 0.9], "gold/x": [1.0, 1.2, 1.1],
                  "proxy/lrm": [0.5, 0.9, 1.3]}).to_csv(ov / "study.csv", index=False)
    (ov / "report.html").write_text("<html><title>overoptimization: lrm (demo)</title></html>")
    capsys.readouterr()
    assert main(["human-eval", "results", str(tmp_path / "he"), "--n-bootstrap", "20", "--into-report",
                 str(tmp_path / "ov")]) == 0
    assert "rank" in capsys.readouterr().out
    hw = pd.read_csv(ov / "human_win_rate.csv")
    assert list(hw["step"]) == [0, 5, 10] and hw["win_rate"].iloc[0] == 0.5
    report = (ov / "report.html").read_text()
    assert "plots/human_vs_d.png" in report and "<title>overoptimization: lrm (demo)</title>" in report
    assert (ov / "plots" / "human_vs_d.png").stat().st_size > 1000
    # a human study whose checkpoints are not that run's steps is refused
    other = tmp_path / "ov2"
    other.mkdir()
    pd.DataFrame({"step": [100, 200], "d": [0.0, 1.0]}).to_csv(other / "study.csv", index=False)
    assert main(["human-eval", "results", str(tmp_path / "he"), "--n-bootstrap", "0", "--into-report",
                 str(other)]) == 2
    assert "no checkpoint of this human study matches" in capsys.readouterr().err


# ---- videos ---------------------------------------------------------------------------------------------------------

def write_anim(path, values, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(np.full((size, size, 3), v, np.uint8)) for v in values]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=125, loop=0)
    return path


def test_animated_samples_are_served_as_sprite_sheets(tmp_path):
    rows = []
    for c, ck in enumerate(("v1", "v2")):
        for s in (0, 1):
            f = write_anim(tmp_path / ck / f"{s}.webp", [20 * k + 100 * c + s for k in range(5)], size=8 + 4 * c)
            rows.append({"checkpoint": ck, "prompt": "a moving dot", "seed": s, "path": str(f)})
    st = prepare_study(tmp_path / "he", rows)
    s = st.sample("v2", 0, 1)
    assert (s.kind, s.frames, s.width, s.fps) == ("animation", 5, 12, 8.0) and st.modality == "video"
    srv = HumanEvalServer(tmp_path / "he", port=0).start()
    try:
        cl = Client(srv.url)
        j = cl.next("r")
        assert j["box"] == {"width": 444, "height": 444, "pixelated": True}  # both sides one size: 12 px x 37
        row = srv.store.served(j["token"])
        for side in ("left", "right"):
            m = j[side]
            assert (m["kind"], m["frames"], m["cols"]) == ("animation", 5, 3)
            status, body, _ = cl.request(m["url"])
            sheet = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
            sample = srv.study.sample(row[f"{side}_ckpt"], row["prompt_id"], row["seed"])
            with Image.open(sample.path) as im:
                frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
            w = sample.width
            assert sheet.shape == (2 * w, 3 * w, 3)
            for k, f in enumerate(frames):
                r, c = divmod(k, 3)
                np.testing.assert_array_equal(sheet[r * w:(r + 1) * w, c * w:(c + 1) * w], f)
    finally:
        srv.close()
    # images and videos do not mix
    mixed = rows[:2] + [dict(rows[2], path=str(write_png(tmp_path / "still.png", 3))), rows[3]]
    with pytest.raises(StudyError, match="images or videos, not both"):
        prepare_study(tmp_path / "mixed", mixed)
