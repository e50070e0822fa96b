"""Experiment trackers through accelerate's ``log_with``: names, hyperparameters, sample grids.

``train.log_with`` (default ``tensorboard``) is any tracker accelerate knows (tensorboard, wandb, mlflow,
comet_ml, aim, clearml, dvclive, swanlab, trackio) that is installed; a comma list logs to several.
The resolved config goes in as hyperparameters, preview grids as images (TensorBoard / W&B / ...:
``log_images``; MLflow: the PNG as an artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import ConfigError, flatten


def known() -> list[str]:
    """Every tracker name accelerate knows."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def installed() -> list[str]:
    """The trackers whose packages are importable here."""
    from accelerate.tracking import get_available_trackers

    return sorted(str(getattr(t, "value", t)) for t in get_available_trackers())


def check_log_with(value: Optional[str], key: str = "train.log_with") -> Optional[list[str]]:
    """``'tensorboard'`` / ``'wandb,mlflow'`` / ``'none'`` -> tracker names (None: no tracking); one clear error."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    have = installed()
    for n in names:
        if n not in known():
            raise ConfigError(f"{key}={value!r}: {n!r} is not a tracker; valid: {known()} or 'none' "
                              f"(installed here: {have})")
        if n not in have:
            raise ConfigError(f"{key}={value!r}: {n!r} is not installed (pip install {n.replace('_', '-')}); "
                              f"installed here: {have}")
    return names


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` values every tracker accepts (lists and None as text)."""
    out = {}
    for k, v in flatten(cfg).items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def start(acc, cfg, project: str) -> None:
    """Open the accelerator's trackers with the config as hyperparameters (main process only logs)."""
    if acc.log_with:
        acc.init_trackers(project, config=hyperparameters(cfg))


class RunTrackers:
    """Trackers for a run without an Accelerator of its own (the distillers), opened as accelerate does."""

    def __init__(self, names: Optional[list[str]], run_dir: str | Path, project: str = "tensorboard",
                 config: Optional[dict] = None):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for n in names or []:
            cls = LOGGER_TYPE_TO_CLASS[n]
            self.trackers.append(cls(project, str(run_dir)) if cls.requires_logging_directory else cls(project))
        for t in self.trackers:
            t.start()
            if config is not None:
                t.store_init_configuration(config)

    def log(self, values: dict, step: int) -> None:
        """Scalars (numbers only) at a step."""
        nums = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log(nums, step=step)

    def finish(self) -> None:
        """Flush and close every tracker."""
        for t in self.trackers:
            t.finish()


def log_image(acc, name: str, image: str | Path | np.ndarray, step: int) -> None:
    """A picture (PNG path or HWC uint8) to every open tracker that takes images (an Accelerator or RunTrackers)."""
    if not getattr(acc, "trackers", None):
        return
    if not isinstance(image, np.ndarray):
        from PIL import Image

        path = Path(image)
        image = np.asarray(Image.open(path).convert("RGB"))
    else:
        path = None
    for tracker in acc.trackers:
        kind = getattr(tracker, "name", "")
        if kind == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif kind == "mlflow":
            if path is not None:
                tracker.log_artifact(str(path), artifact_path=name)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step=step)


__all__ = ["known", "installed", "check_log_with", "hyperparameters", "start", "log_image", "RunTrackers"]
