"""Sample-quality metrics: FID / KID through clean-fid, plus offline measures for the digits data.

FID and KID use clean-fid's pieces (folder loading and resizing, the TorchScript Inception, the
Frechet and kernel distances); this module adds what clean-fid leaves to the caller:

* reference statistics cached in a folder the project controls (``$UD_CACHE/fid_stats``, default
  ``~/.cache/unified-diffusion/fid_stats``), keyed by the reference's content hash and extractor;
* offline Inception weights (``--inception PATH`` / ``UD_INCEPTION_WEIGHTS``) with a clear error
  when they can neither be found nor fetched;
* pluggable feature extractors (``--features``): a small deterministic random CNN and raw pixels
  for tests and smoke checks, or ``module:function`` for your own;
* checks on the sample folder: no images, or images of different sizes, is an error.

Published FID numbers use 50,000 generated images (EDM: best of 3 seeds); FID on fewer images is
biased upwards and is only comparable at equal counts, so every record states its image count.

The digits measures (``digits_metrics``) are *not* FID: a Frechet distance between pixel
statistics at 8x8 and a score from a scikit-learn digit classifier.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
import urllib.error
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.linalg
import torch
from PIL import Image

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
PUBLISHED_NUM_IMAGES = 50_000


# ---- cache -----------------------------------------------------------------------------------------


def cache_dir(*parts: str) -> Path:
    """The project's cache folder ($UD_CACHE or ~/.cache/unified-diffusion), created on demand."""
    root = Path(os.environ.get("UD_CACHE") or Path.home() / ".cache" / "unified-diffusion")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Sequence[Path], root: Path) -> str:
    """Hex sha256 over (relative path, content hash) of every file: a folder's identity."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(Path(f).relative_to(root)).encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


# ---- image folders ---------------------------------------------------------------------------------


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a samples folder: those named in its samples.json, else every image file.

    Raises a clear error for a missing folder, an empty one, or images of different sizes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder {str(folder)!r} does not exist or is not a directory")
    manifest = folder / "samples.json"
    if manifest.is_file():
        # sample.py lists its images: a grid PNG or other files in the folder must not be scored
        names = json.loads(manifest.read_text()).get("files") or []
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) named in {manifest} are missing, e.g. {missing[:3]}")
    else:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images in {str(folder)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    sizes: dict[tuple[int, int], list[str]] = {}
    for f in files:
        with Image.open(f) as im:  # reads the header only
            sizes.setdefault(im.size, []).append(f.name)
    if len(sizes) > 1:
        desc = "; ".join(f"{w}x{h}: {len(v)} image(s), e.g. {v[0]}" for (w, h), v in sizes.items())
        raise ValueError(f"images in {str(folder)!r} have different sizes ({desc}); FID needs one size")
    return files


def load_images(files: Sequence[Path], mode: str = "RGB") -> np.ndarray:
    """Images as a uint8 array [N, H, W, C] (C=3 for RGB, 1 for L)."""
    arr = np.stack([np.asarray(Image.open(f).convert(mode)) for f in files])
    return arr[..., None] if arr.ndim == 3 else arr


# ---- feature extractors ----------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """``fn`` maps a float batch [B, 3, H, W] with values in [0, 255] to features [B, F]."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    resize: Optional[Callable[[np.ndarray], np.ndarray]] = None  # HWC uint8 -> HWC; None: clean-fid's 299 bicubic
    mode: str = "clean"  # clean-fid preprocessing mode recorded with the result
    info: dict = field(default_factory=dict)


def _keep_size(img: np.ndarray) -> np.ndarray:
    """clean-fid resizer that keeps the image as is (float32, values in [0, 255])."""
    return img.astype(np.float32)


class RandomConvFeatures(torch.nn.Module):
    """A fixed random CNN (seeded weights): deterministic, offline, size-agnostic features for tests.

    Not a perceptual metric: use it to check plumbing and monotonicity, never to report quality.
    """

    def __init__(self, width: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, width, 3, stride=2, padding=1)
        for conv in (self.c1, self.c2):
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in)
            conv.bias.data.zero_()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.relu(self.c1(x / 127.5 - 1))
        h2 = torch.relu(self.c2(h1))
        # means and standard deviations of both layers: first and second moments of local features
        return torch.cat([h1.mean((2, 3)), h1.std((2, 3)), h2.mean((2, 3)), h2.std((2, 3))], dim=1)


def resolve_inception(path: Optional[str | Path] = None) -> Path:
    """Find the clean-fid Inception weights: ``path``, $UD_INCEPTION_WEIGHTS, the cache, or download.

    Raises FileNotFoundError naming every place looked at and how to provide the file.
    """
    from cleanfid.downloads_helper import inception_url

    how = (f"Download {inception_url} on a machine with network access and pass --inception PATH "
           f"(or set UD_INCEPTION_WEIGHTS=PATH).")
    given = path or os.environ.get("UD_INCEPTION_WEIGHTS")
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            src = "--inception" if path else "UD_INCEPTION_WEIGHTS"
            raise FileNotFoundError(f"Inception weights not found at {str(p)!r} (from {src}). {how}")
        return p
    cached = cache_dir("inception") / INCEPTION_FILE
    if cached.is_file():
        return cached
    try:  # download to a temporary name first: an interrupted download must not look like weights
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            from cleanfid.downloads_helper import check_download_inception

            shutil.move(check_download_inception(fpath=tmp), cached)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FileNotFoundError(f"Inception weights ({INCEPTION_FILE}, clean-fid's TorchScript Inception-v3) are "
                                f"not in the cache {str(cached.parent)!r} and could not be downloaded ({e}). {how}") from e
    return cached


def inception_features(path: Optional[str | Path] = None, device: str | torch.device = "cpu",
                       mode: str = "clean") -> FeatureExtractor:
    """clean-fid's Inception-v3 pool features (2048-D), from local weights if given.

    ``mode="clean"``: PIL bicubic resize to 299 outside the network; ``"legacy_tensorflow"``: the
    native-size image goes in and the network resizes it as TensorFlow's FID code did (EDM's fid.py).
    """
    from cleanfid.inception_torchscript import InceptionV3W

    weights = resolve_inception(path)
    folder = weights.parent
    if weights.name != INCEPTION_FILE:  # InceptionV3W loads <folder>/inception-2015-12-05.pt
        folder = cache_dir("inception", "linked", hashlib.sha256(str(weights.resolve()).encode()).hexdigest()[:16])
        link = folder / INCEPTION_FILE
        if not link.exists():
            link.symlink_to(weights.resolve())
    legacy = mode == "legacy_tensorflow"
    try:
        model = InceptionV3W(str(folder), download=False, resize_inside=legacy).to(device).eval()
    except (RuntimeError, ValueError, OSError) as e:  # a truncated or foreign file: name it, no traceback
        raise ValueError(f"Inception weights {str(weights)!r} cannot be loaded as clean-fid's TorchScript "
                         f"Inception ({INCEPTION_FILE}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return FeatureExtractor("inception", lambda x: model(x.to(device)), _keep_size if legacy else None, mode,
                            {"weights": str(weights), "weights_sha256": sha256_file(weights)})


def _random_conv(device: str | torch.device = "cpu", **_) -> FeatureExtractor:
    net = RandomConvFeatures().to(device)
    return FeatureExtractor("randconv", lambda x: net(x.to(device)), _keep_size, "custom",
                            {"what": "fixed random 2-layer CNN (seed 0), feature moments; not perceptual"})


def _pixels(device: str | torch.device = "cpu", **_) -> FeatureExtractor:
    return FeatureExtractor("pixels", lambda x: x.flatten(1) / 255.0, _keep_size, "custom",
                            {"what": "raw pixel values in [0, 1]"})


FEATURES: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": lambda device="cpu", inception=None, mode="clean": inception_features(inception, device, mode),
    "randconv": _random_conv,
    "pixels": _pixels,
}


def get_features(name: str = "inception", *, inception: Optional[str | Path] = None,
                 device: str | torch.device = "cpu", mode: str = "clean") -> FeatureExtractor:
    """A feature extractor by name, or ``module:factory`` where ``factory(device=...)`` returns a FeatureExtractor."""
    if name in FEATURES:
        return FEATURES[name](device=device, inception=inception, mode=mode)
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import feature extractor factory {name!r} ({e})") from e
        made = factory(device=device)
        if not isinstance(made, FeatureExtractor):
            raise ValueError(f"{name}(device=...) returned {type(made).__name__}; expected a "
                             f"diffusion.metrics.FeatureExtractor")
        return made
    raise ValueError(f"unknown feature extractor {name!r}; valid: {sorted(FEATURES)} or 'module:factory'")


def image_features(files: Sequence[Path], extractor: FeatureExtractor, batch_size: int = 64,
                   device: str | torch.device = "cpu", progress: bool = False, desc: str = "") -> np.ndarray:
    """Features [N, F] of image files through clean-fid's loader (resize, uint8 -> float)."""
    from cleanfid.fid import get_files_features

    feats = get_files_features([str(f) for f in files], model=extractor.fn, num_workers=0, batch_size=batch_size,
                               device=torch.device(device), mode="clean", custom_fn_resize=extractor.resize,
                               description=desc, verbose=progress)
    feats = np.asarray(feats, dtype=np.float64)
    bad = int((~np.isfinite(feats)).any(axis=1).sum())
    if bad:
        raise FloatingPointError(f"{bad} of {len(files)} images gave non-finite {extractor.name} features")
    return feats


# ---- statistics and distances ----------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Mean and covariance of features (clean-fid's ``mu``/``sigma``) and, for KID, the features."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: Optional[np.ndarray] = None

    @classmethod
    def of(cls, feats: np.ndarray) -> "FeatureStats":
        """Statistics of a feature matrix [N, F]."""
        if feats.shape[0] < 2:
            raise ValueError(f"need at least 2 images for a covariance; got {feats.shape[0]}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats)

    @property
    def count(self) -> Optional[int]:
        """How many images the statistics came from (None when only mu/sigma are stored)."""
        return None if self.feats is None else int(self.feats.shape[0])

    def save(self, path: Path) -> None:
        """Write an npz with clean-fid's keys (mu, sigma) plus feats when known."""
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.feats is not None:
            arrays["feats"] = self.feats
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "FeatureStats":
        """Read an npz with mu and sigma (and optionally feats); never unpickles."""
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise ValueError(f"reference statistics {str(path)!r} lack {missing}; expected an npz with "
                                 f"'mu' [F] and 'sigma' [F, F] (clean-fid format), optional 'feats' [N, F]")
            return cls(z["mu"], z["sigma"], z["feats"] if "feats" in z.files else None)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (clean-fid's formula)."""
    from cleanfid.fid import frechet_distance as fd

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]} (statistics from "
                         f"different feature extractors?)")
    with warnings.catch_warnings():
        # sqrtm warns on singular products (few images, constant pixels); clean-fid then retries
        # with a diagonal offset when the result is not finite, so the warning is noise here
        warnings.simplefilter("ignore", category=scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)  # clean-fid passes sqrtm's old `disp`
        return float(fd(a.mu, a.sigma, b.mu, b.sigma))


def kernel_distance(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """KID (cubic polynomial kernel MMD, clean-fid's estimator) with a fixed subset seed."""
    from cleanfid.fid import kernel_distance as kd

    state = np.random.get_state()  # clean-fid draws subsets from numpy's global RNG
    try:
        np.random.seed(seed)
        return float(kd(a, b))
    finally:
        np.random.set_state(state)


# ---- references ------------------------------------------------------------------------------------

# name -> (dataset, split, clean-fid statistics resolution or None when clean-fid publishes none)
NAMED_REFERENCES = {"cifar10-train": ("cifar10", "train", 32), "cifar10-test": ("cifar10", "test", 32),
                    "digits": ("digits", "all", None)}


@dataclass
class Reference:
    """Reference statistics with where they came from."""

    stats: FeatureStats
    name: str
    sha256: str
    num_images: Optional[int]


def _cached_stats(key: str, compute: Callable[[], FeatureStats]) -> FeatureStats:
    path = cache_dir("fid_stats") / f"{key}.npz"
    if path.is_file():
        return FeatureStats.load(path)
    stats = compute()
    stats.save(path)
    return stats


def _cleanfid_stats(dataset: str, res: int, split: str) -> tuple[FeatureStats, str]:
    """clean-fid's published Inception statistics, downloaded once into our cache."""
    from cleanfid.downloads_helper import check_download_url

    folder = cache_dir("fid_stats", "cleanfid")
    out = {}
    for suffix in ("", "_kid"):
        url = f"{CLEANFID_STATS_URL}/{dataset}_clean_{split}_{res}{suffix}.npz"
        try:
            out[suffix] = Path(check_download_url(local_folder=str(folder), url=url))
        except (urllib.error.URLError, OSError) as e:
            raise FileNotFoundError(f"reference statistics for {dataset}-{split} are not cached in {str(folder)!r} and "
                                    f"could not be downloaded from {url} ({e}); put the file there, or pass "
                                    f"--ref DIR (reference images) or --ref stats.npz") from e
    stats = FeatureStats.load(out[""])
    with np.load(out["_kid"], allow_pickle=False) as z:
        stats.feats = z["feats"]
    return stats, sha256_file(out[""])


def _dataset_folder(dataset: str, split: str, resolution: int) -> Path:
    """A project dataset (diffusion.data) written out once as PNGs under the cache, at ``resolution``."""
    from .data import build_dataset

    folder = cache_dir("datasets", f"{dataset}-{split}-{resolution}px-png")
    if (folder / "complete").is_file():
        return folder
    if dataset == "cifar10":
        root = cache_dir("datasets", "cifar10")
        try:
            ds = build_dataset("cifar10", root=root, resolution=resolution, train=split == "train", download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError offline
            raise FileNotFoundError(f"CIFAR-10 is not in {str(root)!r} and could not be downloaded ({e}); put the "
                                    f"extracted cifar-10-batches-py/ there, or pass --ref DIR / --ref stats.npz") from e
    else:
        ds = build_dataset(dataset, resolution=resolution)
    for i in range(len(ds)):
        x = ds[i][0]
        save = (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(save[..., 0] if save.shape[-1] == 1 else save).save(folder / f"{i:06d}.png")
    (folder / "complete").write_text(f"{len(ds)}\n")  # an interrupted export is redone, not reused
    return folder


def reference(ref: str, extractor: FeatureExtractor, *, resolution: int, batch_size: int = 64,
              device: str | torch.device = "cpu", progress: bool = False) -> Reference:
    """Resolve ``--ref``: a named dataset (cifar10-train, digits), a folder of images, or a stats .npz.

    Named datasets are compared at the samples' ``resolution``; for Inception on CIFAR-10 at 32 px
    clean-fid's published statistics are used.
    """
    path = Path(ref).expanduser()
    if ref in NAMED_REFERENCES:
        dataset, split, published = NAMED_REFERENCES[ref]
        if extractor.name == "inception" and extractor.mode == "clean" and published == resolution:
            stats, digest = _cleanfid_stats(dataset, published, split)
            return Reference(stats, ref, digest, stats.count)
        path = _dataset_folder(dataset, split, resolution)
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"reference file {ref!r} is not an .npz of statistics (mu, sigma[, feats])")
        stats = FeatureStats.load(path)
        return Reference(stats, str(path), sha256_file(path), stats.count)
    if path.is_dir():
        files = list_images(path)
        digest = sha256_files(files, path)
        key = f"{digest[:32]}_{extractor.name}_{extractor.mode}"
        stats = _cached_stats(key, lambda: FeatureStats.of(
            image_features(files, extractor, batch_size, device, progress, desc=f"reference {path.name}")))
        return Reference(stats, ref, digest, len(files))
    raise FileNotFoundError(f"reference {ref!r} not found: expected one of {sorted(NAMED_REFERENCES)}, "
                            f"a folder of reference images, or a statistics .npz file")


# ---- FID / KID --------------------------------------------------------------------------------------


def fid_kid(samples: str | Path, ref: str, *, features: str = "inception", inception: Optional[str | Path] = None,
            batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False, kid: bool = True,
            protocol: str = "clean") -> dict:
    """FID and (unless ``kid=False``) KID of a samples folder against a reference; a JSON-ready record.

    ``protocol`` (clean | legacy-tf | edm, see fid_protocols.py) picks the Inception preprocessing and,
    for edm, reads the reference as EDM/ADM statistics.
    """
    from .fid_protocols import check_protocol, load_reference_npz

    proto = check_protocol(protocol, ref)
    files = list_images(samples)
    with Image.open(files[0]) as im:
        size = list(im.size)
    extractor = get_features(features, inception=inception, device=device, mode=proto["cleanfid_mode"])
    if protocol == "edm":
        stats = load_reference_npz(ref)
        refr = Reference(stats, str(ref), sha256_file(ref), stats.count)
    else:
        refr = reference(ref, extractor, resolution=size[0], batch_size=batch_size, device=device, progress=progress)
    stats = FeatureStats.of(image_features(files, extractor, batch_size, device, progress, desc="samples"))
    if stats.mu.shape != refr.stats.mu.shape:
        raise ValueError(f"samples give {stats.mu.shape[0]}-D {features} features but the reference {refr.name!r} "
                         f"has {refr.stats.mu.shape[0]}-D statistics (computed with another extractor?)")
    kid_value = kernel_distance(refr.stats.feats, stats.feats) if kid and refr.stats.feats is not None else None
    record = {
        "fid": frechet_distance(stats, refr.stats), "kid": kid_value,
        "protocol": proto["protocol"], "protocol_matches": proto["matches"],
        "num_images": len(files), "image_size": size,
        "features": extractor.name, "features_info": extractor.info, "cleanfid_mode": extractor.mode,
        "reference": {"name": refr.name, "sha256": refr.sha256, "num_images": refr.num_images},
        "note": (f"published FID numbers use {PUBLISHED_NUM_IMAGES} images; this record used {len(files)}"
                 + ("" if extractor.name == "inception" else f"; '{extractor.name}' features are not Inception FID")),
    }
    if kid and kid_value is None:
        record["kid_note"] = "reference statistics store no features, so KID cannot be computed"
    return record


# ---- offline digits measures -----------------------------------------------------------------------

DIGITS_SIZE = 8


def digits_reference() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as pixels in [0, 1] [N, 64] and labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)


def to_digits_pixels(images: np.ndarray) -> np.ndarray:
    """Grayscale images (uint8 [N, H, W(, C)]) -> [N, 64] in [0, 1] at 8x8 (box-filter downsampling)."""
    if images.ndim == 4:
        images = images.mean(axis=-1)
    out = []
    for im in images.astype(np.float32):
        if im.shape != (DIGITS_SIZE, DIGITS_SIZE):
            im = np.asarray(Image.fromarray(im, mode="F").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BOX))
        out.append(im.reshape(-1) / 255.0)
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float64)


@dataclass
class DigitsClassifier:
    """A multinomial logistic regression on sklearn's digits, stored as plain arrays (no pickles)."""

    coef: np.ndarray  # [10, 64]
    intercept: np.ndarray  # [10]
    heldout_accuracy: float

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities [N, 10] for pixels [N, 64] in [0, 1]."""
        logits = pixels @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def digits_classifier(retrain: bool = False) -> DigitsClassifier:
    """The cached digits classifier (trained on 80% of sklearn's digits, accuracy on the other 20%)."""
    path = cache_dir("digits") / "logreg_v1.npz"
    if path.is_file() and not retrain:
        with np.load(path, allow_pickle=False) as z:
            return DigitsClassifier(z["coef"], z["intercept"], float(z["heldout_accuracy"]))
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = digits_reference()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(xtr, ytr)
    model = DigitsClassifier(clf.coef_, clf.intercept_, float(clf.score(xte, yte)))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, coef=model.coef, intercept=model.intercept, heldout_accuracy=model.heldout_accuracy)
    tmp.replace(path)
    return model


def digits_metrics(pixels: np.ndarray) -> dict:
    """Offline quality measures for digit samples given as [N, 64] pixels in [0, 1] (see to_digits_pixels).

    * ``pixel_frechet_distance_8x8``: Frechet distance between Gaussians fitted to the samples' and
      sklearn's digits' 64 pixel values (0 for the data itself up to sampling noise);
    * ``digits_classifier_score``: exp(E KL(p(y|x) || p(y))) under a logistic-regression digit
      classifier (an Inception-Score analogue, 1 to 10: confident and class-balanced is high);
    * ``digits_mean_confidence``: mean of max_y p(y|x); ``digits_class_histogram``: argmax counts.
    """
    if pixels.ndim != 2 or pixels.shape[1] != DIGITS_SIZE**2 or pixels.shape[0] < 2:
        raise ValueError(f"digits_metrics needs [N >= 2, 64] pixels; got shape {pixels.shape}")
    ref, _ = digits_reference()
    fd = frechet_distance(FeatureStats.of(pixels), FeatureStats.of(ref))
    clf = digits_classifier()
    p = clf.proba(pixels)
    marginal = p.mean(axis=0)
    kl = (p * (np.log(p + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
    return {
        "num_images": int(pixels.shape[0]),
        "pixel_frechet_distance_8x8": fd,
        "digits_classifier_score": float(np.exp(kl.mean())),
        "digits_mean_confidence": float(p.max(axis=1).mean()),
        "digits_class_histogram": np.bincount(p.argmax(axis=1), minlength=10).tolist(),
        "classifier": {"kind": "sklearn LogisticRegression on 8x8 digits", "heldout_accuracy": clf.heldout_accuracy},
        "reference": "sklearn load_digits (1797 images)",
    }


def digits_metrics_folder(samples: str | Path) -> dict:
    """``digits_metrics`` of a samples folder (any size; downsampled to 8x8 with a box filter)."""
    files = list_images(samples)
    rec = digits_metrics(to_digits_pixels(load_images(files, mode="L")))
    with Image.open(files[0]) as im:
        rec["image_size"] = list(im.size)
    return rec


__all__ = ["cache_dir", "sha256_file", "list_images", "load_images", "FeatureExtractor", "RandomConvFeatures",
           "resolve_inception", "inception_features", "get_features", "FEATURES", "image_features",
           "FeatureStats", "frechet_distance", "kernel_distance", "Reference", "reference", "fid_kid",
           "digits_reference", "to_digits_pixels", "DigitsClassifier", "digits_classifier", "digits_metrics",
           "digits_metrics_folder", "PUBLISHED_NUM_IMAGES"]
