"""lrm human-eval in a real browser: Debian's headless Chromium, driven by selenium through /usr/bin/chromedriver.

A tiny Shapes run (the shipped Shapes teacher sampled with DDIM at 1, 2 and 8 steps: three checkpoints, 4 prompts x
2 seeds, per-sample files from evaluate(save_samples=True)) is prepared with `lrm human-eval prepare` and served;
two raters vote at the same time in two browsers, by keyboard and by click, one reloads mid-study; then the stored
votes, the win rates and the Bradley-Terry scores of `lrm human-eval results` are compared with those computed here
by hand from the choices clicked. A second test checks that animated samples of different sizes are shown in boxes
of one size and loop frame by frame in sync.

Set LRM_HUMAN_EVAL_SCREENSHOTS=DIR to keep the screenshots (docs/human_eval/ holds the ones in the repository).
"""

import hashlib
import io
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.human_eval import Study, load_votes
from eval.human_eval.server import HumanEvalServer
from lrm.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs a headless Chromium: apt-get install -y "
                       "chromium chromium-driver (Debian; .ci/run installs them)"),
]
QUOTA = 12
KEYS = {"left": "1", "right": "2", "tie": "3", "both_bad": "4"}
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1180,860", "--autoplay-policy=no-user-gesture-required"]


def save_screenshot(driver, name, tmp_path):
    """A screenshot (palette PNG, small) in tmp_path, and in $LRM_HUMAN_EVAL_SCREENSHOTS when set."""
    im = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    dirs = [tmp_path] + ([Path(os.environ["LRM_HUMAN_EVAL_SCREENSHOTS"])]
                         if os.environ.get("LRM_HUMAN_EVAL_SCREENSHOTS") else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / name, optimize=True)
    assert (tmp_path / name).stat().st_size > 2000


@pytest.fixture
def browsers(tmp_path):
    """A factory of fresh headless Chromium sessions (own profile each); all quit at the end."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tests drive Chromium with selenium: pip install -e '.[dev]'")
    made = []

    def make():
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / f'profile{len(made)}'}"]:
            opts.add_argument(flag)
        d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        d.set_page_load_timeout(60)
        made.append(d)
        return d

    yield make
    for d in made:
        d.quit()


def wait(driver, cond, timeout=60, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond, message=f"timed out waiting for {what}")


def state(driver):
    return driver.execute_script("return document.body.dataset.state")


def login(driver, url, rater):
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait(driver, lambda d: state(d) == "login", what="the rater form")
    driver.find_element(By.ID, "rater").send_keys(rater)
    driver.find_element(By.ID, "start").click()


# ---- the tiny Shapes run ----------------------------------------------------------------------------------------

@pytest.fixture
def shapes_study(tmp_path, text_encoder, shapes_vae):
    from distill.models import load_shapes_teacher
    from eval.evaluate import evaluate
    from eval.generators import DenoiserGenerator, shapes_prompts

    den = load_shapes_teacher("image", device="cpu")
    prompts = shapes_prompts(4, seed=1000)
    runs = []
    for steps in (1, 2, 8):
        res = evaluate(DenoiserGenerator(den, steps=steps), prompts, n_per_prompt=2, seeds=0, decode=shapes_vae,
                       text_encoder=text_encoder, latent_shape=(4, 8, 8), n_bootstrap=0, progress=False,
                       warmup=False, save_samples=True)
        res.save(tmp_path / "runs" / f"ddim-{steps}")
        runs.append(str(tmp_path / "runs" / f"ddim-{steps}"))
    study = tmp_path / "study"
    assert main(["human-eval", "prepare", str(study), "--from", *runs, "--quota", str(QUOTA),
                 "--repeat-fraction", "0.2", "--repeat-gap", "2", "--seed", "0"]) == 0
    return study


RANK = {"alice": ["ddim-8", "ddim-2", "ddim-1"], "bob": ["ddim-1", "ddim-8", "ddim-2"]}


def decide(rater, prompt_id, left, right):
    """The raters' taste: a ranking, with ties, both-bad answers and a side bias (inconsistent on swap repeats)."""
    if rater == "alice" and {left, right} == {"ddim-1", "ddim-2"} and prompt_id % 2 == 0:
        return "tie"
    if rater == "bob" and prompt_id == 3:
        return "both_bad"
    if rater == "bob" and {left, right} == {"ddim-2", "ddim-8"}:
        return "left"
    r = RANK[rater]
    return "left" if r.index(left) < r.index(right) else "right"


def bt_by_hand(W, prior=1.0):
    from scipy.optimize import minimize

    def nll(theta):
        d = theta[:, None] - theta[None, :]
        return -((W * -np.logaddexp(0, -d)).sum() + prior / 2 * (-np.logaddexp(0, -theta)
                                                                  - np.logaddexp(0, theta)).sum())

    t = minimize(nll, np.zeros(len(W)), method="BFGS", options={"gtol": 1e-10}).x
    return t - t.mean()


def test_full_study_in_chromium(shapes_study, browsers, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    st = Study.load(shapes_study)
    by_sha = {s.sha256: s for s in st.samples}
    assert len(by_sha) == len(st.samples) == 3 * 4 * 2  # every sample differs: its bytes tell which one is shown
    srv = HumanEvalServer(shapes_study, port=0).start()
    log, errors, lock = [], [], threading.Lock()

    def shown(driver):
        """(prompt text, {side: Sample}) on screen, the samples recognised by the sha256 of what the page loaded."""
        out = {}
        for side in ("left", "right"):
            src = driver.execute_script(f"return document.querySelector('#{side} .media').dataset.src")
            with urllib.request.urlopen(srv.url + src, timeout=30) as r:
                out[side] = by_sha[hashlib.sha256(r.read()).hexdigest()]
        return driver.find_element(By.ID, "prompt").text, out

    def progress(driver):
        return driver.find_element(By.ID, "progress").text

    def rater(name, driver, reload_at=None):
        try:
            login(driver, srv.url, name)
            for k in range(QUOTA):
                wait(driver, lambda d: state(d) == "ready" and progress(d) == f"{k} of {QUOTA}", what=f"pair {k}")
                prompt, sides = shown(driver)
                pid = st.prompts.index(prompt)
                assert sides["left"].prompt_id == sides["right"].prompt_id == pid
                assert sides["left"].seed == sides["right"].seed and sides["left"].checkpoint != \
                    sides["right"].checkpoint
                if k == reload_at:  # a reload mid-study shows the same pair again; the rater id is remembered
                    before = [driver.execute_script(f"return document.querySelector('#{s} .media').dataset.src")
                              for s in ("left", "right")]
                    driver.refresh()
                    wait(driver, lambda d: state(d) == "ready" and progress(d) == f"{k} of {QUOTA}",
                         what="the page after a reload")
                    assert [driver.execute_script(f"return document.querySelector('#{s} .media').dataset.src")
                            for s in ("left", "right")] == before
                    assert not driver.find_element(By.ID, "task").get_attribute("hidden")
                    assert driver.find_element(By.ID, "who").text == f"rater: {name}"
                if name == "alice" and k == 2:
                    ActionChains(driver).move_to_element(driver.find_element(By.ID, "prompt")).perform()  # no hover
                    save_screenshot(driver, "voting_page.png", tmp_path)
                boxes = driver.execute_script(
                    "return ['left','right'].map(s => {const r = document.querySelector('#' + s + ' .media')"
                    ".getBoundingClientRect(); return [r.width, r.height];})")
                assert boxes[0] == boxes[1] and boxes[0][0] > 300  # one size for both samples
                choice = decide(name, pid, sides["left"].checkpoint, sides["right"].checkpoint)
                method = "key" if k % 2 == 0 else "click"
                if method == "key":
                    ActionChains(driver).send_keys(KEYS[choice]).perform()
                else:
                    driver.find_element(By.ID, f"choice-{choice}").click()
                with lock:
                    log.append({"rater": name, "k": k, "prompt_id": pid, "seed": sides["left"].seed,
                                "left": sides["left"].checkpoint, "right": sides["right"].checkpoint,
                                "choice": choice, "method": method})
            wait(driver, lambda d: state(d) == "done", what="the thank-you page")
            assert progress(driver) == f"{QUOTA} of {QUOTA}"
            assert f"completed all {QUOTA} comparisons" in driver.find_element(By.ID, "done-text").text
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append((name, e))

    drivers = {"alice": browsers(), "bob": browsers()}
    threads = [threading.Thread(target=rater, args=("alice", drivers["alice"], 5)),
               threading.Thread(target=rater, args=("bob", drivers["bob"]))]
    try:
        [t.start() for t in threads]
        [t.join(timeout=600) for t in threads]
    finally:
        srv.close()
    if errors:
        raise errors[0][1]
    assert len(log) == 2 * QUOTA

    # 1. the stored votes are the clicked ones, in order, with the sides the page showed
    _, votes = load_votes(shapes_study)
    assert len(votes) == 2 * QUOTA and votes["token"].is_unique
    order = {c: i for i, c in enumerate(st.checkpoints)}
    for name in ("alice", "bob"):
        mine = sorted((r for r in log if r["rater"] == name), key=lambda r: r["k"])
        db = votes[votes["rater"] == name].sort_values("id")
        assert list(zip(db.prompt_id, db.seed, db.left_ckpt, db.right_ckpt, db.choice)) == \
            [(r["prompt_id"], r["seed"], r["left"], r["right"], r["choice"]) for r in mine]
        assert list(db.swapped) == [int(order[r["left"]] > order[r["right"]]) for r in mine]
        assert (db["client_ms"] >= 0).all() and (db["answered_at"] > db["shown_at"]).all()
        # swap repeats, found by hand: the same prompt, seed and pair again (the scheduler shows a rater unseen
        # combinations first, and 12 votes never exhaust them)
        seen, repeats = {}, []
        for r, v in zip(mine, db.itertuples()):
            key = (r["prompt_id"], r["seed"], frozenset((r["left"], r["right"])))
            if key in seen:
                o = seen[key]
                assert v.repeat_of == o[1] and (r["left"], r["right"]) == (o[0]["right"], o[0]["left"])
                repeats.append((o[0]["choice"], r["choice"]))
            else:
                assert pd.isna(v.repeat_of)
                seen[key] = (r, v.id)
        assert len(repeats) == db["repeat_of"].notna().sum()
    assert votes["repeat_of"].notna().sum() >= 1  # (a rater's repeats are seeded: the same in every run)

    # 2. results by hand from the clicked choices: first-time votes, both-bad apart
    assert main(["human-eval", "results", str(shapes_study), "--n-bootstrap", "200"]) == 0
    res_dir = shapes_study / "results"
    data = json.loads((res_dir / "results.json").read_text())
    first, reps = [], {}
    seen_keys = set()
    for r in sorted(log, key=lambda r: (r["rater"], r["k"])):
        key = (r["rater"], r["prompt_id"], r["seed"], frozenset((r["left"], r["right"])))
        if key in seen_keys:
            reps.setdefault(r["rater"], []).append(r)
        else:
            seen_keys.add(key)
            first.append(r)
    K = len(st.checkpoints)
    W = np.zeros((K, K))
    pair = {}
    for r in first:
        li, ri = order[r["left"]], order[r["right"]]
        a, b = min(li, ri), max(li, ri)
        c = pair.setdefault((a, b), {"wins_a": 0, "wins_b": 0, "ties": 0, "both_bad": 0})
        if r["choice"] == "both_bad":
            c["both_bad"] += 1
            continue
        if r["choice"] == "tie":
            c["ties"] += 1
            W[li, ri] += 0.5
            W[ri, li] += 0.5
            continue
        win, lose = (li, ri) if r["choice"] == "left" else (ri, li)
        W[win, lose] += 1
        c["wins_a" if win == a else "wins_b"] += 1
    for row in data["win_rates"]:
        a, b = order[row["checkpoint_a"]], order[row["checkpoint_b"]]
        c = pair.get((a, b), {"wins_a": 0, "wins_b": 0, "ties": 0, "both_bad": 0})
        n = c["wins_a"] + c["wins_b"] + c["ties"]
        assert (row["wins_a"], row["wins_b"], row["ties"], row["both_bad"], row["n"]) == \
            (c["wins_a"], c["wins_b"], c["ties"], c["both_bad"], n)
        if n:
            assert row["win_rate_a"] == pytest.approx((c["wins_a"] + c["ties"] / 2) / n)
            assert row["ci_low"] <= row["ci_high"]
    scores = {r["checkpoint"]: r["score"] for r in data["bradley_terry"]}
    np.testing.assert_allclose([scores[c] for c in st.checkpoints], bt_by_hand(W), atol=1e-5)
    # consistency by hand: the same checkpoint again (sides swapped), or tie / both bad again
    swapped = {"left": "right", "right": "left", "tie": "tie", "both_bad": "both_bad"}
    for row in data["consistency"]:
        name = row["rater"]
        mine = [r for r in log if r["rater"] == name]
        pairs = []
        for r in reps.get(name, []):
            key = (r["prompt_id"], r["seed"], frozenset((r["left"], r["right"])))
            o = next(x for x in sorted(mine, key=lambda x: x["k"])
                     if (x["prompt_id"], x["seed"], frozenset((x["left"], x["right"]))) == key)
            pairs.append(swapped[o["choice"]] == r["choice"])
        assert (row["n_votes"], row["n_repeats"], row["n_consistent"]) == (QUOTA, len(pairs), sum(pairs))

    # 3. the results page, offline
    d = drivers["alice"]
    d.get(f"file://{res_dir / 'results.html'}")
    assert "Human pairwise evaluation" in d.find_element("tag name", "h1").text
    assert d.execute_script("return document.querySelectorAll('table').length") >= 4
    save_screenshot(d, "results_page.png", tmp_path)


def write_anim(path, values, size):
    """Frame k: one flat colour (red channel = values[k])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(np.full((size, size, 3), (v, 40, 200), np.uint8)) for v in values]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=125, loop=0)
    return path


def test_animated_samples_loop_in_sync_at_one_size(tmp_path, browsers):
    from eval.human_eval import prepare_study

    rows = []
    for ck, size in (("small", 16), ("big", 24)):
        for s in (0, 1):
            f = write_anim(tmp_path / ck / f"{s}.webp", [40 * k for k in range(6)], size)
            rows.append({"checkpoint": ck, "prompt": "a square moving left", "seed": s, "path": str(f)})
    prepare_study(tmp_path / "study", rows, quota=3)
    srv = HumanEvalServer(tmp_path / "study", port=0).start()
    try:
        d = browsers()
        login(d, srv.url, "vid")
        wait(d, lambda d: state(d) == "ready", what="the video pair")
        sizes = d.execute_script(
            "return ['left','right'].map(s => {const c = document.querySelector('#' + s + ' canvas');"
            "const r = c.getBoundingClientRect(); return [c.width, r.width, r.height];})")
        assert sorted(s[0] for s in sizes) == [16, 24]  # natural sizes differ ...
        assert sizes[0][1:] == sizes[1][1:]  # ... the boxes on screen do not
        read = ("return ['left','right'].map(s => {const c = document.querySelector('#' + s + ' canvas');"
                "const p = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;"
                "return Math.round(p[0] / 40);})")
        frames = []
        t0 = time.time()
        while time.time() - t0 < 2.0:  # 6 frames at 8 fps loop every 0.75 s
            frames.append(d.execute_script(read))
            time.sleep(0.03)
        assert all(a == b for a, b in frames), frames  # both sides show the same frame
        seq = [a for a, _ in frames]
        assert len(set(seq)) >= 4 and any(b < a for a, b in zip(seq, seq[1:]))  # it plays and loops
        assert d.execute_script("return window.lrmHumanEval.frames.left === window.lrmHumanEval.frames.right")
    finally:
        srv.close()
