"""FID/KID plumbing on small images with a deterministic extractor, and the offline digits measures."""

import json

import numpy as np
import pytest
from PIL import Image

from diffusion import metrics as M


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder (reference stats, classifier, Inception)."""
    monkeypatch.setenv("UD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UD_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Single-threaded numpy BLAS: with two test workers on two shared cores, threaded sqrtm/KID
    matmuls oversubscribe and run ~20x slower (conftest limits torch's threads only)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def smooth_images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Random smooth RGB images (bicubic upsampling of 4x4 noise), uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    small = (rng.random((n, 4, 4, 3)) * 255).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small])


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    return folder


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(tmp_path):
    base = smooth_images(120, seed=0)
    ref = write_folder(tmp_path / "ref", base)
    rng = np.random.default_rng(1)
    fids, kids = [], []
    for std in (0, 8, 24, 64):
        noisy = np.clip(base + rng.normal(0, std, base.shape), 0, 255).astype(np.uint8) if std else base
        rec = M.fid_kid(write_folder(tmp_path / f"n{std}", noisy), str(ref), features="randconv")
        fids.append(rec["fid"])
        kids.append(rec["kid"])
        assert rec["num_images"] == 120 and rec["reference"]["num_images"] == 120
    assert abs(fids[0]) < 1e-6
    assert all(a < b for a, b in zip(fids, fids[1:])), fids  # strictly increasing with the noise
    # KID is unbiased, so identical sets give +-estimator noise; heavy noise must stand out clearly
    assert abs(kids[0]) < 1e-3 and kids[-1] > kids[2] and kids[-1] > 10 * abs(kids[0])
    assert "50000" in rec["note"] and "not Inception FID" in rec["note"]


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a = M.FeatureStats(np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 0.25]))
    b = M.FeatureStats(np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 1.0]))
    # |mu_a - mu_b|^2 + sum (sqrt(va) - sqrt(vb))^2 for commuting covariances
    expected = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2)
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_reference_stats_are_cached_and_reusable_as_npz(tmp_path):
    ref = write_folder(tmp_path / "ref", smooth_images(40, seed=2))
    samples = write_folder(tmp_path / "s", smooth_images(40, seed=3))
    rec = M.fid_kid(samples, str(ref), features="randconv")
    cached = list((tmp_path / "cache" / "fid_stats").glob("*_randconv_custom.npz"))
    assert len(cached) == 1 and rec["reference"]["sha256"][:32] in cached[0].name
    again = M.fid_kid(samples, str(cached[0]), features="randconv")  # the stats file as --ref
    assert again["fid"] == pytest.approx(rec["fid"], rel=1e-12) and again["kid"] == pytest.approx(rec["kid"])


def test_samples_manifest_selects_the_images(tmp_path):
    folder = write_folder(tmp_path / "s", smooth_images(6, seed=4))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "grid.png")  # not a sample
    (folder / "samples.json").write_text(json.dumps({"files": [f"{i:04d}.png" for i in range(6)]}))
    assert [f.name for f in M.list_images(folder)] == [f"{i:04d}.png" for i in range(6)]


def test_bad_folders_and_references_raise_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        M.list_images(tmp_path / "empty")
    mixed = write_folder(tmp_path / "mixed", smooth_images(3, seed=5))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "small.png")
    with pytest.raises(ValueError, match="different sizes.*16x16: 3 image.*8x8: 1 image"):
        M.list_images(mixed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.list_images(tmp_path / "nowhere")
    samples = write_folder(tmp_path / "s", smooth_images(5, seed=6))
    with pytest.raises(FileNotFoundError, match="reference 'missing_ref' not found"):
        M.fid_kid(samples, "missing_ref", features="randconv")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="lack \\['mu', 'sigma'\\]"):
        M.fid_kid(samples, str(tmp_path / "bad.npz"), features="randconv")
    M.FeatureStats(np.zeros(3), np.eye(3)).save(tmp_path / "dim3.npz")
    with pytest.raises(ValueError, match="128-D randconv features.*3-D statistics"):
        M.fid_kid(samples, str(tmp_path / "dim3.npz"), features="randconv")
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        M.get_features("nope")


def test_missing_inception_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("UD_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="UD_INCEPTION_WEIGHTS.*--inception PATH"):
        M.get_features("inception")
    monkeypatch.delenv("UD_INCEPTION_WEIGHTS")
    # nothing cached and the download fails (a closed local port stands in for no network)
    import cleanfid.downloads_helper as dh

    monkeypatch.setattr(dh, "inception_url", "http://127.0.0.1:9/inception-2015-12-05.pt")
    with pytest.raises(FileNotFoundError, match="could not be downloaded.*--inception PATH"):
        M.resolve_inception()
    assert not list((tmp_path / "cache" / "inception").glob("*.pt"))  # no half-written weights left behind


def test_plugin_feature_extractor(tmp_path):
    ex = M.get_features("diffusion.metrics:_pixels")
    assert ex.name == "pixels"
    samples = write_folder(tmp_path / "s", smooth_images(8, seed=7, size=4))
    feats = M.image_features(M.list_images(samples), ex)
    assert feats.shape == (8, 48) and feats.min() >= 0 and feats.max() <= 1


# ---- digits ---------------------------------------------------------------------------------------


def test_digits_measures_separate_real_digits_from_noise():
    x, _ = M.digits_reference()
    real = M.digits_metrics(x[::2])
    noise = M.digits_metrics(np.random.default_rng(0).random((500, 64)))
    assert real["pixel_frechet_distance_8x8"] < 0.5 < 5 < noise["pixel_frechet_distance_8x8"]
    assert real["digits_classifier_score"] > 6 > 3 > noise["digits_classifier_score"]
    assert real["digits_mean_confidence"] > 0.85 and sum(real["digits_class_histogram"]) == len(x[::2])
    assert real["classifier"]["heldout_accuracy"] > 0.9


def test_digits_folder_at_16px_downsamples_exactly(tmp_path):
    x, _ = M.digits_reference()
    imgs = np.round(x[:20].reshape(-1, 8, 8) * 255).astype(np.uint8)
    up = imgs.repeat(2, axis=1).repeat(2, axis=2)  # nearest 2x: the 8x8 box filter inverts it exactly
    folder = write_folder(tmp_path / "d", up)
    px = M.to_digits_pixels(M.load_images(M.list_images(folder), mode="L"))
    assert np.allclose(px, imgs.reshape(-1, 64) / 255.0, atol=1e-6)
    rec = M.digits_metrics_folder(folder)
    assert rec["image_size"] == [16, 16] and rec["num_images"] == 20


def test_named_digits_reference_is_the_dataset(tmp_path):
    x, _ = M.digits_reference()
    px = np.round(x.reshape(-1, 8, 8) * 255).astype(np.uint8)
    folder = write_folder(tmp_path / "some", px[:30])
    rec = M.fid_kid(folder, "digits", features="randconv", kid=False)
    assert rec["reference"]["num_images"] == len(x) and rec["num_images"] == 30 and rec["fid"] > 0
    exported = sorted((tmp_path / "cache" / "datasets" / "digits-all-8px-png").glob("*.png"))
    assert len(exported) == len(x)  # the exported reference holds exactly the dataset's pixels
    assert all(np.array_equal(np.asarray(Image.open(exported[i])), px[i]) for i in (0, 1, 500, len(x) - 1))
