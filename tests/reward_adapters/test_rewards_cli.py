"""`lrm rewards list` and `lrm rewards score`."""

import json

import numpy as np
from PIL import Image

from lrm.cli import main


def test_rewards_list(capsys):
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    for n in ["jpeg-compressibility", "shapes-adherence", "hpsv2", "imagereward", "temporal-flickering"]:
        assert n in out
    assert main(["rewards", "list", "shapes-*"]) == 0
    out = capsys.readouterr().out
    assert "shapes-color" in out and "hpsv2" not in out


def test_rewards_score_shapes_and_folder(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["rewards", "score", "--reward", "shapes-color", "--shapes", "6", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["scores"]) == 6 and all(0.5 < v <= 1 for v in data["scores"].values())
    assert data["reward"]["name"] == "shapes-color"
    # a folder of PNGs with a prompts.json mapping
    d = tmp_path / "imgs"
    d.mkdir()
    for i, shade in enumerate([0, 128, 255]):
        Image.fromarray(np.full((8, 10, 3), shade, np.uint8)).save(d / f"{i}.png")
    (d / "prompts.json").write_text(json.dumps({"0.png": "a", "1.png": "b", "2.png": "c"}))
    out2 = tmp_path / "b.json"
    assert main(["rewards", "score", "--reward", "brightness", "--input", str(d), "--out", str(out2)]) == 0
    s = json.loads(out2.read_text())["scores"]
    assert abs(s["0.png"]) < 1e-6 and abs(s["1.png"] - 128 / 255) < 1e-5 and abs(s["2.png"] - 1) < 1e-5
