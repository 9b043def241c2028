"""Write a Stable-Diffusion-1.5-shaped diffusers pipeline with RANDOM weights, for runs that need the real sizes
but cannot download weights (the GPU machine has no internet).

    python bench/device/make_sd15_pipeline.py --out /tmp/sd15            # full size (UNet 860M, VAE 84M, CLIP 123M)
    python bench/device/make_sd15_pipeline.py --out /tmp/sd15t --tiny    # tiny widths, for CPU tests (~2M params)

The directory is a ``StableDiffusionPipeline.save_pretrained`` layout (safetensors):

- ``unet/``: ``UNet2DConditionModel`` with SD-1.5's config (``sd15_unet()`` of ``bench/distill_step_cost.py``);
- ``vae/``: ``AutoencoderKL`` with SD's config (``sd_vae()`` there), ``scaling_factor`` 0.18215;
- ``text_encoder/``: ``transformers.CLIPTextModel`` with openai/clip-vit-large-patch14's text config (768 wide,
  12 layers, 12 heads, 77 positions, vocab 49408, quick_gelu);
- ``tokenizer/``: a real ``CLIPTokenizer`` built offline from the CLIP BPE merges that ``open_clip_torch`` ships
  (``open_clip/bpe_simple_vocab_16e6.txt.gz``; the same 49408-entry vocab as openai/clip-vit-large-patch14, so
  token ids are the real ones; only the weights are random);
- ``scheduler/``: ``DDPMScheduler`` with SD-1.5's training schedule (1000 steps, scaled_linear 0.00085..0.012,
  epsilon, steps_offset 1, clip_sample false, set_alpha_to_one false);
- ``model_index.json``: ``StableDiffusionPipeline``, no safety checker / feature extractor.

Weights are seeded (``--seed``, one ``torch.manual_seed`` per module), so a given device gives the same files.
Modules are initialised directly on ``--device`` (default: cuda when available, which takes seconds at full size)
and written with ``safe_serialization=True``. Prints parameter counts and the time taken.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.distill_step_cost import sd15_unet, sd_vae  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # as open_clip's SimpleTokenizer and transformers' CLIPTokenizer read the file

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, clip_sample=False)
# keys of SD-1.5's scheduler_config.json that DDPMScheduler does not take; written into the JSON as SD-1.5 has them
SD15_SCHEDULER_EXTRA = dict(set_alpha_to_one=False, skip_prk_steps=True)

# openai/clip-vit-large-patch14's text tower as SD-1.5's text_encoder/config.json has it (pad_token_id 1 as there;
# bos / eos are the tokenizer's real ids, so pooling picks the first EOS token)
SD15_TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, projection_dim=768,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, initializer_range=0.02,
                 initializer_factor=1.0, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                 num_attention_heads=4)


# ---- tokenizer ------------------------------------------------------------------------------------------------
def default_bpe_path() -> Path:
    """``open_clip/bpe_simple_vocab_16e6.txt.gz`` of the installed open_clip_torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed: pass --bpe PATH/bpe_simple_vocab_16e6.txt.gz")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass --bpe PATH/bpe_simple_vocab_16e6.txt.gz")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map (the 256 base symbols, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab (256 byte chars, the same + '</w>', the joined merges, SOT, EOT: 49408 ids) and merges."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:NUM_MERGES + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: built {len(tokens)} tokens ({len(set(tokens))} distinct), expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(bpe_path: str | Path | None = None, model_max_length: int = 77):
    """A ``CLIPTokenizer`` equal to openai/clip-vit-large-patch14's, built from open_clip's BPE file (offline)."""
    import tempfile

    from transformers import CLIPTokenizer

    bpe_path = bpe_path or default_bpe_path()
    vocab, merges = clip_vocab_and_merges(bpe_path)
    with tempfile.TemporaryDirectory() as tmp:  # vocab.json + merges.txt, loaded the classic way (transformers 4 / 5)
        write_slow_tokenizer_files(Path(tmp), vocab, merges)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="CLIPTokenizer", model_max_length=model_max_length, do_lower_case=True, errors="replace",
            unk_token=EOT, bos_token=SOT, eos_token=EOT, pad_token=EOT)))
        tok = CLIPTokenizer.from_pretrained(tmp)
        want = [vocab[SOT], vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"], vocab[EOT]]
        if tok("A  photo of").input_ids != want or len(tok) != VOCAB_SIZE:
            raise RuntimeError(f"CLIPTokenizer built from {bpe_path}: {tok('A  photo of').input_ids} != {want}")
        return tok, vocab, merges


def write_slow_tokenizer_files(tok_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``, as SD-1.5's tokenizer folder has them."""
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")


# ---- modules --------------------------------------------------------------------------------------------------
def tiny_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)


def tiny_vae():
    from diffusers import AutoencoderKL

    # 3 blocks: 4x downsampling, like the Shapes VAE (SD's 4 blocks give 8x)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32, scaling_factor=0.18215)


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build(out: str | Path, tiny: bool = False, dtype: str = "fp32", device: str | None = None, seed: int = 0,
          bpe: str | Path | None = None, verbose: bool = True) -> dict:
    """Write the pipeline to ``out``; returns {module: parameter count} plus ``seconds``."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    t_all = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    log = print if verbose else (lambda *a, **k: None)
    times: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        torch.manual_seed(seed)
        with torch.device(device):
            m = fn()
        if DTYPES[dtype] != torch.float32:
            m = m.to(DTYPES[dtype])
        m = m.eval()
        times[name] = time.perf_counter() - t
        return m

    text_cfg = CLIPTextConfig(**(TINY_TEXT if tiny else SD15_TEXT))
    text_encoder = timed("text_encoder", lambda: CLIPTextModel(text_cfg))
    unet = timed("unet", (lambda: tiny_unet(text_cfg.hidden_size)) if tiny else sd15_unet)
    vae = timed("vae", tiny_vae if tiny else sd_vae)
    if not tiny:
        vae.register_to_config(scaling_factor=0.18215)
    if float(vae.config.scaling_factor) != 0.18215:
        raise AssertionError(f"VAE scaling_factor {vae.config.scaling_factor}")
    t = time.perf_counter()
    tokenizer, vocab, merges = build_tokenizer(bpe, model_max_length=text_cfg.max_position_embeddings)
    times["tokenizer"] = time.perf_counter() - t
    scheduler = DDPMScheduler(**SD15_SCHEDULER)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    t = time.perf_counter()
    pipe.save_pretrained(str(out), safe_serialization=True)
    times["save"] = time.perf_counter() - t
    write_slow_tokenizer_files(out / "tokenizer", vocab, merges)
    # SD-1.5's scheduler_config.json also carries these (its PNDMScheduler takes them; DDPMScheduler ignores them)
    sched_json = out / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_json.read_text())
    cfg.update(SD15_SCHEDULER_EXTRA)
    sched_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    counts = {"unet": nparams(unet), "vae": nparams(vae), "text_encoder": nparams(text_encoder)}
    counts["seconds"] = round(time.perf_counter() - t_all, 2)
    log(f"wrote {'tiny ' if tiny else ''}SD-1.5 pipeline ({dtype}, built on {device}, seed {seed}) to {out}")
    for k in ("unet", "vae", "text_encoder"):
        log(f"  {k:13s} {counts[k] / 1e6:9.2f} M params   built in {times[k]:.2f} s")
    log(f"  tokenizer     {len(tokenizer)} tokens   built in {times['tokenizer']:.2f} s")
    log(f"  saved in {times['save']:.2f} s; total {counts['seconds']:.2f} s")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument("--tiny", action="store_true", help="tiny widths for CPU tests")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="where modules are initialised (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bpe", default=None, help="CLIP BPE merges (default: open_clip's bpe_simple_vocab_16e6.txt.gz)")
    a = p.parse_args(argv)
    build(a.out, tiny=a.tiny, dtype=a.dtype, device=a.device, seed=a.seed, bpe=a.bpe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
