"""Trackers through accelerate's log_with: TensorBoard offline gets scalars, the preview grid and the config."""

import glob
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffusion.config import ConfigError
from diffusion.trackers import check_log_with, hyperparameters

ROOT = Path(__file__).resolve().parents[1]


def train_cli():
    spec = importlib.util.spec_from_file_location("train_cli_trackers", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tensorboard_gets_scalars_images_and_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert train_cli().main(["--config", str(ROOT / "configs/gmm2d.yaml"), "train.steps=4", "train.log_every=2",
                             "preview.n=16", "preview.nfe=4", f"run_dir={run}", "train.cpu_threads=1"]) == 0
    events = sorted(glob.glob(str(run / "tensorboard" / "events.*")))
    assert len(events) == 1
    ea = EventAccumulator(events[0], size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [2, 4]
    (img,) = ea.Images("samples")
    png = np.asarray(Image.open(run / "samples.png").convert("RGB"))
    assert img.step == 4 and (img.height, img.width) == png.shape[:2]
    # the resolved config as hyperparameters: accelerate writes them next to an hparams event
    (hp,) = glob.glob(str(run / "tensorboard" / "*" / "hparams.yml"))
    logged = yaml.safe_load(Path(hp).read_text())
    assert logged["train.steps"] == 4 and logged["model.kind"] == "mlp" and logged["name"] == "gmm2d"
    tagged = []  # and as TensorBoard's HPARAMS plugin data in an event file of its own
    for f in glob.glob(str(run / "tensorboard" / "*" / "events.*")):
        ea = EventAccumulator(f)
        ea.Reload()
        try:
            tagged += list(ea.PluginTagToContent("hparams"))
        except KeyError:  # an event file without the plugin
            pass
    assert tagged, "no hparams event"


@pytest.mark.parametrize("value,message", [("wandbb", "is not a tracker; valid: ["), ("tensorboard,nope", "'nope'")])
def test_bad_tracker_names_one_line(value, message):
    with pytest.raises(ConfigError) as e:
        check_log_with(value)
    assert message in str(e.value) and "installed here: [" in str(e.value) and "\n" not in str(e.value)


def test_tracker_names_and_flat_hyperparameters():
    assert check_log_with("none") is None and check_log_with("tensorboard") == ["tensorboard"]
    from diffusion.config import load_config

    hp = hyperparameters(load_config(ROOT / "configs/digits_unet.yaml"))
    assert hp["optim.betas"] == "[0.9, 0.999]" and hp["train.log_with"] == "tensorboard"
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())


def test_train_rejects_an_unknown_tracker_before_writing(tmp_path, capsys):
    assert train_cli().main(["--config", str(ROOT / "configs/gmm2d.yaml"), "train.log_with=wandbb",
                             f"run_dir={tmp_path / 'r'}"]) == 2
    assert "train.log_with='wandbb'" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_sid_logs_losses_and_samples_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill.common import load_teacher, prefit
    from distill.sid import train_sid
    from test_sid import TINY_PREFIT, quick_cfg

    teacher = load_teacher("oracle:ring2d")
    init = prefit(teacher, TINY_PREFIT, tmp_path / "cache", log=lambda s: None)
    train_sid(teacher, tmp_path / "run", quick_cfg(), init=init, progress=False, log=lambda s: None)
    (events,) = glob.glob(str(tmp_path / "run" / "tensorboard" / "events.*"))
    ea = EventAccumulator(events, size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss_gen")] == [2, 4, 6] and ea.Images("samples")[0].step == 6
    (hp,) = glob.glob(str(tmp_path / "run" / "tensorboard" / "*" / "hparams.yml"))
    assert yaml.safe_load(Path(hp).read_text())["kind"] == "generator"


def _events(folder):
    """Scalars and hparams.yml that a distiller's RunTrackers wrote under ``folder/tensorboard``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(folder / "tensorboard" / "events.*"))
    ea = EventAccumulator(events, size_guidance={"scalars": 0})
    ea.Reload()
    (hp,) = glob.glob(str(folder / "tensorboard" / "*" / "hparams.yml"))
    return ea, yaml.safe_load(Path(hp).read_text())


def test_distill_grid_logs_every_evaluation_and_the_final_grid(tmp_path, capsys):
    import distill.__main__ as distill_cli
    from distill.grid import load_grid

    out = tmp_path / "g.json"
    args = ["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--n-train", "16", "--n-val", "8", "--max-evals", "2",
            "--rtol", "1e-5", "--no-progress"]
    assert distill_cli.main(args + ["--out", str(out)]) == 0
    fit = load_grid(out)
    ea, hp = _events(tmp_path / "g.logs")  # the default folder: next to --out
    mse = ea.Scalars("mse")
    assert [e.step for e in mse] == list(range(1, len(fit.history) + 1))
    np.testing.assert_allclose([e.value for e in mse], fit.history, rtol=1e-6)
    grid = [ea.Scalars(f"final/grid_{i}")[0].value for i in range(fit.grid.numel())]
    np.testing.assert_allclose(grid, fit.grid.tolist(), rtol=1e-6)
    assert hp["nfe"] == 3 and hp["sampler"] == "ipndm" and hp["init_grid"] == str(fit.meta["init_grid"])
    # a used log folder is refused (one line, status 2) unless --overwrite; 'none' writes no folder
    assert distill_cli.main(args + ["--out", str(tmp_path / "h.json"), "--log-dir", str(tmp_path / "g.logs")]) == 2
    assert "--log-dir" in capsys.readouterr().err and not (tmp_path / "h.json").exists()
    assert distill_cli.main(args + ["--out", str(tmp_path / "h.json"), "--log-dir", str(tmp_path / "g.logs"),
                                    "--overwrite"]) == 0  # replaces the old events: one event file again
    assert len(_events(tmp_path / "g.logs")[0].Scalars("mse")) == len(load_grid(tmp_path / "h.json").history)
    assert distill_cli.main(args + ["--out", str(tmp_path / "n.json"), "--log-with", "none"]) == 0
    assert not (tmp_path / "n.logs").exists()


def test_distill_amed_logs_every_predictor_iteration(tmp_path):
    import distill.__main__ as distill_cli
    import samplers

    out = tmp_path / "p.safetensors"
    assert distill_cli.main(["amed", "--teacher", "oracle:ring2d", "--nfe", "4", "--no-afs", "--n-train", "16",
                             "--iters", "3", "--no-progress", "--out", str(out), "--log-dir", str(tmp_path / "L")]) == 0
    meta = samplers.load_predictor(out).meta
    ea, hp = _events(tmp_path / "L")
    loss = ea.Scalars("weighted_l2")
    assert [e.step for e in loss] == [0, 1, 2]
    np.testing.assert_allclose(loss[-1].value, meta["final_loss"], rtol=1e-6)
    assert ea.Scalars("final_mse_after_predictor")[0].step == 3
    grid = [ea.Scalars(f"final/grid_{i}")[0].value for i in range(len(meta["grid"]))]
    np.testing.assert_allclose(grid, meta["grid"], rtol=1e-6)
    assert hp["iters"] == 3 and hp["afs"] is False and hp["grid"] == str(meta["grid"])
    assert not (tmp_path / "p.logs").exists()
