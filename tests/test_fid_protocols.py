"""FID protocols and the fid50k recipe, offline with stand-in feature networks (closed-form Frechet distances)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from diffusion import metrics
from diffusion.fid_protocols import PROTOCOLS, check_protocol, seed_ranges

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_for_protocols", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)


def frechet(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def write_images(folder: Path, n: int, seed: int, size: int = 4) -> np.ndarray:
    folder.mkdir(parents=True)
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    (folder / "samples.json").write_text(json.dumps({"seeds": {"start": 100, "count": n},
                                                     "files": [f"{i:06d}.png" for i in range(n)]}))
    return imgs


def edm_reference(path: Path, seed: int, n: int = 80, size: int = 4, extra_images: bool = True) -> tuple:
    feats = np.random.default_rng(seed).integers(0, 256, size=(n, size * size * 3)).astype(np.float64) / 255
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    arrays = {"mu": mu, "sigma": sigma}
    if extra_images:  # ADM's reference batches also carry the images (arr_0); they are never read
        arrays["arr_0"] = np.zeros((2, size, size, 3), dtype=np.uint8)
    np.savez(path, **arrays)
    return mu, sigma


def test_edm_protocol_reads_mu_sigma_and_records_everything(tmp_path, capsys):
    imgs = write_images(tmp_path / "s", 40, seed=1)
    mu, sigma = edm_reference(tmp_path / "ref.npz", seed=2)
    assert evaluate.main(["fid", "--samples", str(tmp_path / "s"), "--ref", str(tmp_path / "ref.npz"), "--protocol", "edm",
                          "--features", "pixels", "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out)
    feats = imgs.transpose(0, 3, 1, 2).reshape(40, -1).astype(np.float64) / 255  # the extractor sees CHW
    want = frechet(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    assert rec["fid"] == pytest.approx(want, rel=1e-6)
    assert rec["protocol"] == "edm" and "EDM" in rec["protocol_matches"] and rec["num_images"] == 40
    assert rec["reference"]["sha256"] == metrics.sha256_file(tmp_path / "ref.npz") and rec["seeds"]["start"] == 100


def test_edm_protocol_refuses_folders_pickles_and_missing_keys(tmp_path, capsys):
    write_images(tmp_path / "s", 4, seed=1)
    args = ["fid", "--samples", str(tmp_path / "s"), "--protocol", "edm", "--features", "pixels", "--no-progress", "--ref"]
    assert evaluate.main(args + [str(tmp_path / "s")]) == 2
    assert "an .npz with mu and sigma" in capsys.readouterr().err
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"x": 1}], dtype=object), sigma=np.eye(2))
    assert evaluate.main(args + [str(tmp_path / "pickled.npz")]) == 2
    assert "allow_pickle" in capsys.readouterr().err
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(48))
    assert evaluate.main(args + [str(tmp_path / "nosigma.npz")]) == 2
    assert "lacks ['sigma']" in capsys.readouterr().err


def test_protocols_pick_the_inception_preprocessing(monkeypatch):
    seen = []
    monkeypatch.setitem(metrics.FEATURES, "inception",
                        lambda device="cpu", inception=None, mode="clean": seen.append(mode) or metrics._pixels())
    for name in ("clean", "legacy-tf"):
        metrics.get_features("inception", mode=check_protocol(name, "x")["cleanfid_mode"])
    assert seen == ["clean", "legacy_tensorflow"] and PROTOCOLS["edm"]["cleanfid_mode"] == "legacy_tensorflow"
    with pytest.raises(ValueError, match="unknown --protocol 'tf'"):
        check_protocol("tf", "x")


def test_fid50k_is_one_command(tmp_path, capsys):
    from test_sample_cli import make_run

    run = make_run(tmp_path / "run")
    edm_reference(tmp_path / "ref.npz", seed=3, size=8)
    assert evaluate.main(["fid50k", "--run", str(run), "--sampler", "euler", "--nfe", "2", "--num", "6",
                          "--ref", str(tmp_path / "ref.npz"), "--features", "pixels", "--samples-dir", str(tmp_path / "k"),
                          "--no-progress", "--out", str(tmp_path / "k.json")]) == 0
    rec = json.loads((tmp_path / "k.json").read_text())
    assert [s["seeds"] for s in rec["seed_sets"]] == [[0, 5], [6, 11], [12, 17]] == [[a, a + 5] for a in seed_ranges(6)]
    fids = [s["fid"] for s in rec["seed_sets"]]
    assert rec["fid_min"] == min(fids) and rec["fid_mean"] == pytest.approx(np.mean(fids)) and len(set(fids)) == 3
    assert rec["protocol"] == "edm" and rec["num_images"] == 18
    # each set's FID is what `evaluate.py fid` gives on that folder
    assert evaluate.main(["fid", "--samples", rec["seed_sets"][1]["folder"], "--ref", str(tmp_path / "ref.npz"),
                          "--protocol", "edm", "--features", "pixels", "--no-progress", "--no-kid",
                          "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["fid"] == pytest.approx(fids[1], rel=1e-12)
