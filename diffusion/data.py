"""Datasets: image items are ``(x [C,H,W] float32 in [-1, 1], label: int)``.

- ``digits`` (default, offline): scikit-learn's bundled 8x8 digits, ``x = pixel/8 - 1``
  (pixels 0..16), bilinearly resized when ``resolution != 8``. 1797 images, 10 classes.
- ``gmm2d``: a fixed sample of the 2-D ring of 8 Gaussians (same numbers as ``oracle.ring2d``);
  items are ``(x [2], mode index)``.
- ``cifar10``: torchvision's CIFAR-10, never downloaded unless ``download=True``.
- ``folder``: any folder of images, optionally one subfolder per class.
- ``hf``: a Hugging Face ``datasets`` image dataset (``save_to_disk`` folder, data folder or cached Hub id).

Horizontal flips (``hflip=True``) double the dataset deterministically (index ``i + N`` is the
mirror of ``i``, as in EDM), so there is no augmentation RNG and a resumed run sees the same data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusion.oracle import RING_MODES, RING_RADIUS, RING_STD, ring2d

DEFAULT_DATASET = "digits"
DEFAULT_DATA_ROOT = Path("data")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UnreadableImageError(OSError):
    """An image file that exists but cannot be decoded."""


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of a [N, C, H, W] float batch (antialiased when shrinking)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    shrink = resolution < min(x.shape[-2:])
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)


class _FlipDoubled(Dataset):
    """Base for image datasets: subclasses give ``_n`` and ``_item(i)``; hflip appends mirrored copies."""

    _n: int
    hflip: bool = False

    def __len__(self) -> int:
        return self._n * (2 if self.hflip else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = range(len(self))[index]  # handles negatives and raises IndexError out of range
        x, y = self._item(i % self._n)
        return (x.flip(-1) if i >= self._n else x), y

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class DigitsDataset(_FlipDoubled):
    """scikit-learn's 8x8 digits in [-1, 1], 1 channel, optionally resized to ``resolution``."""

    def __init__(self, resolution: int = 8) -> None:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        if resolution < 1:
            raise ValueError(f"digits resolution must be positive, got {resolution}")
        d = load_digits()
        x = torch.from_numpy(d.images).to(torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
        # Bilinear interpolation is a convex combination, so values stay inside [-1, 1].
        self.images = _resize(x, resolution).contiguous()
        self.labels = torch.from_numpy(d.target).long()
        self._n = len(self.labels)
        self.num_classes, self.channels, self.resolution = 10, 1, int(resolution)
        self.data_shape = (1, self.resolution, self.resolution)

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class RingGMMDataset(Dataset):
    """n fixed samples (by seed) of the equal-weight ring of isotropic Gaussians; label = mode index."""

    def __init__(self, n: int = 10_000, seed: int = 0, n_modes: int = RING_MODES,
                 radius: float = RING_RADIUS, std: float = RING_STD) -> None:
        if n < 1 or n_modes < 1 or std <= 0:
            raise ValueError(f"gmm2d needs n >= 1, n_modes >= 1, std > 0; got n={n}, n_modes={n_modes}, std={std}")
        g = torch.Generator().manual_seed(seed)
        # The oracle's ring is the single source of the numbers, so samples and exact scores agree.
        self.means, self.std = ring2d(n_modes, radius, std).means, float(std)
        self.labels = torch.randint(0, n_modes, (n,), generator=g)
        noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
        self.points = (self.means[self.labels] + std * noise).to(torch.float32)
        self.num_classes, self.channels, self.resolution = n_modes, None, None
        self.data_shape = (2,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.points[index], int(self.labels[index])


class CIFAR10Dataset(_FlipDoubled):
    """torchvision CIFAR-10 as [3, R, R] in [-1, 1]; only downloads when asked to."""

    def __init__(self, root: Optional[str | Path] = None, train: bool = True, download: bool = False,
                 hflip: bool = False, resolution: int = 32) -> None:
        from torchvision.datasets import CIFAR10

        root = Path(root) if root is not None else DEFAULT_DATA_ROOT / "cifar10"
        folder = root / CIFAR10.base_folder
        if not download and not folder.is_dir():
            raise FileNotFoundError(f"CIFAR-10 not found: looked for {folder}. Pass download=True to fetch it "
                                    f"into {root}, or root=... pointing at the folder that holds "
                                    f"{CIFAR10.base_folder}/")
        ds = CIFAR10(str(root), train=train, download=download)
        self.images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]
        self.labels = torch.as_tensor(ds.targets).long()
        self._n, self.hflip = len(self.labels), hflip
        self.num_classes, self.channels, self.resolution = 10, 3, int(resolution)
        self.data_shape = (3, self.resolution, self.resolution)

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].to(torch.float32) / 127.5 - 1.0
        return _resize(x[None], self.resolution)[0], int(self.labels[i])


def _images_under(folder: Path) -> list[Path]:
    """Image files below folder (recursive, sorted, hidden entries skipped)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ImageFolderDataset(_FlipDoubled):
    """Images under root: resized (shorter side) and centre-cropped to resolution; labels from subfolders."""

    def __init__(self, root: str | Path, resolution: int, channels: int = 3, hflip: bool = False,
                 class_subfolders: Optional[bool] = None, validate: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a directory)")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        top = [p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        subdirs = sorted(d for d in self.root.iterdir()
                         if d.is_dir() and not d.name.startswith(".") and _images_under(d))
        if class_subfolders is None:  # auto: classes when every image sits in a subfolder
            class_subfolders = bool(subdirs) and not top
        if class_subfolders:
            if top:
                raise ValueError(f"class_subfolders=True but {len(top)} image(s) lie directly in {self.root} "
                                 f"(e.g. {sorted(top)[0].name}); move them into a class folder")
            self.class_names = [d.name for d in subdirs]
            pairs = [(p, k) for k, d in enumerate(subdirs) for p in _images_under(d)]
        else:
            self.class_names = []
            pairs = [(p, 0) for p in _images_under(self.root)]
        if not pairs:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.paths = [p for p, _ in pairs]
        self.labels = [k for _, k in pairs]
        self._n, self.hflip = len(self.paths), hflip
        self.num_classes, self.channels, self.resolution = len(self.class_names), channels, int(resolution)
        self.data_shape = (channels, self.resolution, self.resolution)
        if validate:  # decode everything now, so a bad file fails at start-up rather than mid-training
            for p in self.paths:
                self._load(p)

    def _load(self, path: Path) -> torch.Tensor:
        """Decode, resize the shorter side, centre-crop, scale to [-1, 1]; names the file on failure."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")  # forces a full decode
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UnreadableImageError(f"cannot read image {path}: {e}") from e
        im = TF.resize(im, self.resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
        im = TF.center_crop(im, [self.resolution, self.resolution])
        return TF.pil_to_tensor(im).to(torch.float32) / 127.5 - 1.0

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        return self._load(self.paths[i]), self.labels[i]


class HFImageDataset(_FlipDoubled):
    """A Hugging Face ``datasets`` image dataset: a ``save_to_disk`` folder, a script-free data folder or a cached Hub id.

    The image column is the first ``Image`` feature (or ``image_column``); labels come from a
    ``ClassLabel`` feature (or ``label_column``; ``label_column=""`` for none). Images are resized on the
    shorter side, centre-cropped and scaled to [-1, 1] like ``folder``. Nothing is downloaded: Hub ids
    must already be in the local Hugging Face cache (``HF_DATASETS_OFFLINE=1`` is set while loading).
    """

    def __init__(self, root: str | Path, resolution: int, split: str = "train", image_column: Optional[str] = None,
                 label_column: Optional[str] = None, channels: int = 3, hflip: bool = False):
        try:
            import datasets
        except ImportError as e:
            raise ValueError("data.name=hf needs the 'datasets' package: pip install 'unified-diffusion[hf]' "
                             "(or pip install datasets)") from e
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        ds = self._open(datasets, str(root), split)
        feats = ds.features
        if image_column is None:
            image_column = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        if image_column not in feats:
            raise ValueError(f"hf dataset {str(root)!r}: no image column {image_column!r}; columns: {list(feats)} "
                             f"(set data.options.image_column)")
        if label_column is None:
            label_column = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), "")
        if label_column and label_column not in feats:
            raise ValueError(f"hf dataset {str(root)!r}: no label column {label_column!r}; columns: {list(feats)}")
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        if label_column:
            feat = feats[label_column]
            labels = ds[label_column]
            self.num_classes = int(feat.num_classes) if isinstance(feat, datasets.ClassLabel) else int(max(labels)) + 1
            self.class_names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else []
        else:
            self.num_classes, self.class_names = 0, []
        self._n, self.hflip, self.channels, self.resolution = len(ds), hflip, channels, int(resolution)
        if self._n == 0:
            raise ValueError(f"hf dataset {str(root)!r} split {split!r} is empty")
        self.data_shape = (channels, self.resolution, self.resolution)

    @staticmethod
    def _open(datasets, root: str, split: str):
        import os

        path = Path(root).expanduser()
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        else:
            if not path.exists() and root.count("/") != 1:
                raise FileNotFoundError(f"hf dataset {root!r}: no such folder, and not a Hub id (owner/name)")
            import huggingface_hub.constants as hub_constants

            # never download: a Hub id must already be cached (the flags are read at import, so set the modules')
            flags = [(datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                     (hub_constants, "HF_HUB_OFFLINE")]
            saved = [(mod, name, getattr(mod, name)) for mod, name in flags if hasattr(mod, name)]
            old_env = os.environ.get("HF_DATASETS_OFFLINE")
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            for mod, name, _ in saved:
                setattr(mod, name, True)
            try:
                ds = datasets.load_dataset(str(path) if path.exists() else root, split=split)
            except Exception as e:  # not cached, no data files...: say what was tried
                raise FileNotFoundError(f"hf dataset {root!r} split {split!r} could not be loaded offline "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
            finally:
                for mod, name, value in saved:
                    setattr(mod, name, value)
                if old_env is None:
                    os.environ.pop("HF_DATASETS_OFFLINE", None)
                else:
                    os.environ["HF_DATASETS_OFFLINE"] = old_env
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"hf dataset {root!r} has no split {split!r}; splits: {list(ds)}")
            ds = ds[split]
        return ds

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        row = self.ds[i]
        im = row[self.image_column].convert("RGB" if self.channels == 3 else "L")
        im = TF.resize(im, self.resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
        im = TF.center_crop(im, [self.resolution, self.resolution])
        label = int(row[self.label_column]) if self.label_column else 0
        return TF.pil_to_tensor(im).to(torch.float32) / 127.5 - 1.0, label


# ---- registry -----------------------------------------------------------------------------------

def _no_root(name: str, root: Optional[str | Path]) -> None:
    if root is not None:
        raise ValueError(f"dataset {name!r} is generated/bundled and takes no root (got {root!r})")


def _digits(root: Optional[str | Path], resolution: Optional[int], **kw: Any) -> DigitsDataset:
    _no_root("digits", root)
    return DigitsDataset(resolution=resolution or 8, **kw)


def _gmm2d(root: Optional[str | Path], resolution: Optional[int], **kw: Any) -> RingGMMDataset:
    _no_root("gmm2d", root)
    if resolution is not None:
        raise ValueError(f"gmm2d holds 2-D points, not images; resolution must be None (got {resolution})")
    return RingGMMDataset(**kw)


def _cifar10(root: Optional[str | Path], resolution: Optional[int], **kw: Any) -> CIFAR10Dataset:
    return CIFAR10Dataset(root=root, resolution=resolution or 32, **kw)


def _folder(root: Optional[str | Path], resolution: Optional[int], **kw: Any) -> ImageFolderDataset:
    if root is None or resolution is None:
        raise ValueError(f"the folder dataset needs root=... and resolution=... (got root={root!r}, "
                         f"resolution={resolution!r})")
    return ImageFolderDataset(root, resolution, **kw)


def _hf(root: Optional[str | Path], resolution: Optional[int], **kw: Any) -> HFImageDataset:
    if root is None or resolution is None:
        raise ValueError(f"the hf dataset needs root=... (a save_to_disk folder, a data folder or a cached Hub id) and "
                         f"resolution=... (got root={root!r}, resolution={resolution!r})")
    return HFImageDataset(root, resolution, **kw)


DATASETS: dict[str, Callable[..., Dataset]] = {"digits": _digits, "gmm2d": _gmm2d, "cifar10": _cifar10,
                                                "folder": _folder, "hf": _hf}


def build_dataset(name: str = DEFAULT_DATASET, root: Optional[str | Path] = None,
                  resolution: Optional[int] = None, **kw: Any) -> Dataset:
    """Build a dataset by name ('digits', 'gmm2d', 'cifar10', 'folder', 'hf'); extra kwargs go to its class."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {sorted(DATASETS)}")
    return DATASETS[name](root, resolution, **kw)
