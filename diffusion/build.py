"""Config -> objects: dataset, backbone, schedule, ScoreModel and objective, one function each.

The trainer and ``checkpoint.load_run`` both go through these, so a run folder's config.yaml
rebuilds exactly the model that was trained. Errors from the builders are re-raised as
``ConfigError`` naming the config section they came from.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError
from .losses import Objective, build_objective
from .schedules import Schedule, by_name
from .score_model import ScoreModel


def _networks() -> dict[str, Callable[..., nn.Module]]:
    from .models import MODELS
    from .models.mlp import build_mlp

    # the models package registers image backbones; vector data (gmm2d) needs the MLP as well
    return {"mlp": build_mlp, **MODELS}


def _datasets() -> dict[str, Callable[..., Dataset]]:
    from .data import DATASETS

    return DATASETS


def network_names() -> list[str]:
    """Valid ``model.kind`` values."""
    return sorted(_networks())


def dataset_names() -> list[str]:
    """Valid ``data.name`` values."""
    return sorted(_datasets())


def _options(node: Any) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def _call(section: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a builder; argument errors become ConfigErrors naming the config section."""
    try:
        return fn(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{section}: {e} (check {section}.options; passed {sorted(kwargs)})") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{section}: {e}") from None


def build_data(cfg: DictConfig) -> Dataset:
    """The training dataset named by ``cfg.data`` (missing folders / bad files raise naming the file)."""
    d = cfg.data
    return _call("data", _datasets()[d.name], d.root, d.resolution, **_options(d.options))


def resolve(cfg: DictConfig, dataset: Dataset) -> DictConfig:
    """Fill what the data decides: the input shape (and check the class count)."""
    cfg = cfg.copy()
    shape = [int(s) for s in dataset.data_shape]
    if cfg.model.input_shape is not None and list(cfg.model.input_shape) != shape:
        raise ConfigError(f"model.input_shape={list(cfg.model.input_shape)} but dataset {cfg.data.name!r} "
                          f"yields items of shape {shape}")
    cfg.model.input_shape = shape
    have = int(getattr(dataset, "num_classes", 0) or 0)
    if cfg.model.num_classes not in (0, have):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but dataset {cfg.data.name!r} has "
                          f"{have} classes; use 0 (unconditional) or {have}")
    return cfg


def _shape(cfg: DictConfig) -> list[int]:
    if cfg.model.input_shape is None:
        raise ConfigError("model.input_shape is unset: resolve the config against its dataset first")
    return list(cfg.model.input_shape)


def build_network(cfg: DictConfig) -> nn.Module:
    """The backbone for ``cfg.model`` and the data shape it was resolved against."""
    m, shape = cfg.model, _shape(cfg)
    kwargs = _options(m.options)
    if len(shape) == 3:
        if m.kind == "mlp":
            raise ConfigError(f"model.kind='mlp' takes vector data, but {cfg.data.name!r} yields images {shape}")
        kwargs.update(resolution=shape[-1], in_channels=shape[0])
    else:
        if m.kind != "mlp":
            raise ConfigError(f"model.kind={m.kind!r} needs images, but {cfg.data.name!r} yields vectors {shape}; "
                              f"use model.kind=mlp")
        kwargs.update(dim=shape[0])
    return _call("model", _networks()[m.kind], preset=m.preset, num_classes=m.num_classes, **kwargs)


def build_schedule(cfg: DictConfig) -> Schedule:
    """The schedule, shifted for the data resolution when ``shift_base`` is set."""
    s, shape = cfg.schedule, _shape(cfg)
    resolution = shape[-1] if len(shape) == 3 else None
    if (s.shift_base is not None or s.interpolate is not None) and resolution is None:
        raise ConfigError("schedule.shift_base / schedule.interpolate need image data (a resolution)")
    interpolate = tuple(s.interpolate) if s.interpolate is not None else None
    return _call("schedule", by_name, s.name, resolution=resolution, shift_base=s.shift_base,
                 interpolate=interpolate, **_options(s.options))


def build_score_model(cfg: DictConfig, net: nn.Module | None = None) -> ScoreModel:
    """ScoreModel(net, schedule, parametrization, conditioning) as configured."""
    net = build_network(cfg) if net is None else net
    m = cfg.model
    return _call("model", ScoreModel, net, build_schedule(cfg), parametrization=m.parametrization,
                 conditioning=m.conditioning, sigma_data=m.sigma_data, num_classes=m.num_classes)


def build_loss(cfg: DictConfig) -> Objective:
    """The training objective from ``cfg.objective``."""
    o = cfg.objective
    return _call("objective", build_objective, o.name, **_options(o.options))
