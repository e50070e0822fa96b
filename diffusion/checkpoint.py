"""Run folders and training checkpoints: safetensors weights + YAML config, never pickled code.

A run folder ``RUN/`` holds ``config.yaml`` (resolved), ``model.safetensors``, ``ema.safetensors``,
``samples.png``, ``loss.png``, ``metrics.jsonl`` and ``checkpoints/step_NNNNNNN/``. Checkpoints are
written into ``checkpoints/.tmp-step_NNNNNNN`` and renamed into place only when complete, so a run
killed mid-write leaves the previous checkpoints intact; partial folders are never listed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig
from safetensors.torch import load_model, save_model
from torch import nn

from .config import load_config, to_yaml
from .score_model import ScoreModel

CONFIG_NAME = "config.yaml"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def _unwrap(net: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (their state-dict keys carry prefixes)."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary name so readers never see half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(net: nn.Module, path: str | Path) -> None:
    """A network's weights as safetensors (atomically; shared tensors handled by safetensors)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(_unwrap(net), str(tmp))
    os.replace(tmp, path)


def load_weights(net: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load safetensors weights into ``net`` (strict: missing or unexpected keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    missing, unexpected = load_model(_unwrap(net), str(path), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the network built from the config: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    return net


def save_run(run_dir: str | Path, net: nn.Module, ema_net: Optional[nn.Module], cfg: DictConfig) -> Path:
    """Write ``config.yaml``, ``model.safetensors`` and (when given) ``ema.safetensors`` into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_NAME, to_yaml(cfg))
    save_weights(net, run_dir / MODEL_NAME)
    if ema_net is not None:
        save_weights(ema_net, run_dir / EMA_NAME)
    return run_dir


def load_run(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[ScoreModel, DictConfig]:
    """Rebuild the trained ScoreModel (EMA weights by default) and its config from a run folder."""
    from .build import build_score_model  # build imports the model zoo; keep checkpoint import light

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no {CONFIG_NAME}")
    cfg = load_config(cfg_path)
    weights = run_dir / (EMA_NAME if ema else MODEL_NAME)
    if not weights.is_file():
        ckpts = list_checkpoints(run_dir / CHECKPOINTS)
        hint = (f"; the run has checkpoints up to step {ckpts[-1][0]} (training unfinished? resume it with "
                f"`python train.py --config {cfg_path} --resume latest`)" if ckpts else "")
        raise FileNotFoundError(f"run folder {run_dir} has no {weights.name} (holds: "
                                f"{sorted(p.name for p in run_dir.iterdir())}){hint}")
    model = build_score_model(cfg)
    load_weights(model.net, weights, device)
    return model.to(device).eval(), cfg


# ---- training checkpoints ------------------------------------------------------------------------


def step_dir(root: str | Path, step: int) -> Path:
    """``root/step_NNNNNNN``."""
    return Path(root) / f"step_{step:07d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root as (step, path), oldest first; temporary folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def resolve_checkpoint(spec: str, root: str | Path) -> Path:
    """``latest`` -> newest checkpoint under root; otherwise a checkpoint folder (or a run folder's newest)."""
    if spec == "latest":
        ckpts = list_checkpoints(root)
        if not ckpts:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {root} (train.ckpt_every must be > 0 "
                                    f"for a run to write them)")
        return ckpts[-1][1]
    path = Path(spec)
    if (path / CHECKPOINTS).is_dir():
        return resolve_checkpoint("latest", path / CHECKPOINTS)
    if not path.is_dir() or not _STEP_DIR.match(path.name):
        raise FileNotFoundError(f"--resume {spec}: not a checkpoint folder (expected RUN/checkpoints/step_NNNNNNN, "
                                f"a run folder, or 'latest')")
    return path


def remove_partial(root: str | Path) -> list[Path]:
    """Delete temporary folders left by a run killed while writing a checkpoint; returns them."""
    root = Path(root)
    stale = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], is_main: bool,
                     barrier: Callable[[], None] = lambda: None, keep_last: Optional[int] = None) -> Path:
    """Run ``write(tmp_dir)`` on every process, then atomically rename tmp_dir to step_N on the main one.

    Older checkpoints beyond ``keep_last`` are deleted only after the new one is in place.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_main:
        old = root / f"{_TMP_PREFIX}old-{final.name}"
        if final.exists():  # the same step written again (a resumed run): swap, never leave a gap
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            for _, old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
