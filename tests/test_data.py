"""Datasets: ranges, shapes, exact transforms, error messages. Offline; files only under tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from diffusion.data import (CIFAR10Dataset, ImageFolderDataset, RingGMMDataset, UnreadableImageError,
                            build_dataset)
from diffusion.oracle import ring2d


def test_digits_default_matches_sklearn_exactly() -> None:
    ds = build_dataset()  # digits is the default
    ref = load_digits()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.data_shape == (1, 8, 8)
    expected = torch.from_numpy(ref.images).float()[:, None] / 8.0 - 1.0  # documented transform
    got = torch.stack([ds[i][0] for i in range(len(ds))])
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert got.min() == -1.0 and got.max() == 1.0
    assert [ds[i][1] for i in range(len(ds))] == ref.target.tolist()


def test_digits_resized_to_16_is_bilinear_and_in_range() -> None:
    ds = build_dataset("digits", resolution=16)
    x, y = ds[5]
    assert x.shape == (1, 16, 16) and isinstance(y, int)
    base = torch.from_numpy(load_digits().images[5]).float()[None, None] / 8.0 - 1.0
    assert torch.equal(x, F.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)[0])
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0


def test_digits_batches_through_a_dataloader() -> None:
    x, y = next(iter(DataLoader(build_dataset("digits"), batch_size=7)))
    assert x.shape == (7, 1, 8, 8) and y.dtype == torch.long


def test_gmm2d_ring_matches_oracle_and_is_seeded() -> None:
    ds = build_dataset("gmm2d", n=4000, seed=1)
    x, y = ds[0]
    assert x.shape == (2,) and 0 <= y < 8 and ds.num_classes == 8 and len(ds) == 4000
    assert torch.equal(ds.means, ring2d().means)
    assert torch.allclose(ds.means.norm(dim=1), torch.ones(8, dtype=torch.float64))
    for k in range(8):
        pts = ds.points[ds.labels == k].double()
        assert (pts.mean(0) - ds.means[k]).abs().max() < 0.02
        assert abs(pts.std(0).mean() - 0.08) < 0.01
    assert torch.equal(RingGMMDataset(n=50, seed=3).points, RingGMMDataset(n=50, seed=3).points)
    assert not torch.equal(RingGMMDataset(n=50, seed=3).points, RingGMMDataset(n=50, seed=4).points)


def test_cifar10_missing_raises_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        build_dataset("cifar10", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(FileNotFoundError):
        CIFAR10Dataset(root=tmp_path)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"'mnist'.*\['cifar10', 'digits', 'folder', 'gmm2d', 'hf'\]"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="root"):
        build_dataset("digits", root="/data")
    with pytest.raises(ValueError, match="resolution"):
        build_dataset("folder", root="/data")


# ---- image folder ------------------------------------------------------------------------------

def _write(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _half_image(path: Path) -> None:
    """A 12x12 image: left half white, right half black (to see flips)."""
    im = Image.new("RGB", (12, 12), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 6, 12))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    _write(tmp_path / "zebra" / "a.png", (20, 12), (255, 0, 255))
    _write(tmp_path / "apple" / "b.jpg", (12, 30), (0, 0, 0))
    _write(tmp_path / "apple" / "nested" / "c.png", (8, 8), (255, 255, 255))
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    ds = build_dataset("folder", root=tmp_path, resolution=8)
    assert ds.class_names == ["apple", "zebra"] and ds.num_classes == 2 and len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [y for _, y in items] == [0, 0, 1]
    for x, _ in items:
        assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(items[1][0], torch.ones(3, 8, 8))  # white -> +1 exactly
    magenta = items[2][0]
    assert torch.equal(magenta[0], torch.ones(8, 8)) and torch.equal(magenta[1], -torch.ones(8, 8))


def test_folder_flat_grayscale_and_hflip_doubling(tmp_path: Path) -> None:
    _half_image(tmp_path / "x.png")
    _write(tmp_path / "y.png", (16, 16), (10, 10, 10))
    ds = ImageFolderDataset(tmp_path, resolution=12, channels=1, hflip=True)
    assert ds.num_classes == 0 and len(ds) == 4 and ds[0][0].shape == (1, 12, 12)
    assert torch.equal(ds[2][0], ds[0][0].flip(-1)) and ds[2][1] == ds[0][1] == 0
    assert ds[0][0][0, 0, 0] == 1.0 and ds[2][0][0, 0, 0] == -1.0
    with pytest.raises(IndexError):
        ds[4]


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(missing, resolution=8)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path, resolution=8)
    _write(tmp_path / "good.png", (8, 8), (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    ds = ImageFolderDataset(tmp_path, resolution=8)  # lazy: construction succeeds
    with pytest.raises(UnreadableImageError, match="broken.png"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(UnreadableImageError, match="broken.png"):
        ImageFolderDataset(tmp_path, resolution=8, validate=True)


def test_folder_mixed_layout_is_rejected_when_classes_requested(tmp_path: Path) -> None:
    _write(tmp_path / "loose.png", (8, 8), (0, 0, 0))
    _write(tmp_path / "cls" / "a.png", (8, 8), (0, 0, 0))
    assert ImageFolderDataset(tmp_path, resolution=8).num_classes == 0  # auto: no classes, all images
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolderDataset(tmp_path, resolution=8, class_subfolders=True)
