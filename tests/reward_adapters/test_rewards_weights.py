"""$LRM_CACHE_DIR reaches every weight load (open_clip tags, PickScore, ImageReward's tokenizer and checkpoint,
the aesthetic heads' URL download), and offline errors name the file, where it was looked for and the fix."""

import pytest
import torch
from torch import nn

from reward_adapters import create_reward
from reward_adapters import weights as W
from reward_adapters.weights import WeightsNotFoundError


@pytest.fixture(autouse=True)
def _fresh_models(monkeypatch, tmp_path):
    """Loaded models are cached per process; give each test its own cache and its own $LRM_CACHE_DIR."""
    monkeypatch.setattr(W, "_MODELS", {})
    monkeypatch.setenv("LRM_CACHE_DIR", str(tmp_path / "lrm-cache"))


def _capture(calls, ret):
    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return ret() if callable(ret) else ret

    return fake


# ---- open_clip ------------------------------------------------------------------------------------------
def test_open_clip_tags_and_tokenizer_get_cache_dir(monkeypatch, tmp_path):
    import open_clip

    models, toks = [], []
    monkeypatch.setattr(open_clip, "create_model", _capture(models, lambda: nn.Linear(2, 2)))
    monkeypatch.setattr(open_clip, "get_tokenizer", _capture(toks, "tok"))
    want = str(tmp_path / "lrm-cache" / "open_clip")
    r = create_reward("clip-score", arch="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert models == [(("ViT-B-32",), {"pretrained": "laion2b_s34b_b79k", "device": "cpu", "cache_dir": want})]
    assert r.tokenizer == "tok" and toks == [(("ViT-B-32",), {"cache_dir": want})]
    # the aesthetic backbone goes through the same loader (head injected: no head file needed)
    from reward_adapters.aesthetic import AestheticReward

    AestheticReward(head_module=nn.Linear(768, 1))
    assert models[-1] == (("ViT-L-14",), {"pretrained": "openai", "device": "cpu", "cache_dir": want})
    # unset: open_clip's own default cache
    monkeypatch.delenv("LRM_CACHE_DIR")
    create_reward("clip-score", arch="ViT-B-16", pretrained="openai")
    assert models[-1][1]["cache_dir"] is None


def test_open_clip_offline_error_names_tag_cache_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from reward_adapters.openclip_backbone import create_open_clip

    with pytest.raises(WeightsNotFoundError) as e:
        create_open_clip("ViT-B-32", "laion2b_s34b_b79k", torch.device("cpu"))
    msg = str(e.value)
    assert "'ViT-B-32'" in msg and "'laion2b_s34b_b79k'" in msg
    assert str(tmp_path / "lrm-cache" / "open_clip") in msg  # where it looked
    assert "pretrained=<path" in msg and "LRM_CACHE_DIR" in msg  # how to provide it


# ---- PickScore ----------------------------------------------------------------------------------------
def test_pickscore_from_pretrained_gets_cache_dir(monkeypatch, tmp_path):
    import transformers

    models, toks = [], []

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", _capture(models, lambda: nn.Linear(2, 2)))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _capture(toks, "tok"))
    want = str(tmp_path / "lrm-cache" / "hf")
    r = create_reward("pickscore")
    assert models == [(("yuvalkirstain/PickScore_v1",), {"cache_dir": want})]
    assert r.tokenizer == "tok" and toks == [(("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",), {"cache_dir": want})]


def test_pickscore_offline_error_names_repo_cache_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as e:
        create_reward("pickscore")
    msg = str(e.value)
    assert "yuvalkirstain/PickScore_v1" in msg and str(tmp_path / "lrm-cache" / "hf") in msg
    assert "model_id=" in msg and "huggingface-cli download yuvalkirstain/PickScore_v1 --cache-dir" in msg


# ---- ImageReward ------------------------------------------------------------------------------------------
def test_imagereward_tokenizer_and_checkpoint_get_cache_dir(monkeypatch, tmp_path):
    import huggingface_hub
    import transformers

    from reward_adapters.imagereward import ImageRewardReward

    toks, hub = [], []

    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained", _capture(toks, "bert"))
    want = str(tmp_path / "lrm-cache" / "hf")
    r = ImageRewardReward(model=nn.Identity())
    assert r.tokenizer == "bert" and toks == [(("bert-base-uncased",), {"cache_dir": want})]
    # a local tokenizer directory given by name
    r2 = ImageRewardReward(model=nn.Identity(), tokenizer=str(tmp_path / "my-bert"))
    assert r2.tokenizer == "bert" and toks[-1] == ((str(tmp_path / "my-bert"),), {"cache_dir": want})
    # ImageReward.pt from the hub lands in $LRM_CACHE_DIR/hf too
    ckpt = tmp_path / "ImageReward.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _capture(hub, str(ckpt)))
    assert W.resolve_weights("ImageReward.pt", hub_repo="THUDM/ImageReward", subdir="imagereward") == ckpt
    assert hub == [(("THUDM/ImageReward", "ImageReward.pt"), {"cache_dir": want})]


def test_imagereward_tokenizer_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from reward_adapters.imagereward import ImageRewardReward

    r = ImageRewardReward(model=nn.Identity())
    with pytest.raises(WeightsNotFoundError) as e:
        r.tokenizer
    msg = str(e.value)
    assert "bert-base-uncased" in msg and "vocab.txt" in msg and str(tmp_path / "lrm-cache" / "hf") in msg
    assert "tokenizer=" in msg
    # transformers 5 returns a specials-only tokenizer for a directory without vocab.txt: refused, not used
    (tmp_path / "empty-bert").mkdir()
    with pytest.raises(WeightsNotFoundError, match="only the special tokens"):
        ImageRewardReward(model=nn.Identity(), tokenizer=str(tmp_path / "empty-bert")).tokenizer


# ---- LAION aesthetic heads ----------------------------------------------------------------------------------
def _fake_download(calls, head: nn.Module):
    def fake(url, dst, progress=True):
        calls.append((url, dst))
        torch.save(head.state_dict(), dst)

    return fake


def test_aesthetic_head_downloaded_into_cache_dir_once(monkeypatch, tmp_path):
    from reward_adapters.aesthetic import HEAD_FILES, AestheticReward

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    head = nn.Linear(768, 1)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(calls, head))
    r = AestheticReward(head="v1", model=nn.Identity())
    fname, url = HEAD_FILES["v1"]
    dst = tmp_path / "lrm-cache" / "aesthetic" / fname
    assert calls == [(url, str(dst))] and dst.is_file()
    assert torch.equal(r.head.weight, head.weight)
    AestheticReward(head="v1", model=nn.Identity())  # found in the cache dir now: no second download
    assert len(calls) == 1
    # without $LRM_CACHE_DIR the download goes to torch.hub's checkpoint dir (TORCH_HOME)
    monkeypatch.delenv("LRM_CACHE_DIR")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    p = W.resolve_weights(fname, subdir="aesthetic", url=url)
    assert p == tmp_path / "torch-hub" / "checkpoints" / fname and calls[-1] == (url, str(p))


def test_aesthetic_head_offline_error_names_file_places_and_fix(monkeypatch, tmp_path):
    from reward_adapters.aesthetic import HEAD_FILES, AestheticReward

    fname, url = HEAD_FILES["improved"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(calls, nn.Linear(768, 1)))
    with pytest.raises(WeightsNotFoundError) as e:
        AestheticReward(head_weights=str(tmp_path / "missing.pth"), model=nn.Identity())
    msg = str(e.value)
    assert calls == []  # offline: no download attempted
    assert repr(fname) in msg and str(tmp_path / "missing.pth") in msg
    assert str(tmp_path / "lrm-cache" / "aesthetic" / fname) in msg and "HF_HUB_OFFLINE" in msg
    assert url in msg and "head_weights=..." in msg
    # online but the download fails (no network): the URL and the error are named
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_network(url, dst, progress=True):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsNotFoundError, match="name resolution") as e:
        AestheticReward(model=nn.Identity())
    assert f"download {url}" in str(e.value)
