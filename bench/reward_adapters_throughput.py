"""Throughput of the batched reward adapters vs the original packages' per-image scoring loops (GPU).

Same random weights, same GPU, same run, batch 64 of 512 x 512 images:

* ours        = ``reward(pixels (64, 3, 512, 512) on the GPU, prompts)``: batched torch preprocessing on the
                GPU + one model call (+ text features of distinct prompts).
* bare        = the same model's forward on already preprocessed, already tokenized GPU inputs: the floor.
* package     = the original per-image loop:
    - HPSv2 (``hpsv2.img_score.score``): per image, PIL -> hpsv2's ``preprocess_val`` (ToTensor,
      ResizeMaxSize(224) on the tensor, Normalize) -> GPU, tokenize the prompt, fp16 autocast forward,
      ``.cpu().numpy()``. Uses the installed ``hpsv2`` package's transform and tokenizer when importable,
      otherwise a line-for-line reproduction (the output says which). With ``hpsv2`` importable, the real
      ``hpsv2.score()`` call is timed too: it reloads the checkpoint (saved to a temp file) on every call.
    - ImageReward (``ImageReward.score``): per image, BERT tokenize (max_length 35), PIL Resize(224,
      bicubic) + CenterCrop + ToTensor + Normalize, BLIP visual encoder, med BERT with cross-attention,
      MLP, ``.item()``. With ``image-reward`` + ``fairscale`` installed (pure Python; ``make extras``), the
      package's own classes and ``ImageReward.score`` run (loaded by ``reward_adapters.original_packages``,
      which shims the few transformers-4 helpers it needs) and their random weights are converted into ours;
      otherwise a line-for-line reproduction on our model runs. The output says which.
  Package loops get PIL images prepared before the clock starts (their inputs); ours gets GPU tensors.

Also: PickScore / aesthetic / CLIP score (ours vs bare) and the CPU weight-free rewards (pool vs serial).
Models are random-weight, full-size: open_clip ViT-H-14 (HPSv2), BLIP ViT-L/16 + BERT-base (ImageReward),
HF CLIP ViT-H/14 (PickScore), open_clip ViT-L-14 (aesthetic, CLIP score). Prints a table; ``--out`` writes JSON.

    PYTHONPATH=. python3 bench/reward_adapters_throughput.py --out runs/bench/reward_adapters_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_adapters import create_reward  # noqa: E402
from reward_adapters.preprocess import OPENAI_MEAN, OPENAI_STD  # noqa: E402

WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "city", "at", "night", "painting", "sunset", "forest",
         "river", "portrait", "old", "man", "woman", "car", "mountain", "bright", "dark", "cinematic", "style"]


TINY = False  # --tiny: small random configs of the same classes, for a CPU smoke run of this script
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def open_clip_model(arch: str, device):
    import open_clip

    if TINY:
        d = Path(tempfile.mkdtemp())
        (d / "bench-tiny.json").write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(d / "bench-tiny.json")
        arch = "bench-tiny"
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU (a ViT-H-14 takes minutes on CPU)
        return open_clip.create_model(arch, pretrained=None, device=device).eval().requires_grad_(False)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, iters: int, warmup: int = 1) -> float:
    """Seconds per call (median of ``iters``)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def make_inputs(n: int, size: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 32, size // 32, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x * 255).round() / 255
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(n)]
    from PIL import Image

    pils = [Image.fromarray((xi.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for xi in x]
    return x.to(device), prompts, pils


def bert_tokenizer(tmpdir: Path):
    """A WordPiece tokenizer with the bert-base-uncased vocabulary size (30522) built offline: the benchmark
    words + filler entries. Tokenization cost per prompt is what matters here, not the ids."""
    from transformers import BertTokenizer

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(set(WORDS)) + [f"tok{i}" for i in range(30522 - len(vocab) - len(set(WORDS)))]
    (tmpdir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(tmpdir / "vocab.txt"))


def row(table, name, path, sec, n, note=""):
    table.append({"reward": name, "path": path, "sec_per_batch": sec, "images_per_s": n / sec, "note": note})


# ---- HPSv2 ------------------------------------------------------------------------------------------
def bench_hpsv2(args, device, x, prompts, pils, table, notes):
    import open_clip

    model = open_clip_model("ViT-H-14", device)
    tok = open_clip.get_tokenizer("ViT-H-14")
    n = x.shape[0]
    for prec in args.precisions:
        r = create_reward("hpsv2", model=model, tokenizer=tok, device=str(device), precision=prec)
        with torch.no_grad():
            row(table, "hpsv2", f"ours ({prec})", timeit(lambda: r(x, prompts), args.iters), n)
            pre = r.preprocess(x)
            toks = tok(prompts).to(device)

            def bare():
                with r.autocast():
                    a = torch.nn.functional.normalize(model.encode_image(pre).float(), dim=-1)
                    b = torch.nn.functional.normalize(model.encode_text(toks).float(), dim=-1)
                return (a * b).sum(-1)

            row(table, "hpsv2", f"bare forward ({prec})", timeit(bare, args.iters), n)
    # The package's per-image loop.
    src = "reproduction"
    try:
        from hpsv2.src.open_clip import get_tokenizer as hps_get_tokenizer
        from hpsv2.src.open_clip import image_transform

        preprocess_val = image_transform(224, is_train=False, mean=None, std=None, resize_longest_max=True)
        hps_tok = hps_get_tokenizer("ViT-H-14")
        src = "hpsv2 package transform + tokenizer"
    except Exception as e:  # not installed here, or its wheel lacks the BPE vocab
        notes.append(f"hpsv2 package not importable ({type(e).__name__}: {e}); HPSv2 loop is a reproduction")
        import torchvision.transforms.functional as TF

        def preprocess_val(img):  # ToTensor -> ResizeMaxSize(224, fill=0) -> Normalize, as hpsv2 1.2
            t = TF.to_tensor(img.convert("RGB"))
            h, w = t.shape[1:]
            s = 224 / float(max(h, w))
            if s != 1.0:
                nh, nw = round(h * s), round(w * s)
                t = TF.resize(t, [nh, nw], TF.InterpolationMode.BICUBIC)
                ph, pw = 224 - nh, 224 - nw
                t = TF.pad(t, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
            return TF.normalize(t, OPENAI_MEAN, OPENAI_STD)

        hps_tok = tok

    def package_loop():
        out = []
        for img, p in zip(pils, prompts):
            with torch.no_grad():
                image = preprocess_val(img).unsqueeze(0).to(device=device, non_blocking=True)
                text = hps_tok([p]).to(device=device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    fi = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
                    ft = torch.nn.functional.normalize(model.encode_text(text), dim=-1)
                    out.append((fi @ ft.T).diagonal().cpu().numpy()[0])
        return out

    row(table, "hpsv2", "package per-image loop (fp16 autocast)", timeit(package_loop, args.baseline_iters), n, src)
    if src != "reproduction" and not args.skip_package_call:
        bench_hpsv2_package_call(args, device, model, pils, prompts, table, notes)


def bench_hpsv2_package_call(args, device, model, pils, prompts, table, notes):
    """hpsv2.img_score.score(images, prompt, cp=...) as shipped: reloads the checkpoint on every call."""
    try:
        from hpsv2 import img_score

        img_score.model_dict["model"] = model
        model.output_dict = True  # hpsv2 builds its model with output_dict=True and indexes the outputs by name
        img_score.model_dict["preprocess_val"] = None
        from hpsv2.src.open_clip import image_transform

        img_score.model_dict["preprocess_val"] = image_transform(224, is_train=False, resize_longest_max=True)
        with tempfile.TemporaryDirectory() as d:
            cp = os.path.join(d, "hps_random.pt")
            torch.save({"state_dict": model.state_dict()}, cp)
            t = time.perf_counter()
            img_score.score(pils, prompts[0], cp=cp)  # one prompt for all images: the package's best case
            sync()
            sec = time.perf_counter() - t
            model.output_dict = False
        row(table, "hpsv2", "package img_score.score() (1 call + ckpt load)", sec, len(pils), "real package call")
    except Exception as e:
        notes.append(f"hpsv2.score() call skipped: {type(e).__name__}: {e}")


# ---- ImageReward ------------------------------------------------------------------------------------
def bench_imagereward(args, device, x, prompts, pils, table, notes, tmpdir):
    from torchvision import transforms as T
    from transformers import BlipTextConfig, BlipVisionConfig

    from reward_adapters.imagereward import IR_MEAN, IR_STD, ImageRewardModel, convert_imagereward_state_dict
    from reward_adapters.original_packages import build_original_imagereward, imagereward_available

    # ImageReward v1.0 sizes: BLIP ViT-L/16 at 224, BERT-base with cross-attention (med_config.json).
    if TINY:
        vis = dict(patch_size=32, embed_dim=32, depth=1, num_heads=2)
        txt = dict(vocab_size=30524, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=512, layer_norm_eps=1e-12)
    else:
        vis = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
        txt = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=512, layer_norm_eps=1e-12)
    vc = BlipVisionConfig(hidden_size=vis["embed_dim"], intermediate_size=4 * vis["embed_dim"],
                          num_hidden_layers=vis["depth"], num_attention_heads=vis["num_heads"], image_size=224,
                          patch_size=vis["patch_size"], layer_norm_eps=1e-6, initializer_range=0.02)
    tc = BlipTextConfig(encoder_hidden_size=vis["embed_dim"], **txt)
    tok = bert_tokenizer(tmpdir)
    torch.manual_seed(0)
    with torch.device(device):
        model = ImageRewardModel(vc, tc)
    original = None
    if imagereward_available():
        try:  # the package's own classes and ImageReward.score, same random weights as ours
            with torch.device(device):
                original = build_original_imagereward(tok, vis, txt, 224)
            model.load_state_dict(convert_imagereward_state_dict(original.module.state_dict()), strict=True)
            original.module.to(device)
            original.device = device
        except Exception as e:
            notes.append(f"original ImageReward code not usable ({type(e).__name__}: {e}); loop is a reproduction")
            original = None
    else:
        notes.append("image-reward not installed (make extras): the ImageReward loop is a reproduction of "
                     "ImageReward.score")
    model = model.to(device).eval().requires_grad_(False)
    n = x.shape[0]
    ours_fp32 = None
    for prec in args.precisions:
        r = create_reward("imagereward", model=model, tokenizer=tok, device=str(device), precision=prec)
        with torch.no_grad():
            row(table, "imagereward", f"ours ({prec})", timeit(lambda: r(x, prompts), args.iters), n)
            if prec == "fp32":
                ours_fp32 = r(x, prompts).cpu().numpy()
            pre = r.preprocess(x)
            ids, mask = r.tokens(prompts)

            def bare():
                with r.autocast():
                    return model(pre, ids, mask)

            row(table, "imagereward", f"bare forward ({prec})", timeit(bare, args.iters), n)
    transform = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])

    def reproduced_loop():  # ImageReward.score(prompt, image) restated, one image at a time, fp32
        out = []
        with torch.no_grad():
            for img, p in zip(pils, prompts):
                t = tok(p, padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
                image = transform(img).unsqueeze(0).to(device)
                emb = model.image_embeds(image)
                atts = torch.ones(emb.size()[:-1], dtype=torch.long).to(device)
                o = model.text(input_ids=t.input_ids, attention_mask=t.attention_mask,
                               encoder_hidden_states=emb, encoder_attention_mask=atts)
                feat = o.last_hidden_state[:, 0, :].float()
                out.append(((model.mlp(feat) - IR_MEAN) / IR_STD).detach().cpu().numpy().item())
        return out

    def package_loop():  # the package's ImageReward.score, as shipped, one image at a time (fp32)
        with torch.no_grad():
            return [original.score(p, im) for p, im in zip(prompts, pils)]

    loop, src = (package_loop, "image-reward ImageReward.score") if original is not None else (
        reproduced_loop, "reproduction of ImageReward.score")
    row(table, "imagereward", "package per-image loop (fp32)", timeit(loop, args.baseline_iters), n, src)
    if ours_fp32 is not None:
        ref = np.asarray(loop(), dtype=np.float64)
        notes.append(f"imagereward: ours fp32 vs {src}: max |diff| {np.abs(ours_fp32 - ref).max():.3g} "
                     f"(scores span {np.ptp(ref):.3g}; PIL rounds resized images to uint8)")


# ---- others: ours vs bare ----------------------------------------------------------------------------
def bench_pickscore(args, device, x, prompts, table):
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if TINY:
        cfg = CLIPConfig(text_config=dict(small, max_position_embeddings=77, eos_token_id=49407),
                         vision_config=dict(small, image_size=224, patch_size=32), projection_dim=16)
    else:  # CLIP ViT-H/14 (laion2B), the PickScore_v1 architecture
        cfg = CLIPConfig(
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             max_position_embeddings=77, hidden_act="gelu", eos_token_id=49407),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
            projection_dim=1024)
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(cfg)
    model = model.to(device).eval().requires_grad_(False)
    tok = open_clip.get_tokenizer("ViT-H-14")
    for prec in args.precisions:
        r = create_reward("pickscore", model=model, tokenizer=tok, device=str(device), precision=prec)
        with torch.no_grad():
            row(table, "pickscore", f"ours ({prec})", timeit(lambda: r(x, prompts), args.iters), x.shape[0])
            pre, ids = r.preprocess(x), tok(prompts).to(device)

            def bare():
                with r.autocast():
                    a = model.get_image_features(pixel_values=pre)
                    b = model.get_text_features(input_ids=ids)
                a = a if isinstance(a, torch.Tensor) else a.pooler_output
                b = b if isinstance(b, torch.Tensor) else b.pooler_output
                return (torch.nn.functional.normalize(a.float(), dim=-1)
                        * torch.nn.functional.normalize(b.float(), dim=-1)).sum(-1)

            row(table, "pickscore", f"bare forward ({prec})", timeit(bare, args.iters), x.shape[0])


def bench_openclip_l14(args, device, x, prompts, table):
    import open_clip

    from reward_adapters.aesthetic import AestheticMLP

    model = open_clip_model("ViT-L-14", device)
    tok = open_clip.get_tokenizer("ViT-L-14")
    for prec in args.precisions:
        dim = int(model.text_projection.shape[1]) if TINY else 768
        ra = create_reward("aesthetic", model=model, head_module=AestheticMLP(dim), device=str(device), precision=prec)
        rc = create_reward("clip-score", model=model, tokenizer=tok, device=str(device), precision=prec)
        with torch.no_grad():
            row(table, "aesthetic", f"ours ({prec})", timeit(lambda: ra(x), args.iters), x.shape[0])
            pre = ra.preprocess(x)

            def bare_a():
                with ra.autocast():
                    return ra.head(torch.nn.functional.normalize(model.encode_image(pre).float(), dim=-1))

            row(table, "aesthetic", f"bare forward ({prec})", timeit(bare_a, args.iters), x.shape[0])
            row(table, "clip-score", f"ours ({prec})", timeit(lambda: rc(x, prompts), args.iters), x.shape[0])
            toks = tok(prompts).to(device)

            def bare_c():
                with rc.autocast():
                    a = torch.nn.functional.normalize(model.encode_image(pre).float(), dim=-1)
                    b = torch.nn.functional.normalize(model.encode_text(toks).float(), dim=-1)
                return 100 * (a * b).sum(-1)

            row(table, "clip-score", f"bare forward ({prec})", timeit(bare_c, args.iters), x.shape[0])


def bench_cpu(args, x, table):
    xc = x.cpu()
    for name in ["jpeg-compressibility"]:
        serial = create_reward(name, executor="serial")
        pooled = create_reward(name, workers=min(16, os.cpu_count() or 1))
        row(table, name, "cpu serial", timeit(lambda: serial(xc), 2), xc.shape[0])
        row(table, name, f"cpu thread pool ({pooled.workers})", timeit(lambda: pooled(xc), 2), xc.shape[0])


def summarize(table):
    """Ratios: ours vs package loop (speed-up) and ours vs bare forward (overhead), per reward and precision."""
    out = []
    by = {}
    for r in table:
        by.setdefault(r["reward"], {})[r["path"]] = r
    for name, paths in by.items():
        for p, r in paths.items():
            if not p.startswith("ours"):
                continue
            prec = p[p.index("(") + 1:-1]
            bare = paths.get(f"bare forward ({prec})")
            pkg = next((v for k, v in paths.items() if k.startswith("package")), None)
            out.append({"reward": name, "precision": prec,
                        "ours_over_bare_time": r["sec_per_batch"] / bare["sec_per_batch"] if bare else None,
                        "speedup_vs_package_loop": pkg["sec_per_batch"] / r["sec_per_batch"] if pkg else None})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=512, help="input images are size x size")
    ap.add_argument("--iters", type=int, default=5, help="timed calls of the batched paths")
    ap.add_argument("--baseline-iters", type=int, default=2, help="timed calls of the per-image loops")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rewards", nargs="+", default=["hpsv2", "imagereward", "pickscore", "openclip-l14", "cpu"],
                    choices=["hpsv2", "imagereward", "pickscore", "openclip-l14", "cpu"])
    ap.add_argument("--skip-package-call", action="store_true", help="skip timing hpsv2.score() (ckpt reload)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--tiny", action="store_true", help="tiny random configs (CPU smoke run of the script)")
    args = ap.parse_args()
    global TINY
    TINY = args.tiny
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    x, prompts, pils = make_inputs(args.batch, args.size, device)
    table, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rewards:
            t0 = time.perf_counter()
            if name == "hpsv2":
                bench_hpsv2(args, device, x, prompts, pils, table, notes)
            elif name == "imagereward":
                bench_imagereward(args, device, x, prompts, pils, table, notes, Path(tmp))
            elif name == "pickscore":
                bench_pickscore(args, device, x, prompts, table)
            elif name == "openclip-l14":
                bench_openclip_l14(args, device, x, prompts, table)
            elif name == "cpu":
                bench_cpu(args, x, table)
            print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary = summarize(table)
    print(f"\nbatch {args.batch} of {args.size}x{args.size} images on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}")
    print(f"{'reward':<22}{'path':<50}{'s/batch':>10}{'img/s':>10}  note")
    for r in table:
        print(f"{r['reward']:<22}{r['path']:<50}{r['sec_per_batch']:>10.4f}{r['images_per_s']:>10.1f}  {r['note']}")
    print(f"\n{'reward':<22}{'precision':<10}{'ours/bare (time)':>18}{'speed-up vs package loop':>27}")
    for s in summary:
        ob = f"{s['ours_over_bare_time']:.3f}" if s["ours_over_bare_time"] else "-"
        sp = f"{s['speedup_vs_package_loop']:.1f}x" if s["speedup_vs_package_loop"] else "-"
        print(f"{s['reward']:<22}{s['precision']:<10}{ob:>18}{sp:>27}")
    for n in notes:
        print(f"note: {n}")
    if TINY:
        print("note: --tiny: small random configs, timings are not meaningful")
    result = {"tiny": TINY, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "size": args.size, "rows": table,
              "summary": summary, "notes": notes, "allow_tf32": False}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
