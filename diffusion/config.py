"""Typed training configs: OmegaConf structured dataclasses, YAML files and ``key=value`` overrides.

A config is ``RunConfig`` (data / model / schedule / objective / optim / ema / train / preview).
``load_config(path, overrides)`` merges the schema, a YAML file and command-line overrides and
re-raises OmegaConf's errors as ``ConfigError`` naming the key path, the bad value and the valid
keys or choices. Names that live in registries (datasets, backbones, schedules, objectives) are
checked against those registries by ``validate`` rather than duplicated here as enums.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message names the key path and the valid choices."""


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which dataset and how it is read."""

    name: str = "digits"  # digits | gmm2d | cifar10 | folder | hf (Hugging Face datasets)
    root: Optional[str] = None  # folder / cifar10 location (digits and gmm2d take none)
    resolution: Optional[int] = None  # None: the dataset's native size
    options: Dict[str, Any] = field(default_factory=dict)  # dataset-specific: hflip, download, channels, ...
    num_workers: int = 0  # DataLoader workers (0: read in the main process)
    pin_memory: Optional[bool] = None  # page-locked batches for fast host-to-GPU copies (None: on when on CUDA)
    persistent_workers: bool = False  # keep workers between iterators (needs num_workers > 0; one endless iterator here)
    prefetch_factor: Optional[int] = None  # batches each worker loads ahead (None: torch's default, 2)


@dataclass
class ModelConfig:
    """The backbone and how its output is read (parametrization, conditioning scalar, classes)."""

    kind: str = "unet"  # unet | dit | mlp
    preset: str = "tiny"
    options: Dict[str, Any] = field(default_factory=dict)  # preset overrides: block_out_channels, dropout, ...
    parametrization: str = "eps"  # eps | x0 | v | score | velocity | edm
    conditioning: str = "t"  # t | 1000t | logsnr | edm | index: the scalar the net sees
    num_classes: int = 0  # 0: unconditional; else must equal the dataset's class count
    label_dropout: float = 0.1  # P(label -> null label) in training, for classifier-free guidance
    sigma_data: float = 0.5  # EDM preconditioning
    input_shape: Optional[List[int]] = None  # filled from the data: [C, H, W] or [D]


@dataclass
class ScheduleConfig:
    """The noise schedule x_t = alpha(t) x0 + sigma(t) eps."""

    name: str = "cosine"  # vp_linear | ddpm | cosine | subvp | ve | edm | flow
    shift_base: Optional[int] = None  # reference resolution: lam shifts by 2 log(shift_base / resolution)
    interpolate: Optional[List[int]] = None  # [res_low, res_high]: Simple-diffusion interpolated schedule
    options: Dict[str, Any] = field(default_factory=dict)  # e.g. beta_min, logsnr_min, sigma_max


@dataclass
class ObjectiveConfig:
    """The training loss (see diffusion/losses.py)."""

    name: str = "eps"  # eps | v | edm | flow | multiscale
    options: Dict[str, Any] = field(default_factory=dict)  # e.g. t_sampling: logit_normal, min_snr_gamma: 5


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and gradient clipping."""

    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (diffusers.optimization names), after warm-up
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    foreach: Optional[bool] = None  # multi-tensor AdamW (None: torch's choice, i.e. on for CUDA params)
    fused: bool = False  # one fused AdamW kernel (CUDA/CPU); rounds differently from foreach, so off by default


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (used for previews and ema.safetensors)."""

    decay: float = 0.999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)): early averages forget the init
    foreach: bool = True  # one multi-tensor lerp over all weights (same numbers as a per-tensor loop)


@dataclass
class TrainConfig:
    """Length, batch, precision, logging and checkpointing of one run."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global: split over processes and accumulation micro-steps
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (through accelerate)
    seed: int = 0
    log_every: int = 25
    sample_every: int = 0  # preview grid every N steps (0: only at the end)
    ckpt_every: int = 0  # checkpoint every N steps (0: none besides the final weights)
    keep_last: int = 2  # checkpoints kept on disk
    tensorboard: bool = True  # log to the tracker(s) of train.log_with at all (false: none)
    log_with: str = "tensorboard"  # accelerate tracker(s): tensorboard | wandb | mlflow | ... (comma list) | none
    overwrite: bool = False  # allow a fresh run into a run folder that already holds checkpoints
    time_limit_min: float = 0.0  # stop early (saving everything) after this many minutes; 0: no limit
    cpu_threads: int = 0  # torch intra-op threads (0: torch's default); 1 is far faster on a shared CPU
    compile: bool = False  # torch.compile the network (training and preview sampling); first steps compile
    compile_mode: Optional[str] = None  # torch.compile mode: default | reduce-overhead | max-autotune
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for debugging)
    tf32: bool = False  # TF32 matmuls/convolutions on Ampere+ GPUs (faster fp32, ~1e-3 relative error)
    channels_last: bool = False  # NHWC memory layout for image networks and batches (faster convs on GPUs)
    cudnn_benchmark: bool = False  # let cuDNN time its conv algorithms for each new input shape


@dataclass
class PreviewConfig:
    """Sample grids drawn with the EMA weights and fixed per-image seeds."""

    n: int = 64
    nfe: int = 32
    sampler: Optional[str] = None  # None: the samplers package's measured default for this NFE
    seed: int = 0  # image i uses seed + i
    guidance: float = 1.0  # classifier-free guidance scale for class-conditional models


@dataclass
class RunConfig:
    """One training run."""

    name: str = "run"
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)


CHOICES: dict[str, Sequence[str]] = {
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "optim.lr_schedule": ("constant", "cosine", "linear"),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: keys that may change when a run is resumed; everything else must match the checkpoint's config
RESUMABLE_CHANGES = ("name", "run_dir", "train.steps", "train.log_every", "train.sample_every", "train.ckpt_every",
                     "train.keep_last", "train.tensorboard", "train.log_with", "train.overwrite", "train.cpu_threads",
                     "train.time_limit_min", "data.num_workers", "data.root", "data.pin_memory",
                     "data.persistent_workers", "data.prefetch_factor", "preview")


# ---------------------------------------------------------------------------------------------
# Loading and merging
# ---------------------------------------------------------------------------------------------


def _valid_keys(node: Any) -> list[str]:
    """The keys a structured node accepts (empty for free-form dicts)."""
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError with the key path and the closest valid keys."""
    path = err.full_key or "?"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError):
        parent_path, _, key = path.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        valid = _valid_keys(parent)
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        full = [f"{parent_path}.{c}" if parent_path else c for c in close]
        hint = f"; did you mean {', '.join(repr(c) for c in full)}?" if close else ""
        return ConfigError(f"unknown config key {path!r} (from {source}){hint} valid keys under "
                           f"{parent_path or 'the top level'!r}: {sorted(valid)}")
    return ConfigError(f"bad value for config key {path!r} (from {source}): {first}")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise _explain(e, base, source) from None


def schema() -> DictConfig:
    """The default config (every key with its type and default)."""
    return OmegaConf.structured(RunConfig)


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema <- YAML file <- ``key=value`` overrides, validated; raises ConfigError naming the key."""
    cfg = schema()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come from yaml, not OmegaConf
            raise ConfigError(f"cannot parse config file {str(path)!r}: {e}") from None
        cfg = _merge(cfg, text, str(path))
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. train.steps=100); got {bad}")
    try:
        dot = OmegaConf.from_dotlist(overrides)
    except Exception as e:  # YAML scanner errors are not OmegaConf exceptions
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None
    cfg = _merge(cfg, dot, "command line")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation of values (registries are imported lazily: config must not pull in torch models)
# ---------------------------------------------------------------------------------------------


def _choice(cfg: DictConfig, key: str, valid: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in valid:
        close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not a valid choice{hint}; valid: {list(valid)}")


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def validate(cfg: DictConfig) -> DictConfig:
    """Check value ranges and registry names; returns cfg or raises ConfigError."""
    from diffusion.losses import OBJECTIVES
    from diffusion.prediction import PARAMETRIZATIONS
    from diffusion.schedules import SCHEDULES
    from diffusion.score_model import CONDITIONINGS

    from .build import dataset_names, network_names

    if cfg.train.mixed_precision in ("False", "false"):  # YAML 1.1 reads a bare `no` as the boolean false
        cfg.train.mixed_precision = "no"
    for key, valid in CHOICES.items():
        _choice(cfg, key, valid)
    _choice(cfg, "data.name", dataset_names())
    _choice(cfg, "model.kind", network_names())
    _choice(cfg, "model.parametrization", PARAMETRIZATIONS)
    _choice(cfg, "model.conditioning", CONDITIONINGS)
    _choice(cfg, "schedule.name", sorted(SCHEDULES))
    _choice(cfg, "objective.name", sorted(OBJECTIVES))
    for key in ("train.steps", "train.batch_size", "train.grad_accum", "optim.lr", "preview.n", "preview.nfe",
                "train.keep_last", "model.sigma_data"):
        _positive(cfg, key)
    for key in ("train.log_every", "train.sample_every", "train.ckpt_every", "optim.warmup_steps",
                "optim.weight_decay", "optim.grad_clip", "model.num_classes", "data.num_workers", "train.cpu_threads",
                "train.time_limit_min"):
        _positive(cfg, key, allow_zero=True)
    if cfg.train.compile_mode is not None:
        _choice(cfg, "train.compile_mode", COMPILE_MODES)
    if cfg.train.compile and cfg.train.compile_backend != "inductor":
        import torch._dynamo  # only when asked: the backend registry is torch's

        _choice(cfg, "train.compile_backend", torch._dynamo.list_backends(exclude_tags=()))
    if cfg.optim.fused and cfg.optim.foreach:
        raise ConfigError("optim.fused=true and optim.foreach=true exclude each other; set one of them "
                          "(optim.foreach=null lets torch choose)")
    if cfg.data.persistent_workers and not cfg.data.num_workers:
        raise ConfigError("data.persistent_workers=true needs data.num_workers > 0 (there are no workers to keep)")
    if cfg.data.prefetch_factor is not None and (cfg.data.prefetch_factor <= 0 or not cfg.data.num_workers):
        raise ConfigError(f"data.prefetch_factor={cfg.data.prefetch_factor} needs data.num_workers > 0 and a "
                          f"positive value; got data.num_workers={cfg.data.num_workers}")
    if not 0.0 <= cfg.model.label_dropout <= 1.0:
        raise ConfigError(f"model.label_dropout must lie in [0, 1]; got {cfg.model.label_dropout}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must lie in [0, 1); got {cfg.ema.decay}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1); got {list(cfg.optim.betas)}")
    if cfg.data.resolution is not None and cfg.data.resolution <= 0:
        raise ConfigError(f"data.resolution must be positive; got {cfg.data.resolution}")
    if cfg.schedule.interpolate is not None and len(cfg.schedule.interpolate) != 2:
        raise ConfigError(f"schedule.interpolate must be [res_low, res_high]; got {list(cfg.schedule.interpolate)}")
    if cfg.schedule.shift_base is not None and cfg.schedule.shift_base <= 0:
        raise ConfigError(f"schedule.shift_base must be a positive resolution; got {cfg.schedule.shift_base}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Comparing configs (resume)
# ---------------------------------------------------------------------------------------------


def flatten(cfg: DictConfig | dict) -> dict[str, Any]:
    """``{"train.steps": 100, ...}``: every leaf by its dotted path (lists stay values)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(container, "")
    return out


def differences(saved: DictConfig, new: DictConfig, ignore: Sequence[str] = RESUMABLE_CHANGES) -> list[str]:
    """Human-readable ``key: saved -> new`` lines for leaves that differ, except ignored keys."""
    a, b = flatten(saved), flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or any(key.startswith(i + ".") for i in ignore):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: checkpoint has {va!r}, this run has {vb!r}")
    return lines


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)
