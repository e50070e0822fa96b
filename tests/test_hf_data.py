"""data.name: hf reads a Hugging Face datasets dataset offline (built and saved by the test)."""

import numpy as np
import pytest
import torch

from diffusion import build
from diffusion.config import ConfigError, load_config
from diffusion.data import build_dataset

datasets = pytest.importorskip("datasets")


def make(tmp_path, labels=True, as_dict=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(6, 12, 10, 3), dtype=np.uint8)  # non-square: resized and centre-cropped
    data = {"img": [Image.fromarray(p) for p in pix]}
    feats = {"img": datasets.Image()}
    if labels:
        data["label"] = [0, 1, 2, 0, 1, 2]
        feats["label"] = datasets.ClassLabel(names=["a", "b", "c"])
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(feats))
    folder = tmp_path / "ds"
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(folder))
    return folder, pix


@pytest.mark.parametrize("as_dict", [False, True])
def test_images_labels_and_scaling(tmp_path, as_dict):
    folder, pix = make(tmp_path, as_dict=as_dict)
    d = build_dataset("hf", str(folder), 10)
    assert len(d) == 6 and d.num_classes == 3 and d.data_shape == (3, 10, 10)
    x, y = d[4]
    assert y == 1 and x.shape == (3, 10, 10) and x.min() >= -1 and x.max() <= 1
    # a 12x10 image at resolution 10: no resize, centre crop of rows 1..10
    want = torch.from_numpy(pix[4, 1:11]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x, want, atol=1e-6)
    flipped = build_dataset("hf", str(folder), 10, hflip=True)
    assert len(flipped) == 12 and torch.equal(flipped[10][0], x.flip(-1))


def test_no_labels_grayscale_and_the_trainer_config(tmp_path):
    folder, _ = make(tmp_path, labels=False)
    d = build_dataset("hf", str(folder), 8, channels=1)
    assert d.num_classes == 0 and d[0][0].shape == (1, 8, 8) and d[0][1] == 0
    cfg = load_config(None, ["data.name=hf", f"data.root={folder}", "data.resolution=8",
                             "model.options.block_out_channels=[32,32]", "model.options.attention_levels=[]"])
    cfg = build.resolve(cfg, build.build_data(cfg))
    assert list(cfg.model.input_shape) == [3, 8, 8]


def test_bad_inputs_name_what_is_wrong(tmp_path):
    folder, _ = make(tmp_path)
    with pytest.raises(ValueError, match="no image column 'pixels'; columns: \\['img', 'label'\\]"):
        build_dataset("hf", str(folder), 8, image_column="pixels")
    with pytest.raises(FileNotFoundError, match="could not be loaded offline"):
        build_dataset("hf", "nobody/not-cached-anywhere", 8)
    with pytest.raises(ConfigError, match="needs root"):
        cfg = load_config(None, ["data.name=hf", "data.resolution=8"])
        build.build_data(cfg)
