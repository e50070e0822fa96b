"""Shared pieces of the distillers: teacher loading, the oracle pre-fit, NaN/divergence guards,
training-state files (safetensors + JSON, never pickles) and the sliced-Wasserstein / mode metrics.

A teacher is named by a string:

* ``oracle:ring2d`` / ``oracle:mixture64d``: the exact mixture denoiser (diffusion.oracle), under the
  EDM schedule for every distiller (``oracle_schedule`` picks another). It has no weights, so SiD and
  reflow students start from an MLP fitted to it (``prefit``).
* ``pretrained:DIR``: a local diffusers pipeline folder (diffusion.pretrained.load_pretrained).
* anything else: a run folder written by the trainer (diffusion.checkpoint.load_run).

A student network is described by a trainer-style config (``model`` / ``schedule`` sections of
diffusion.config.RunConfig) and built by diffusion.build, so run folders written here rebuild with
the same code as the trainer's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffusion.cli import HelpFormatter
from diffusion import oracle as oracle_lib
from diffusion.build import build_score_model
from diffusion.checkpoint import optimizer_state_from, optimizer_to_tensors
from diffusion.config import schema
from diffusion.losses import build_objective
from diffusion.schedules import SCHEDULES, by_name
from diffusion.score_model import ScoreModel


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------


class TeacherError(ValueError):
    """A teacher spec that cannot be loaded."""


@dataclass
class Teacher:
    """A frozen teacher: its ScoreModel, where it came from, and the config its student copies."""

    model: ScoreModel
    spec: str
    fingerprint: str  # identity for resume checks: weights sha256 (or the oracle's parameters)
    shape: tuple[int, ...]
    cfg: Optional[DictConfig] = None  # model/schedule sections to rebuild a student (None: pretrained)
    mixture: Optional[oracle_lib.GaussianMixture] = None  # oracle teachers: the exact data law

    @property
    def has_weights(self) -> bool:
        """False for the oracle: students then start from a pre-fitted network."""
        return any(True for _ in self.model.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """float64 for the exact oracle (it computes in float64), float32 for networks."""
        return torch.float64 if self.mixture is not None else torch.float32

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Exact data samples (oracle teachers only), float32, shaped like the teacher's data."""
        if self.mixture is None:
            raise TeacherError(f"teacher {self.spec!r} has no exact data sampler (only oracle teachers do)")
        return self.mixture.sample(n, generator).float().reshape(n, *self.shape)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients (gradients still flow through its inputs)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fingerprint_tensors(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 of named tensors (sorted) plus a string."""
    h = hashlib.sha256(extra.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode() + str(t.dtype).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def oracle_student_config(teacher_spec: str, dim: int, preset: str = "small", **options: Any) -> DictConfig:
    """Trainer-style config of the MLP (EDM preconditioning, EDM schedule) that stands in for an oracle."""
    return OmegaConf.merge(schema(), {
        "name": teacher_spec.replace(":", "_"), "data": {"name": teacher_spec},
        "model": {"kind": "mlp", "preset": preset, "options": options, "parametrization": "edm",
                  "conditioning": "edm", "input_shape": [int(dim)], "num_classes": 0},
        "schedule": {"name": "edm"}, "objective": {"name": "edm"}})


def oracle_teacher(mix: oracle_lib.GaussianMixture, spec: str, schedule: str = "edm") -> Teacher:
    """The exact denoiser of a Gaussian mixture under a named schedule, as a teacher."""
    model = oracle_lib.oracle_model(mix, by_name(schedule))
    # the schedule is part of the identity: the same law on another time axis is another model
    extra = spec if schedule == "edm" else f"{spec}@{schedule}"
    fp = fingerprint_tensors({"means": mix.means, "covs": mix.covs, "weights": mix.weights}, extra)
    return Teacher(freeze(model), spec, fp, (mix.dim,), mixture=mix)


def _oracle_teacher(name: str, schedule: str) -> Teacher:
    try:
        mix = oracle_lib.preset(name)
    except ValueError as e:
        raise TeacherError(f"cannot load teacher 'oracle:{name}': {e}") from None
    return oracle_teacher(mix, f"oracle:{name}", schedule)


def _run_teacher(path: str, device) -> Teacher:
    from diffusion.checkpoint import EMA_NAME, load_run
    from diffusion.metrics import sha256_file
    from diffusion.pretrained import sample_shape

    run = Path(path)
    if not (run / "config.yaml").is_file():
        raise TeacherError(f"cannot load teacher {path!r}: {'no such folder' if not run.is_dir() else 'no config.yaml in it'}; "
                           f"expected a run folder (config.yaml + ema.safetensors), 'oracle:NAME' with NAME in "
                           f"{sorted(oracle_lib.PRESETS)}, or 'pretrained:DIR'")
    try:
        model, cfg = load_run(run, ema=True, device=device)
    except Exception as e:
        raise TeacherError(f"cannot load teacher {path!r}: {type(e).__name__}: {e}") from e
    fp = sha256_file(run / EMA_NAME)[:32]
    return Teacher(freeze(model), str(run), fp, tuple(sample_shape(model)), cfg=cfg)


def _pretrained_teacher(path: str, device) -> Teacher:
    from diffusion.pretrained import load_pretrained, sample_shape

    try:
        model, info = load_pretrained(path, device=device)
    except Exception as e:
        raise TeacherError(f"cannot load teacher 'pretrained:{path}': {type(e).__name__}: {e}") from e
    return Teacher(freeze(model), f"pretrained:{path}", info["sha256"][:32], tuple(sample_shape(model)))


def load_teacher(spec: str, device: str | torch.device = "cpu", oracle_schedule: str = "edm") -> Teacher:
    """Load a frozen teacher from 'oracle:NAME' (on ``oracle_schedule``), 'pretrained:DIR' or a run folder."""
    if not isinstance(spec, str) or not spec:
        raise TeacherError(f"teacher must be a non-empty string (run folder, 'oracle:NAME' or 'pretrained:DIR'); got {spec!r}")
    if spec.startswith("oracle:"):
        # 'oracle:NAME@SCHEDULE' picks the schedule from the command line (e.g. oracle:ring2d@flow)
        name, _, sched = spec.split(":", 1)[1].partition("@")
        if sched and sched not in SCHEDULES:
            raise TeacherError(f"cannot load teacher {spec!r}: unknown schedule {sched!r}; valid schedules: {sorted(SCHEDULES)}")
        return _oracle_teacher(name, sched or oracle_schedule)
    if spec.startswith("pretrained:"):
        return _pretrained_teacher(spec.split(":", 1)[1], device)
    return _run_teacher(spec, device)


# ---------------------------------------------------------------------------------------------
# Run folders of distilled models
# ---------------------------------------------------------------------------------------------

#: what a distilled run adds to a trainer-style config.yaml
DISTILL_SECTIONS = ("kind", "generator", "sid", "reflow")
#: the trainer-config sections that rebuild a network
NETWORK_SECTIONS = ("name", "data", "model", "schedule")


def network_sections(cfg: dict) -> dict:
    """Only what rebuilds the network (a teacher's training sections do not apply to its student)."""
    return {k: cfg[k] for k in NETWORK_SECTIONS if k in cfg}


def load_distilled(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[ScoreModel, DictConfig]:
    """(ScoreModel, cfg) of a distilled run folder (``kind: generator`` or ``kind: reflow``)."""
    from diffusion.checkpoint import EMA_NAME, MODEL_NAME, load_weights

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run folder: config.yaml is missing")
    cfg = OmegaConf.load(run / "config.yaml")
    if cfg.get("kind") not in ("generator", "reflow"):
        raise ValueError(f"{run} is not a distilled run (kind={cfg.get('kind')!r}; expected 'generator' or 'reflow'); "
                         f"load diffusion runs with diffusion.checkpoint.load_run")
    if cfg.model.get("kind") == "pretrained":
        from diffusion.pretrained import load_pretrained

        model, _ = load_pretrained(cfg.model.path, device=device)
    else:  # the trainer's builders, without its dataset-name validation (oracle data has no dataset)
        model = build_score_model(OmegaConf.merge(schema(), network_sections(OmegaConf.to_container(cfg))))
    load_weights(model.net, run / (EMA_NAME if ema else MODEL_NAME), device)
    return model.to(device).eval().requires_grad_(False), cfg


# ---------------------------------------------------------------------------------------------
# Pre-fit: a network for a teacher with no weights (the oracle)
# ---------------------------------------------------------------------------------------------


@dataclass
class PrefitConfig:
    """Denoising score matching of an MLP on the oracle's samples."""

    preset: str = "small"  # diffusion.models.mlp presets: tiny (128 x 3), small (256 x 4)
    options: dict = field(default_factory=dict)  # preset overrides: hidden, depth, emb_dim
    steps: int = 2000
    batch: int = 512
    lr: float = 1e-3
    seed: int = 0


def student_from_net(net: nn.Module, teacher_like: ScoreModel) -> ScoreModel:
    """A trainable ScoreModel around ``net`` with the same schedule/parametrization as ``teacher_like``."""
    return ScoreModel(net, teacher_like.schedule, teacher_like.parametrization, teacher_like.conditioning,
                      sigma_data=teacher_like.sigma_data, num_classes=teacher_like.num_classes)


def prefit(teacher: Teacher, cfg: PrefitConfig = PrefitConfig(), cache_dir: str | Path | None = "runs/.cache",
           progress: bool = False, log: Callable[[str], None] = print) -> tuple[ScoreModel, DictConfig]:
    """An EDM-preconditioned MLP fitted to the oracle teacher, and its config (cached by config hash).

    Denoising score matching with the EDM weighting and noise distribution; the regression target is
    the oracle's exact posterior mean E[x0 | x_t] instead of the sample x0, which has the same
    minimiser and a lower-variance gradient (Rao-Blackwellised DSM).
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if teacher.mixture is None:
        raise TeacherError(f"prefit is for weightless oracle teachers; {teacher.spec!r} has its own network")
    net_cfg = oracle_student_config(teacher.spec, teacher.mixture.dim, cfg.preset, **cfg.options)
    key = hashlib.sha256(json.dumps([teacher.fingerprint, OmegaConf.to_container(net_cfg.model), asdict(cfg)],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"prefit-{teacher.spec.replace(':', '_')}-{key}.safetensors" if cache_dir else None
    torch.manual_seed(cfg.seed)  # network init
    model = build_score_model(net_cfg)
    if path is not None and path.is_file():
        model.net.load_state_dict(load_file(str(path)))
        log(f"prefit: loaded cached fit {path}")
        return model, net_cfg
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    objective = build_objective("edm")
    for step in tqdm(range(cfg.steps), desc="prefit", disable=not progress):
        x0 = teacher.sample_data(cfg.batch, g)
        d = objective.draw(x0, model.schedule, g)
        with torch.no_grad():
            target = teacher.model(d.x_t, d.t).x0
        # passing the posterior mean as "x0" makes the EDM objective regress onto it at the same (t, x_t)
        loss = objective(model, target, draw=d).mean()
        check_finite(loss, f"prefit loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    check_weights_finite({"pre-fit network": model.net}, f"after {cfg.steps} pre-fit steps")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: processes of one `accelerate launch` fit the same net and may save it at once
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        log(f"prefit: fitted {cfg.steps} steps, cached at {path}")
    return model, net_cfg


# ---------------------------------------------------------------------------------------------
# EMA, NaN accounting, divergence
# ---------------------------------------------------------------------------------------------


def ema_decay(batch: int, halflife_kimg: float) -> float:
    """Per-step EMA decay for a half-life measured in thousands of images (EDM convention)."""
    if halflife_kimg <= 0:
        raise ValueError(f"EMA half-life must be > 0 kimg; got {halflife_kimg}")
    return 0.5 ** (batch / (halflife_kimg * 1000))


class NonFiniteError(RuntimeError):
    """Too many non-finite samples, or a non-finite loss: the run is stopped."""


class NonFiniteCounter:
    """Counts samples with any NaN/Inf; raises once their share exceeds ``max_fraction`` of all samples."""

    def __init__(self, max_fraction: float = 0.01, what: str = "generator samples",
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if not 0 <= max_fraction < 1:
            raise ValueError(f"max_fraction must lie in [0, 1); got {max_fraction}")
        self.max_fraction, self.what = float(max_fraction), what
        # reduce = a cross-process sum: every process then holds the global counts and all of them
        # stop together (one process raising alone would leave the others waiting in a collective)
        self.reduce = reduce
        self.bad, self.total = 0, 0

    def __call__(self, x: torch.Tensor, where: str = "") -> torch.Tensor:
        """Count the non-finite rows of ``x`` and return the mask of finite rows (raises past the threshold)."""
        finite = torch.isfinite(x.detach()).flatten(1).all(1)
        counts = torch.tensor([int((~finite).sum()), x.shape[0]], dtype=torch.int64, device=x.device)
        if self.reduce is not None:
            counts = self.reduce(counts)
        self.bad += int(counts[0])
        self.total += int(counts[1])
        if self.bad > self.max_fraction * self.total:
            raise NonFiniteError(
                f"{self.bad} of {self.total} {self.what} were non-finite ({self.bad / self.total:.2%}), above the "
                f"allowed {self.max_fraction:.2%}{' at ' + where if where else ''}; stopping (lower the learning rate, "
                f"or raise --max-nan-fraction)")
        return finite

    def state(self) -> dict[str, int]:
        """Counts for logs and checkpoints."""
        return {"bad": self.bad, "total": self.total}

    def load(self, state: dict[str, int]) -> None:
        """Restore counts from a checkpoint."""
        self.bad, self.total = int(state["bad"]), int(state["total"])


def check_finite(value: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if a loss (or any tensor) has NaN/Inf: a diverged run stops, loudly."""
    if not torch.isfinite(value.detach()).all():
        raise NonFiniteError(f"{what} is non-finite ({value.detach().flatten()[:4].tolist()}); the run diverged")


def check_weights_finite(modules: dict[str, nn.Module], where: str, last_checkpoint: Optional[Path] = None) -> None:
    """Raise NonFiniteError when any weight is NaN/Inf: called before every checkpoint and final save.

    One host sync per call (per checkpoint), never per step. DDP replicas hold the same weights, so every
    process reaches the same decision without a collective.
    """
    bad = []
    for name, m in modules.items():
        params = [t.detach() for t in m.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
        if params and not bool(torch.stack([torch.isfinite(t).all() for t in params]).all()):
            bad.append(name)
    if bad:
        raise NonFiniteError(f"non-finite weights in {', '.join(bad)} {where}; stopped before saving, nothing "
                             f"non-finite was written. Last checkpoint with finite weights: {last_checkpoint or 'none'}")


#: what a distiller writes into its run folder (removed first by --overwrite; pairs/ is a reusable cache)
RUN_OUTPUTS = ("config.yaml", "model.safetensors", "ema.safetensors", "metrics.jsonl", "samples.png", "loss.png",
               "checkpoints", "onestep")


def check_out_folder(out: str | Path, teacher_spec: str, overwrite: bool, keep: tuple[str, ...] = ()) -> bool:
    """Refuse --out = the teacher, and a used --out without --overwrite; True when old outputs must be cleared.

    Entries named in ``keep`` (a resumable cache) do not make a folder "used".
    """
    from diffusion.cli import OverwriteError, same_path

    out = Path(out)
    src = teacher_spec.split(":", 1)[1] if teacher_spec.startswith("pretrained:") else teacher_spec
    if not teacher_spec.startswith("oracle:") and same_path(src, out):
        raise OverwriteError(f"--out {out} is the teacher's own folder ({teacher_spec}); distilling into it would "
                             f"overwrite the teacher. Choose another --out (no flag allows this)")
    if out.exists() and not out.is_dir():
        raise OverwriteError(f"--out {out} is a file; expected a run folder")
    used = out.is_dir() and any(p.name not in keep for p in out.iterdir())
    if used and not overwrite:
        raise OverwriteError(f"--out {out} already holds files (e.g. "
                             f"{sorted(p.name for p in out.iterdir() if p.name not in keep)[:3]}) that this command did "
                             f"not create; pass --overwrite to replace them, or choose a new --out")
    return used


def clear_outputs(out: str | Path) -> None:
    """Remove a previous distillation's outputs (--overwrite) before anything new is written."""
    import shutil

    out = Path(out)
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def check_out_file(out: str | Path, overwrite: bool) -> Path:
    """A single-file output (amed, grid): refuse an existing file without --overwrite, and a folder."""
    from diffusion.cli import OverwriteError

    out = Path(out)
    if out.is_dir():
        raise OverwriteError(f"--out {out} is a folder; expected a file path")
    if out.exists() and not overwrite:
        raise OverwriteError(f"--out {out} already exists and was not created by this command; pass --overwrite to "
                             f"replace it, or choose another --out")
    return out


def add_tracker_args(p) -> None:
    """--log-with / --log-dir of the single-file distillers (amed, grid): trackers need a folder of their own."""
    p.add_argument("--log-with", default="tensorboard",
                   help="accelerate tracker(s) for the loss, the final grid and the options (comma list; 'none' for "
                        "no tracking)")
    p.add_argument("--log-dir", default=None,
                   help="tracker folder (default: next to --out, '<out without suffix>.logs'); refused if it holds "
                        "files, unless --overwrite")


def check_trackers(a) -> tuple[Optional[list[str]], Path]:
    """(tracker names or None, log folder) of --log-with / --log-dir; refuses a used folder without --overwrite."""
    from diffusion.cli import OverwriteError
    from diffusion.trackers import check_log_with

    names = check_log_with(a.log_with, "--log-with")
    out = Path(a.out)
    folder = Path(a.log_dir) if a.log_dir else out.parent / f"{out.stem}.logs"
    if names and folder.exists():
        if not folder.is_dir():
            raise OverwriteError(f"--log-dir {folder} is a file; expected a folder")
        if any(folder.iterdir()) and not a.overwrite:
            raise OverwriteError(f"--log-dir {folder} already holds files that this command did not create; pass "
                                 f"--overwrite to replace them, --log-dir to choose another folder, or --log-with none")
    return names, folder


def open_trackers(a, config: dict):
    """RunTrackers for ``a.log_with`` in ``a.log_dir`` (or ``<out stem>.logs``), the options as hyperparameters.

    With --overwrite an earlier run's ``tensorboard/`` is removed first so the new events do not mix with the old.
    """
    import shutil

    from diffusion.trackers import RunTrackers, hyperparameters

    names, folder = check_trackers(a)
    if names:
        if (folder / "tensorboard").is_dir():
            shutil.rmtree(folder / "tensorboard")
        folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "log_dir": str(folder) if names else None}
    return RunTrackers(names, folder, config=hyperparameters(config) if names else None)


class DivergenceError(RuntimeError):
    """The generator's samples ran away (RMS far above the data's): the run is stopped."""


def check_scale(x: torch.Tensor | float, reference_rms: float, factor: float, where: str) -> float:
    """RMS of x (or x itself when it is already an RMS); raise DivergenceError above ``factor`` x the reference."""
    rms = float(x.detach().float().pow(2).mean().sqrt()) if torch.is_tensor(x) else float(x)
    if not math.isfinite(rms) or rms > factor * reference_rms:
        raise DivergenceError(f"generator sample RMS {rms:.4g} exceeds {factor:g} x the reference RMS "
                              f"{reference_rms:.4g} {where}: the run diverged (lower the learning rate or alpha)")
    return rms


# ---------------------------------------------------------------------------------------------
# Training-state files: safetensors for tensors, JSON for the rest (no pickles)
# ---------------------------------------------------------------------------------------------


def write_training_state(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                         generators: dict[str, torch.Generator], meta: dict) -> None:
    """Modules as safetensors, optimizer tensors + RNG states in ``optim.safetensors``, the rest in ``state.json``."""
    from safetensors.torch import save_file

    from diffusion.checkpoint import save_weights, write_text_atomic

    folder = Path(folder)
    for name, m in modules.items():
        save_weights(m, folder / f"{name}.safetensors")
    opt_meta, tensors = {}, {}
    for name, opt in optimizers.items():
        t, m = optimizer_to_tensors(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        opt_meta[name] = m
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g.get_state()
    save_file(tensors, str(folder / "optim.safetensors"))
    write_text_atomic(folder / "state.json", json.dumps({**meta, "optimizers": opt_meta}, indent=1))


def read_training_state(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        generators: dict[str, torch.Generator]) -> dict:
    """Restore what ``write_training_state`` wrote; returns the JSON meta."""
    from safetensors.torch import load_file

    from diffusion.checkpoint import load_weights

    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    for name, m in modules.items():
        load_weights(m, folder / f"{name}.safetensors")
    tensors = load_file(str(folder / "optim.safetensors"))
    for name, opt in optimizers.items():
        pre = f"{name}."
        opt.load_state_dict(optimizer_state_from({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)},
                                                 meta["optimizers"][name]))
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
    return meta


def latest_checkpoint(run_dir: Path, intact: bool = False, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest complete ``checkpoints/step_*`` folder of a run, or None.

    ``intact=True`` (resume): damaged newer checkpoints are named and skipped; CheckpointError if all are.
    """
    from diffusion.checkpoint import CHECKPOINTS, list_checkpoints, resolve_checkpoint

    ck = list_checkpoints(Path(run_dir) / CHECKPOINTS)
    if not ck:
        return None
    return resolve_checkpoint("latest", Path(run_dir) / CHECKPOINTS, log) if intact else ck[-1][1]


# ---------------------------------------------------------------------------------------------
# Distribution metrics for oracle data: sliced Wasserstein and mode statistics
# ---------------------------------------------------------------------------------------------


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W2^2(<x,theta>, <y,theta>)) between equal-size sample sets."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced Wasserstein needs sample sets of equal shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("sliced Wasserstein got non-finite samples; count and report them instead of measuring")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # [n_proj, n] so each sort runs along contiguous memory (2.5x faster than sorting columns)
    px = torch.sort(theta.T @ x.T, dim=1).values
    py = torch.sort(theta.T @ y.T, dim=1).values
    return float((px - py).pow(2).mean().sqrt())


def mode_stats(x: torch.Tensor, mixture: oracle_lib.GaussianMixture, n_std: float = 4.0) -> dict[str, Any]:
    """Mode coverage error, far-from-every-mode fraction and per-mode spread of samples of a mixture.

    * ``coverage_error``: total variation 0.5 sum_k |p_hat_k - pi_k| between the share of samples
      assigned (by responsibility) to each mode and the true weights.
    * ``far_fraction``: share of samples whose squared Mahalanobis distance to *every* mode exceeds
      the chi^2_D quantile with the tail mass of ``n_std`` in 1-D (4 std: 6.3e-5), so the expected
      value under the true law is <= 6.3e-5 whatever the dimension.
    * ``spread``: per mode, mean squared Mahalanobis distance / D of its samples (1 = right width,
      > 1 blurred, < 1 collapsed); reported per mode and as the worst |log spread|.
    """
    from scipy.stats import chi2, norm

    x = x.reshape(x.shape[0], -1).double()
    resp = mixture.responsibilities(x, 1.0, 0.0)
    k = resp.argmax(1)
    counts = torch.bincount(k, minlength=mixture.K).double()
    share = counts / x.shape[0]
    coverage = 0.5 * float((share - mixture.weights).abs().sum())
    # squared Mahalanobis distance to each mode, in each mode's eigenbasis
    r = x[:, None, :] - mixture.means[None]
    z = torch.einsum("kdj,bkd->bkj", mixture.eigvecs, r)
    m2 = (z * z / mixture.eigvals[None]).sum(-1)  # [B, K]
    tail = 2 * norm.sf(n_std)
    thresh = float(chi2.isf(tail, df=mixture.dim))
    far = float((m2 > thresh).all(1).double().mean())
    spread = []
    for j in range(mixture.K):
        sel = k == j
        spread.append(float(m2[sel, j].mean() / mixture.dim) if sel.any() else float("nan"))
    finite = [s for s in spread if math.isfinite(s)]
    worst = max(abs(math.log(s)) for s in finite) if finite else float("nan")
    return {"coverage_error": coverage, "far_fraction": far, "far_threshold_chi2": thresh, "spread": spread,
            "spread_worst_abs_log": worst, "modes_hit": int((counts > 0).sum()), "n": int(x.shape[0])}


def distiller_parser(prog: str, description: str, out_help: str = "run folder to write"):
    """An argparse parser with the options every distiller starts with: --teacher, --out, --overwrite."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="run folder, oracle:ring2d, oracle:mixture64d or pretrained:DIR")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    return p


def add_common_args(p, prefit: "PrefitConfig") -> None:
    """CLI options every distiller shares: the oracle pre-fit, its cache, CPU threads, the progress bar."""
    p.add_argument("--prefit-steps", type=int, default=prefit.steps, help="oracle teachers: DSM steps of the pre-fit")
    p.add_argument("--prefit-preset", default=prefit.preset, help="oracle teachers: MLP preset (tiny, small)")
    p.add_argument("--cache-dir", default="runs/.cache", help="where oracle pre-fits are cached")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest on a shared CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--log-with", default="tensorboard",
                   help="accelerate tracker(s) for losses, samples and the config (comma list; 'none' for no tracking)")


def apply_common_args(a) -> "PrefitConfig":
    """Set the requested torch threads and return the pre-fit configuration the common options describe."""
    if a.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default); got {a.threads}")
    if a.prefit_steps < 1:
        raise ValueError(f"--prefit-steps must be >= 1; got {a.prefit_steps}")
    from diffusion.models.mlp import MLP_PRESETS

    if a.prefit_preset not in MLP_PRESETS:
        raise ValueError(f"--prefit-preset {a.prefit_preset!r} is not an MLP preset; valid: {sorted(MLP_PRESETS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    return PrefitConfig(preset=a.prefit_preset, steps=a.prefit_steps)
