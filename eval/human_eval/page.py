"""The voting page: one self-contained HTML document (inline CSS and JavaScript, no CDN, works offline).

The page asks for a rater id once (kept in the browser's localStorage per study), then loops: ``POST api/next``
-> show the prompt and the two samples in boxes of the same size -> the rater answers with a click or the keys
1-4 -> ``POST api/vote`` with the pair's token. Checkpoint names never reach the page: samples are fetched as
``media/<token>/left|right``. Animated samples (animated WebP/GIF) arrive as one sprite sheet each and are drawn
on canvases from ONE clock, so both loop frame by frame in sync; MP4/WebM samples play in muted, looped
``<video>`` elements started together and re-aligned when they drift. ``window.lrmHumanEval`` exposes the state
(``state``: init / login / loading / ready / submitting / done / error; ``frames``: the frame each side shows)
for browser tests. ``document.body.dataset.state`` mirrors ``state``.
"""

from __future__ import annotations

import html
import json

CSS = """
*{box-sizing:border-box} body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#f6f6f4} header{display:flex;align-items:baseline;gap:18px;padding:12px 24px;background:#fff;
border-bottom:1px solid #ddd} h1{font-size:19px;margin:0;flex:1} #progress{font-size:16px;font-weight:600;
color:#333} #who{font-size:13px;color:#666} main{max-width:1100px;margin:0 auto;padding:16px 24px}
#prompt{font-size:20px;margin:4px 0 16px;padding:10px 14px;background:#fff;border:1px solid #ddd;border-radius:6px}
.label{font-size:12px;color:#777;text-transform:uppercase;letter-spacing:.06em;margin:6px 0 0}
#pair{display:flex;justify-content:center;gap:24px;flex-wrap:wrap} figure.side{margin:0;text-align:center}
.media{background:#e8e8e6;border:1px solid #ccc;display:flex;align-items:center;justify-content:center;
overflow:hidden} .media>*{width:100%;height:100%;object-fit:contain;display:block}
.pixelated .media>*{image-rendering:pixelated} figcaption{font-size:14px;color:#555;margin-top:6px}
#choices{display:flex;justify-content:center;gap:12px;margin:22px 0 8px;flex-wrap:wrap}
#choices button{font-size:16px;padding:12px 18px;border:1px solid #999;border-radius:6px;background:#fff;
cursor:pointer;min-width:170px} #choices button:hover{background:#eef4ff;border-color:#4a78c2}
#choices button.picked{background:#4a78c2;color:#fff} #choices button:disabled{opacity:.55;cursor:default}
kbd{display:inline-block;border:1px solid #aaa;border-bottom-width:2px;border-radius:4px;padding:0 6px;
margin-right:8px;font-size:13px;background:#f4f4f4;color:#222} .hint{color:#666;font-size:13px;text-align:center}
#login form{display:flex;gap:10px;justify-content:center;align-items:center;margin:60px 0 10px;font-size:17px}
#login input{font-size:17px;padding:8px 10px;width:240px} #login button{font-size:17px;padding:8px 18px}
#done{text-align:center;margin-top:70px} #done h2{font-size:28px} #error{max-width:900px;margin:14px auto;
padding:10px 14px;background:#fde8e8;border:1px solid #e0a0a0;border-radius:6px;color:#8a1111}
footer{text-align:center;font-size:12px;color:#888;margin:26px 0} footer a{color:#777}
"""

BODY = """
<header><h1>{title}</h1><div id="who"></div><div id="progress" aria-live="polite"></div></header>
<main>
<div id="error" role="alert" hidden></div>
<section id="login" hidden>
  <form id="login-form" autocomplete="off">
    <label for="rater">Your rater id</label>
    <input id="rater" name="rater" maxlength="64" placeholder="e.g. your initials" required>
    <button id="start" type="submit">Start</button>
  </form>
  <p class="hint">Typed once: this browser remembers it. Letters, digits and _ . @ + - only.</p>
</section>
<section id="task" hidden>
  <p class="label">Prompt</p>
  <p id="prompt"></p>
  <div id="pair">
    <figure class="side" id="left"><div class="media"></div><figcaption>Left</figcaption></figure>
    <figure class="side" id="right"><div class="media"></div><figcaption>Right</figcaption></figure>
  </div>
  <div id="choices">
    <button type="button" id="choice-left" data-choice="left"><kbd>1</kbd>Left is better</button>
    <button type="button" id="choice-right" data-choice="right"><kbd>2</kbd>Right is better</button>
    <button type="button" id="choice-tie" data-choice="tie"><kbd>3</kbd>Tie</button>
    <button type="button" id="choice-both_bad" data-choice="both_bad"><kbd>4</kbd>Both bad</button>
  </div>
  <p class="hint">Which sample fits the prompt better and looks better? Keys 1&ndash;4 or click.</p>
</section>
<section id="done" hidden><h2>Thank you!</h2><p id="done-text"></p></section>
</main>
<footer><a href="#" id="switch">not you? change rater id</a> &middot; page version {page_version}</footer>
"""

SCRIPT = r"""
(function () {
  'use strict';
  const C = JSON.parse(document.getElementById('config').textContent);
  const KEY = 'lrm-human-eval-rater:' + C.study_id;
  const KEYS = {'1': 'left', '2': 'right', '3': 'tie', '4': 'both_bad'};
  const RATER = /^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$/;
  const S = {state: 'init', rater: null, pair: null, busy: true, shownAt: 0, frames: {left: null, right: null},
             votes: 0, clock: 0};
  window.lrmHumanEval = S;
  const $ = (id) => document.getElementById(id);

  function setState(st) { S.state = st; document.body.dataset.state = st; }
  function show(id) { for (const s of ['login', 'task', 'done']) $(s).hidden = (s !== id); }
  function error(msg) { $('error').textContent = msg || ''; $('error').hidden = !msg; }
  function buttons(on) { for (const b of document.querySelectorAll('#choices button')) b.disabled = !on; }
  function progress(p) { if (p) $('progress').textContent = p.done + ' of ' + p.quota; }

  async function api(path, body) {
    const r = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                 body: JSON.stringify(body), cache: 'no-store'});
    let j = null;
    try { j = await r.json(); } catch (e) { j = {error: 'the server answered ' + r.status}; }
    if (!r.ok) { const err = new Error(j.error || ('HTTP ' + r.status)); err.status = r.status; throw err; }
    return j;
  }

  async function mediaError(url) {
    try { const r = await fetch(url, {cache: 'no-store'}); const j = await r.json(); return j.error; }
    catch (e) { return 'could not load ' + url; }
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = async () => reject(new Error(await mediaError(url)));
      img.src = url;
    });
  }

  function loadVideo(url) {
    return new Promise((resolve, reject) => {
      const v = document.createElement('video');
      v.muted = true; v.defaultMuted = true; v.loop = true; v.playsInline = true; v.preload = 'auto';
      v.setAttribute('muted', ''); v.setAttribute('playsinline', '');
      v.oncanplaythrough = () => { v.oncanplaythrough = null; resolve(v); };
      v.onerror = async () => reject(new Error(await mediaError(url)));
      v.src = url;
    });
  }

  async function build(side, m) {
    if (m.kind === 'image') { const img = await loadImage(m.url); img.alt = side + ' sample'; return {el: img, m}; }
    if (m.kind === 'video') { return {el: await loadVideo(m.url), m}; }
    const sheet = await loadImage(m.url);  // animation: a sprite sheet, m.cols frames per row
    const cv = document.createElement('canvas');
    cv.width = m.width; cv.height = m.height;
    return {el: cv, m, sheet, ctx: cv.getContext('2d'), frame: -1};
  }

  function draw(s, f) {
    if (s.frame === f) return;
    s.frame = f;
    const m = s.m, x = (f % m.cols) * m.width, y = Math.floor(f / m.cols) * m.height;
    s.ctx.clearRect(0, 0, m.width, m.height);
    s.ctx.drawImage(s.sheet, x, y, m.width, m.height, 0, 0, m.width, m.height);
  }

  function startClock(sides) {
    const clock = ++S.clock, t0 = performance.now();
    const vids = sides.filter((s) => s.m.kind === 'video').map((s) => s.el);
    for (const v of vids) { v.currentTime = 0; }
    for (const v of vids) { v.play().catch(() => {}); }
    function tick(now) {
      if (clock !== S.clock) return;  // a newer pair took over
      for (const [name, s] of [['left', sides[0]], ['right', sides[1]]]) {
        if (s.m.kind === 'animation') {
          const f = Math.floor((now - t0) * s.m.fps / 1000) % s.m.frames;
          draw(s, f);
          S.frames[name] = f;
        } else if (s.m.kind === 'video') {
          S.frames[name] = Math.floor(s.el.currentTime * (s.m.fps || 25));
        }
      }
      if (vids.length === 2 && Math.abs(vids[0].currentTime - vids[1].currentTime) > 0.08) {
        vids[1].currentTime = vids[0].currentTime;  // keep the two videos in step
      }
      requestAnimationFrame(tick);
    }
    if (sides.some((s) => s.m.kind !== 'image')) requestAnimationFrame(tick);
  }

  async function render(p) {
    const sides = await Promise.all([build('left', p.left), build('right', p.right)]);
    $('prompt').textContent = p.prompt;
    $('pair').classList.toggle('pixelated', !!p.box.pixelated);
    for (const [name, s] of [['left', sides[0]], ['right', sides[1]]]) {
      const box = $(name).querySelector('.media');
      box.style.width = p.box.width + 'px'; box.style.height = p.box.height + 'px';
      box.replaceChildren(s.el);
      box.dataset.src = s.m.url;
    }
    S.frames = {left: null, right: null};
    startClock(sides);
  }

  async function next() {
    S.busy = true; buttons(false); setState('loading');
    try {
      const j = await api('api/next', {rater: S.rater, page_version: C.page_version});
      progress(j.progress);
      if (j.done) {
        S.clock++; S.pair = null;
        $('done-text').textContent = 'You have completed all ' + j.progress.quota + ' comparisons, ' + S.rater +
          '. You can close this page.';
        show('done'); setState('done'); return;
      }
      S.pair = j;
      await render(j);
      for (const b of document.querySelectorAll('#choices button')) b.classList.remove('picked');
      show('task'); S.shownAt = performance.now(); S.busy = false; buttons(true); setState('ready');
    } catch (e) { error(e.message); setState('error'); }
  }

  async function vote(choice) {
    if (S.busy || !S.pair || S.state !== 'ready') return;
    S.busy = true; buttons(false); setState('submitting');
    $('choice-' + choice).classList.add('picked');
    const ms = Math.max(0, Math.round(performance.now() - S.shownAt));
    try {
      const j = await api('api/vote', {token: S.pair.token, rater: S.rater, choice: choice,
                                       page_version: C.page_version, client_ms: ms});
      S.votes++; progress(j.progress); error('');
    } catch (e) {
      if (e.status === 409 || e.status === 404) { error(e.message); }  // stale pair: move on to a fresh one
      else { error(e.message); S.busy = false; buttons(true); setState('ready'); return; }
    }
    await next();
  }

  function start(rater) {
    S.rater = rater; $('who').textContent = 'rater: ' + rater; error('');
    next();
  }

  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const r = $('rater').value.trim();
    if (!RATER.test(r)) { error('A rater id is 1-64 letters, digits or _ . @ + - (e.g. your initials).'); return; }
    try { localStorage.setItem(KEY, r); } catch (err) { /* private mode: kept for this page only */ }
    start(r);
  });
  for (const b of document.querySelectorAll('#choices button')) {
    b.addEventListener('click', () => vote(b.dataset.choice));
  }
  document.addEventListener('keydown', (e) => {
    if (e.repeat || e.altKey || e.ctrlKey || e.metaKey || e.target.tagName === 'INPUT') return;
    const c = KEYS[e.key];
    if (c) { e.preventDefault(); vote(c); }
  });
  $('switch').addEventListener('click', (e) => {
    e.preventDefault();
    try { localStorage.removeItem(KEY); } catch (err) { /* nothing kept */ }
    S.clock++; S.rater = null; S.pair = null; $('who').textContent = ''; $('progress').textContent = '';
    show('login'); setState('login'); $('rater').focus();
  });

  let saved = null;
  try { saved = localStorage.getItem(KEY); } catch (e) { saved = null; }
  if (saved && RATER.test(saved)) { start(saved); } else { show('login'); setState('login'); $('rater').focus(); }
})();
"""


def render_page(title: str, study_id: str, page_version: str) -> bytes:
    """The voting page's HTML for one study."""
    config = json.dumps({"study_id": study_id, "page_version": page_version}).replace("<", "\\u003c")
    t = html.escape(title)
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{t}</title><style>{CSS}</style></head><body data-state='init'>"
            + BODY.replace("{title}", t).replace("{page_version}", html.escape(page_version))
            + f"<script type='application/json' id='config'>{config}</script><script>{SCRIPT}</script>"
            "</body></html>\n").encode()
