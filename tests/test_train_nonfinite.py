"""Issue 11's rule for the trainer: weights are checked finite before every checkpoint and the final save;
a run that goes non-finite stops with one line naming the step(s) and the last finite checkpoint, and
writes nothing non-finite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusion.losses
from diffusion import training
from diffusion.checkpoint import list_checkpoints
from diffusion.config import load_config
from diffusion.training import NonFiniteLossError, NonFiniteWeightsError, train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

TINY = ["data.name=gmm2d", "model.kind=mlp", "model.options={hidden: 16, depth: 1, emb_dim: 8}",
        "model.parametrization=eps", "objective.name=eps", "schedule.name=cosine", "train.batch_size=8",
        "train.tensorboard=false", "train.log_every=0", "preview.n=4", "preview.nfe=4"]
WEIGHTS = ("model.safetensors", "ema.safetensors")


def _argv(tmp: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "gmm2d.yaml"), f"run_dir={tmp / 'run'}", *TINY, *extra]


def _saved_weights(run: Path) -> list[Path]:
    """Every weights file the run wrote (final and in checkpoints)."""
    return sorted(run.rglob("*.safetensors")) if run.exists() else []


@pytest.mark.parametrize("extra", [["train.ckpt_every=1", "train.steps=3"], ["train.steps=1"]],
                         ids=["ckpt_every=1", "steps=1"])
def test_infinite_lr_stops_with_one_line_and_writes_nothing(tmp_path: Path, capsys, extra: list[str]) -> None:
    code = train_script.main(_argv(tmp_path, "optim.lr=inf", *extra))
    err = capsys.readouterr().err
    assert code != 0  # train.py maps this error to its exit code (one line, no traceback)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "step/s" not in ln]  # drop tqdm's bar
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and "Traceback" not in err, err
    assert "non-finite weights after step 1" in err and "optim.lr=inf" in err, err
    assert "Last checkpoint with finite weights: none" in err, err
    run = tmp_path / "run"
    assert not any((run / n).exists() for n in WEIGHTS)
    assert _saved_weights(run) == [] and list_checkpoints(run / "checkpoints") == []


def test_weights_going_bad_after_a_checkpoint_name_that_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Step 4's weights turn Inf (losses and grads were finite): the final save is refused, step 2 is named."""
    real = training._Run.train_step

    def step(run):
        stats = real(run)
        if run.step == 4:
            with torch.no_grad():
                run.params[0].view(-1)[0] = float("inf")
        return stats

    monkeypatch.setattr(training._Run, "train_step", step)
    cfg = load_config(ROOT / "configs" / "gmm2d.yaml", [f"run_dir={tmp_path / 'run'}", *TINY, "train.steps=4",
                                                        "train.ckpt_every=2"])
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights after step 4 .*1 of \d+ weight tensors "
                                                    r"and 0 EMA tensors.*step_0000002$") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    run = tmp_path / "run"
    assert not any((run / n).exists() for n in WEIGHTS)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    for f in _saved_weights(run):  # what is on disk is finite
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f


def test_amortised_check_names_the_first_bad_step_and_the_window(tmp_path: Path, monkeypatch) -> None:
    """With no logging the check runs at the checkpoint: a NaN at step 2 is found at step 4, before saving."""
    real, calls = diffusion.losses.Objective.__call__, {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss = real(self, *a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss  # every sample of step 2

    monkeypatch.setattr(diffusion.losses.Objective, "__call__", poisoned)
    cfg = load_config(ROOT / "configs" / "gmm2d.yaml", [f"run_dir={tmp_path / 'run'}", *TINY, "train.steps=8",
                                                        "train.ckpt_every=4"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2: 8 of 8 per-sample losses .*"
                                                 r"steps 1-4 checked at step 4.*finite weights: none$"):
        train(cfg)
    run = tmp_path / "run"
    assert _saved_weights(run) == [] and not (run / "metrics.jsonl").read_text().strip()
