"""Score identity Distillation (SiD): a one-step generator distilled from a diffusion teacher (docs/theory.md §11.1).

    python -m distill sid --teacher RUN_DIR | oracle:ring2d | oracle:mixture64d | pretrained:DIR --out RUN_DIR
    accelerate launch -m distill sid ...           (same arguments; mixed precision via --mixed-precision)

Three networks in the EDM view (y = x0 + se * n): the frozen teacher f_phi, the fake score f_psi and
the generator G, both initialised from the teacher (from an MLP fitted to it when the teacher is the
weightless oracle). G makes a sample in one forward pass, x_g = G(sig_init * z, sig_init). Each
iteration alternates a fake-score step (EDM loss on detached x_g) and a generator step with

    L_G = w * sum((fr - ff) * ((fr - x_g) - alpha * (fr - ff))),   w = 1 / mean|x_g - fr| (detached)

where fr, ff are the teacher's and fake denoisers at x_t = x_g + se * n, se from the rho=7 ramp
restricted to u ~ U[0, 0.8]. In eps language this is L2 - alpha * L1 (Su); alpha = 0.5 gives the
exact Fisher-divergence gradient, SiD's default 1.2 adds anti-collapse pressure, 1.5 diverges.

The run folder holds ``config.yaml`` (``kind: generator``, ``generator.sig_init``), ``model.safetensors``
(G), ``ema.safetensors`` (EMA of G), ``metrics.jsonl``, ``samples.png``, ``loss.png`` and
``checkpoints/`` for exact resume (``--resume``). Sample it with ``load_generator`` + ``generate``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from diffusion.cli import HelpFormatter
from diffusion.trackers import RunTrackers, check_log_with, hyperparameters, log_image
from diffusion.losses import Draw, build_objective
from diffusion.prediction import expand
from diffusion.score_model import ScoreModel

from .common import (NonFiniteCounter, PrefitConfig, Teacher, add_common_args, apply_common_args, check_finite,
                     check_out_folder, check_scale, check_weights_finite, clear_outputs, distiller_parser, ema_decay,
                     latest_checkpoint, load_distilled, load_teacher, network_sections, prefit, read_training_state,
                     student_from_net, write_training_state)

ALPHA_RANGE = (0.0, 1.5)  # open interval: 1.5 diverges (SiD paper), <= 0 is not a score divergence


# ---------------------------------------------------------------------------------------------
# The math: small functions, tested against closed forms in tests/test_sid.py
# ---------------------------------------------------------------------------------------------


def check_alpha(alpha: float) -> float:
    """Return alpha if it lies in the open interval (0, 1.5), else raise ValueError."""
    lo, hi = ALPHA_RANGE
    if not isinstance(alpha, (int, float)) or not lo < float(alpha) < hi:
        raise ValueError(f"SiD alpha must lie in the open interval ({lo}, {hi}); got {alpha!r} "
                         f"(0.5 = Fisher-divergence gradient, 1.0 = stop-gradient, 1.2 = SiD default; 1.5 diverges)")
    return float(alpha)


def generator_sigmas(n: int, generator: Optional[torch.Generator] = None, t_max_frac: float = 0.8,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM noise levels of the generator step: the rho-ramp at u ~ U[0, t_max_frac] (u=0 is sigma_min)."""
    u = t_max_frac * torch.rand(n, dtype=torch.float64, generator=generator)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - u) * (b - a)) ** rho


def sid_generator_loss(x_g: torch.Tensor, fr: torch.Tensor, ff: torch.Tensor, alpha: float,
                       normalize: bool = True) -> torch.Tensor:
    """Per-sample SiD generator loss sum((fr-ff) * ((fr-x_g) - alpha (fr-ff))), scaled by 1/mean|x_g-fr|."""
    diff = fr - ff
    loss = (diff * ((fr - x_g) - alpha * diff)).flatten(1).sum(1)
    if normalize:
        # SiD's per-sample weight: detached, so it rescales the gradient without being differentiated
        w = 1.0 / (x_g - fr).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
        loss = w * loss
    return loss


def generate(model: ScoreModel, noise: torch.Tensor, sig_init: float = 2.5,
             class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-step sampling: x = G(sig_init * noise, sig_init) with unit Gaussian ``noise``.

    ``sig_init = inf`` (a flow-schedule model read at t=1, where x_1 = noise) is the x0 prediction there.
    """
    if math.isinf(sig_init):
        s = model.schedule
        return model(noise * s.sigma(s.t_max).to(noise.dtype), s.t_max, class_labels).x0
    se = torch.full((noise.shape[0],), float(sig_init), dtype=torch.float64, device=noise.device)
    return model.denoise(sig_init * noise, se, class_labels)


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Temporarily switch off parameter gradients (inputs still get gradients)."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class SiDConfig:
    """SiD hyper-parameters (docs/theory.md §11.1 defaults; toy teachers want a larger lr)."""

    alpha: float = 1.2
    sig_init: float = 2.5
    t_max_frac: float = 0.8
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    lr: float = 1e-5
    lr_fake: Optional[float] = None  # None: same as lr
    fake_steps: int = 1  # fake-score updates per generator update (SiD: 1; >1 lets f_psi track G faster)
    normalize: bool = True  # SiD's per-sample weight 1/mean|x_g - fr| (off: plain L2 - alpha L1)
    betas: tuple[float, float] = (0.0, 0.999)
    batch: int = 256
    iters: int = 1000
    ema_halflife_kimg: float = 50.0
    max_nan_fraction: float = 0.01
    diverge_factor: float = 20.0
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    prefit: PrefitConfig = field(default_factory=PrefitConfig)

    def validate(self) -> "SiDConfig":
        """Raise ValueError on out-of-range settings."""
        check_alpha(self.alpha)
        for name in ("sig_init", "lr", "batch", "iters", "fake_steps", "sigma_min", "sigma_max", "rho", "checkpoint_every", "log_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SiD {name} must be > 0; got {getattr(self, name)}")
        if not 0 < self.t_max_frac <= 1:
            raise ValueError(f"SiD t_max_frac must lie in (0, 1]; got {self.t_max_frac}")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"SiD needs sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
        for name in ("ema_halflife_kimg", "diverge_factor") + (("lr_fake",) if self.lr_fake is not None else ()):
            if not getattr(self, name) > 0:
                raise ValueError(f"SiD {name} must be > 0; got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"SiD Adam betas must lie in [0, 1); got {tuple(self.betas)}")
        if not 0 <= self.max_nan_fraction < 1:
            raise ValueError(f"SiD max_nan_fraction must lie in [0, 1); got {self.max_nan_fraction}")
        if self.seed < 0:
            raise ValueError(f"SiD seed must be >= 0; got {self.seed}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be one of no, fp16, bf16; got {self.mixed_precision!r}")
        return self


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class _OneStep(nn.Module):
    """G as a module whose forward is one-step generation (so DDP syncs its gradients)."""

    def __init__(self, model: ScoreModel, sig_init: float):
        super().__init__()
        self.model, self.sig_init = model, sig_init

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return generate(self.model, z, self.sig_init, labels)


class _FakeLoss(nn.Module):
    """The fake score's EDM loss as a module forward (so DDP syncs its gradients)."""

    def __init__(self, model: ScoreModel, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x0: torch.Tensor, draw: Draw, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.objective(self.model, x0, labels, draw=draw)


class SiD:
    """Teacher, fake score, generator and their optimizers; ``step()`` runs one SiD iteration."""

    def __init__(self, teacher: Teacher, init: ScoreModel, cfg: SiDConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        from diffusion.ema import EMA

        self.cfg = cfg.validate()
        if accelerator is None:
            # accelerate keeps precision settings in process-wide singletons; clear them (not the
            # distributed setup) so runs in one process may each choose their precision
            AcceleratorState._reset_state()
            GradientState._reset_state()
        self.acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
        dev = self.acc.device
        world = self.acc.num_processes
        if cfg.batch % world:
            raise ValueError(f"SiD batch {cfg.batch} (the global batch) must be divisible by the {world} processes")
        self.local_batch = cfg.batch // world
        self.teacher = teacher
        teacher.model.to(dev)
        top = teacher.model.schedule.sigma_edm_max
        if cfg.sig_init > top:
            raise ValueError(f"sig_init {cfg.sig_init} exceeds the teacher's largest noise level {top:.4g}")
        self.sigma_max = min(cfg.sigma_max, top)
        # G and f_psi both start as copies of the teacher's network (or of the oracle's pre-fit)
        self.G = student_from_net(copy.deepcopy(init.net), init).to(dev).train().requires_grad_(True)
        self.fake = student_from_net(copy.deepcopy(init.net), init).to(dev).train().requires_grad_(True)
        self.ema = EMA(self.G.net, decay=ema_decay(cfg.batch, cfg.ema_halflife_kimg))
        self.G_ema = student_from_net(self.ema.net, init).eval()
        lr_f = cfg.lr_fake if cfg.lr_fake is not None else cfg.lr
        opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        opt_f = torch.optim.Adam(self.fake.parameters(), lr=lr_f, betas=tuple(cfg.betas))
        self.fake_objective = build_objective("edm", sigma_data=self.fake.sigma_data)
        self.gen_mod, self.fake_mod, self.opt_g, self.opt_f = self.acc.prepare(
            _OneStep(self.G, cfg.sig_init), _FakeLoss(self.fake, self.fake_objective), opt_g, opt_f)
        # all randomness from one CPU generator per process: bit-exact resume, same draws on any device
        self.rng = torch.Generator().manual_seed(cfg.seed * 1009 + self.acc.process_index)
        self.nan = NonFiniteCounter(cfg.max_nan_fraction, reduce=self._all_sum if world > 1 else None)
        self.step_count = 0
        self.reference_rms = self._reference_rms()

    # ---- helpers ------------------------------------------------------------------------------
    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t, "sum")

    def _all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over processes, so that every process takes the same stop decision (NaN spreads to all)."""
        return self.acc.reduce(t.detach().float().clone(), "mean") if self.acc.num_processes > 1 else t.detach()

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.rng).to(self.acc.device)

    def _labels(self, n: int) -> Optional[torch.Tensor]:
        k = self.teacher.model.num_classes
        return torch.randint(0, k, (n,), generator=self.rng).to(self.acc.device) if k else None

    def _reference_rms(self) -> float:
        if self.teacher.mixture is not None:
            return float(self.teacher.mixture.sample(4096, torch.Generator().manual_seed(0)).pow(2).mean().sqrt())
        return float(self.teacher.model.sigma_data)  # EDM's data-scale assumption for image teachers

    def _generate(self, n: int, grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """n generator samples (non-finite ones counted, reported and left out of the losses)."""
        z, labels = self._randn(n, *self.teacher.shape), self._labels(n)
        with torch.set_grad_enabled(grad), self.acc.autocast():
            x = self.gen_mod(z, labels).float()
        ok = self.nan(x, f"iteration {self.step_count}")
        if not ok.all():
            x, labels = x[ok], (labels[ok] if labels is not None else None)
        return x, labels

    # ---- one iteration -----------------------------------------------------------------------
    def fake_step(self) -> float:
        """Update f_psi with the EDM denoising loss on detached generator samples."""
        x, labels = self._generate(self.local_batch, grad=False)
        draw = self.fake_objective.draw(x, self.fake.schedule, self.rng)
        with self.acc.autocast():
            loss = self.fake_mod(x, draw, labels).mean()
        loss_all = self._all_mean(loss)
        check_finite(loss_all, f"fake-score loss at iteration {self.step_count}")
        self.opt_f.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        self.opt_f.step()
        return float(loss_all)

    def generator_step(self) -> tuple[float, float]:
        """Update G with the SiD loss; returns (loss, RMS of the generated batch)."""
        cfg = self.cfg
        x_g, labels = self._generate(self.local_batch, grad=True)
        se = generator_sigmas(x_g.shape[0], self.rng, cfg.t_max_frac, cfg.sigma_min, self.sigma_max, cfg.rho).to(x_g.device)
        x_t = x_g + expand(se, x_g) * self._randn(*x_g.shape)
        with frozen(self.fake), self.acc.autocast():
            fr = self.teacher.model.denoise(x_t, se, labels).float()
            ff = self.fake.denoise(x_t, se, labels).float()
        loss = sid_generator_loss(x_g, fr, ff, cfg.alpha, cfg.normalize).mean()
        # loss and mean square over all processes: they all stop on the same iteration
        stats = self._all_mean(torch.stack([loss.detach(), x_g.detach().float().pow(2).mean()]))
        check_finite(stats[0], f"generator loss at iteration {self.step_count}")
        self.opt_g.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        self.opt_g.step()
        rms = check_scale(float(stats[1].sqrt()), self.reference_rms, cfg.diverge_factor, f"at iteration {self.step_count}")
        return float(stats[0]), rms

    def step(self) -> dict[str, float]:
        """One SiD iteration: fake step(s), generator step, EMA update."""
        lf = sum(self.fake_step() for _ in range(self.cfg.fake_steps)) / self.cfg.fake_steps
        lg, rms = self.generator_step()
        self.ema.update(self.G.net)
        self.step_count += 1
        return {"step": self.step_count, "loss_fake": lf, "loss_gen": lg, "x_rms": rms,
                "nan_samples": self.nan.bad, "samples": self.nan.total, "world_size": self.acc.num_processes}

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, ema: bool = True, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One-step samples from the (EMA) generator for unit Gaussian ``noise``."""
        return generate(self.G_ema if ema else self.G, noise.to(self.acc.device), self.cfg.sig_init, class_labels)

    # ---- checkpoints -------------------------------------------------------------------------
    def _state_parts(self):
        return ({"generator": self.G.net, "fake": self.fake.net, "ema": self.ema.net},
                {"opt_g": self.opt_g, "opt_f": self.opt_f}, {})

    def _rng_file(self, folder: Path) -> Path:
        return Path(folder) / f"rng_state_{self.acc.process_index}.safetensors"  # one noise stream per process

    def save(self, run: Path, keep_last: int = 2) -> Path:
        """Write an exact-resume checkpoint (weights, optimizers, RNG, counters) under run/checkpoints."""
        from safetensors.torch import save_file

        from diffusion.checkpoint import CHECKPOINTS, write_checkpoint

        mods, opts, gens = self._state_parts()
        self.check_weights(run)
        meta = {"step": self.step_count, "nan": self.nan.state(), "ema_updates": self.ema.num_updates,
                "teacher": self.teacher.spec, "teacher_fingerprint": self.teacher.fingerprint,
                "world_size": self.acc.num_processes}

        def write(folder: Path) -> None:
            save_file({"rng": self.rng.get_state()}, str(self._rng_file(folder)))
            if self.acc.is_main_process:
                write_training_state(folder, mods, opts, gens, meta)

        return write_checkpoint(Path(run) / CHECKPOINTS, self.step_count, write, self.acc.is_main_process,
                                self.acc.wait_for_everyone, keep_last)

    def check_weights(self, run: Path) -> None:
        """Stop (NonFiniteError naming the last finite checkpoint) if G, f_psi or the EMA went non-finite."""
        check_weights_finite({"generator": self.G.net, "fake score": self.fake.net, "EMA generator": self.ema.net},
                             f"after iteration {self.step_count}", latest_checkpoint(run))

    def load(self, folder: Path) -> None:
        """Restore a checkpoint written by ``save`` (the teacher and the number of processes must be the same)."""
        from safetensors.torch import load_file

        meta = json.loads((Path(folder) / "state.json").read_text())
        if meta["teacher_fingerprint"] != self.teacher.fingerprint:
            raise ValueError(f"checkpoint {folder} was made with teacher {meta['teacher']!r} (fingerprint "
                             f"{meta['teacher_fingerprint']}), not {self.teacher.spec!r} ({self.teacher.fingerprint})")
        world = int(meta.get("world_size", 1))
        if world != self.acc.num_processes:
            raise ValueError(f"checkpoint {folder} was written by {world} process(es); resume it with the same number "
                             f"(got {self.acc.num_processes}) so that every process gets its own noise stream back")
        from safetensors import SafetensorError

        from diffusion.checkpoint import CheckpointError

        try:
            read_training_state(folder, *self._state_parts())
            self.rng.set_state(load_file(str(self._rng_file(folder)))["rng"])
        except (OSError, KeyError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"cannot resume from {folder}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        self.step_count = int(meta["step"])
        self.nan.load(meta["nan"])
        self.ema.num_updates = int(meta["ema_updates"])


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------



def run_config(teacher: Teacher, student_cfg: Optional[DictConfig], cfg: SiDConfig) -> dict:
    """config.yaml of a generator run: the network's trainer-style sections plus ``kind: generator``."""
    from omegaconf import OmegaConf

    if student_cfg is not None:  # only what rebuilds the network; the teacher's training sections do not apply
        full = OmegaConf.to_container(student_cfg, resolve=True)
        base = network_sections(full)
    else:  # a pretrained diffusers teacher: G has its architecture
        base = {"model": {"kind": "pretrained", "path": teacher.spec.split(":", 1)[1]}}
    base["kind"] = "generator"
    base["generator"] = {"method": "sid", "sig_init": cfg.sig_init, "nfe": 1, "shape": list(teacher.shape),
                         "teacher": teacher.spec, "teacher_fingerprint": teacher.fingerprint}
    base["sid"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    return base


def load_generator(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[ScoreModel, DictConfig]:
    """(G, cfg) from a generator run folder; sample with ``generate(G, noise, cfg.generator.sig_init)``."""
    model, cfg = load_distilled(run_dir, ema, device)
    if cfg.kind != "generator":
        raise ValueError(f"{run_dir} holds a {cfg.kind!r} run, not a one-step generator (kind: generator)")
    return model, cfg


def save_outputs(run: Path, sid: SiD, history: list[dict]) -> None:
    """model.safetensors, ema.safetensors, samples.png, loss.png (main process only)."""
    from diffusion.checkpoint import EMA_NAME, MODEL_NAME, save_weights
    from diffusion.previews import save_samples

    sid.check_weights(run)
    if not sid.acc.is_main_process:
        return
    save_weights(sid.G.net, run / MODEL_NAME)
    save_weights(sid.ema.net, run / EMA_NAME)
    images = len(sid.teacher.shape) == 3
    z = torch.randn(64 if images else 2000, *sid.teacher.shape, generator=torch.Generator().manual_seed(0))
    x = sid.sample(z).float().cpu()
    save_samples(x if images else x[:, :2], run / "samples.png", title=f"SiD one-step samples ({sid.teacher.spec})")
    _plot_losses(run / "loss.png", history)


def _plot_losses(path: Path, history: list[dict]) -> None:
    """Fake-score and generator losses against the iteration (the generator loss may be negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    steps = [h["step"] for h in history]
    for ax, key in zip(axes, ("loss_fake", "loss_gen")):
        ax.plot(steps, [h[key] for h in history])
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_history(path: Path, upto: int) -> list[dict]:
    """metrics.jsonl lines up to step ``upto`` (later lines came from a run that died after its checkpoint)."""
    from diffusion.previews import read_metrics

    return [r for r in read_metrics(path) if r.get("step", 0) <= upto]


def _check_run_folder(run: Path, teacher: Teacher, resume: bool, overwrite: bool = False) -> Optional[Path]:
    """The checkpoint to resume from (or None); raises on a teacher mismatch or an unrequested overwrite."""
    from omegaconf import OmegaConf

    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    check_out_folder(run, teacher.spec, overwrite=True)  # here only: --out must not be the teacher
    ck = latest_checkpoint(run)
    if (run / "config.yaml").is_file() and not overwrite:
        stored = OmegaConf.load(run / "config.yaml").get("generator") or {}
        if stored.get("teacher_fingerprint") not in (None, teacher.fingerprint):
            raise ValueError(f"run folder {run} was distilled from teacher {stored.get('teacher')!r} (fingerprint "
                             f"{stored.get('teacher_fingerprint')}); refusing to continue it with {teacher.spec!r} "
                             f"({teacher.fingerprint}). Use a new --out.")
    if ck is not None and not resume and not overwrite:
        raise ValueError(f"run folder {run} already has checkpoints (latest {ck.name}); pass --resume to continue it, "
                         f"--overwrite to replace it, or choose a new --out")
    if resume and ck is None:
        raise ValueError(f"--resume: run folder {run} has no checkpoint to resume from")
    if resume:
        ck = latest_checkpoint(run, intact=True)  # a damaged newest checkpoint is named and skipped
    if not resume:
        check_out_folder(run, teacher.spec, overwrite)
    return None if overwrite else ck


def train_sid(teacher: Teacher | str, out: str | Path, cfg: SiDConfig = SiDConfig(), resume: bool = False,
              init: Optional[tuple[ScoreModel, Optional[DictConfig]]] = None, cache_dir: str | Path | None = "runs/.cache",
              progress: bool = True, callback: Optional[Callable[[SiD, dict], None]] = None,
              log: Callable[[str], None] = print, time_limit_s: Optional[float] = None, overwrite: bool = False,
              log_with: Optional[str] = "tensorboard") -> SiD:
    """Run SiD into the run folder ``out`` (``resume=True`` continues from its last checkpoint).

    A folder that already holds anything is refused unless ``overwrite=True`` (its old outputs are then
    removed before anything is written); ``out`` may never be the teacher's own folder.

    ``time_limit_s`` stops training early (a checkpoint and the outputs are still written, and the
    log says how many iterations ran), so a demo or benchmark keeps its wall-clock budget.

    ``init`` = (network to start G and f_psi from, its trainer-style config); default: the teacher
    itself, or for the weightless oracle an MLP pre-fitted to it (cached under ``cache_dir``).
    """
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    cfg.validate()
    if isinstance(teacher, str):
        teacher = load_teacher(teacher)
    run = Path(out)
    ck = _check_run_folder(run, teacher, resume, overwrite)
    if init is None:
        init = (teacher.model, teacher.cfg) if teacher.has_weights else prefit(teacher, cfg.prefit, cache_dir, progress, log)
    sid = SiD(teacher, init[0], cfg)
    history: list[dict] = []
    if ck is not None:
        sid.load(ck)
        history = _read_history(run / "metrics.jsonl", sid.step_count)
        log(f"sid: resumed {run} at iteration {sid.step_count} from {ck}")
    if sid.acc.is_main_process:
        from diffusion.checkpoint import write_text_atomic

        run.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_outputs(run)  # the old run's weights must not survive next to the new config
        write_text_atomic(run / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(run_config(teacher, init[1], cfg))))
        write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    tracked = check_log_with(log_with, "--log-with") if sid.acc.is_main_process else None
    trackers = RunTrackers(tracked, run, config=hyperparameters(run_config(teacher, init[1], cfg)))
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iters, initial=sid.step_count, desc="sid", disable=not (progress and sid.acc.is_main_process))
    while sid.step_count < cfg.iters:
        row = sid.step()
        bar.update(1)
        out_of_time = time_limit_s is not None and time.perf_counter() - t0 > time_limit_s
        if sid.step_count % cfg.log_every == 0 or sid.step_count == cfg.iters or out_of_time:
            row.update(time_s=time.perf_counter() - t0, kimg=sid.step_count * cfg.batch / 1000)
            if callback is not None:
                callback(sid, row)
            history.append(row)
            if sid.acc.is_main_process:
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                trackers.log(row, step=sid.step_count)
            bar.set_postfix(loss_gen=f"{row['loss_gen']:.3g}", loss_fake=f"{row['loss_fake']:.3g}", nan=row["nan_samples"])
        if sid.step_count % cfg.checkpoint_every == 0 or sid.step_count == cfg.iters or out_of_time:
            sid.save(run)
        if out_of_time:
            log(f"sid: time limit of {time_limit_s:.0f}s reached after {sid.step_count} of {cfg.iters} iterations")
            break
    bar.close()
    if sid.nan.bad:
        log(f"sid: {sid.nan.bad} of {sid.nan.total} generator samples were non-finite and left out of the losses")
    save_outputs(run, sid, history)
    if (run / "samples.png").is_file():
        log_image(trackers, "samples", run / "samples.png", sid.step_count)
    trackers.finish()
    return sid


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m distill sid`` argument parser."""
    d = SiDConfig()
    p = distiller_parser("python -m distill sid", "Score identity Distillation: a one-step generator.")
    p.add_argument("--alpha", type=float, default=d.alpha, help="SiD alpha in (0, 1.5) (default 1.2)")
    p.add_argument("--sig-init", type=float, default=d.sig_init, help="noise level the generator reads: x = G(sig_init z, sig_init)")
    p.add_argument("--iters", type=int, default=d.iters, help="generator updates")
    p.add_argument("--batch", type=int, default=d.batch, help="global batch (split over `accelerate launch` processes)")
    p.add_argument("--lr", type=float, default=d.lr, help="generator learning rate (Adam)")
    p.add_argument("--lr-fake", type=float, default=None, help="fake-score lr (default: --lr)")
    p.add_argument("--fake-steps", type=int, default=d.fake_steps, help="fake-score updates per generator update")
    p.add_argument("--no-sample-weight", action="store_true",
                   help="drop SiD's per-sample weight 1/mean|x_g - fr| (faster on the oracle toys)")
    p.add_argument("--beta1", type=float, default=d.betas[0], help="Adam beta1 of both networks (SiD uses 0)")
    p.add_argument("--ema-halflife-kimg", type=float, default=d.ema_halflife_kimg, help="EMA half-life of the generator in thousands of images")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=d.mixed_precision, help="accelerate mixed precision")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every N iterations (for --resume)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="log losses every N iterations")
    p.add_argument("--max-nan-fraction", type=float, default=d.max_nan_fraction, help="stop when more than this fraction of generated samples is non-finite")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the noise streams and initialisation")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--time-limit-min", type=float, default=None, help="stop training after this many minutes")
    add_common_args(p, d.prefit)
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of ``python -m distill sid``."""
    return build_parser().parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m distill sid``."""
    a = parse_args(argv)
    prefit_cfg = apply_common_args(a)
    cfg = SiDConfig(alpha=a.alpha, sig_init=a.sig_init, iters=a.iters, batch=a.batch, lr=a.lr, lr_fake=a.lr_fake,
                    fake_steps=a.fake_steps, normalize=not a.no_sample_weight, betas=(a.beta1, 0.999), ema_halflife_kimg=a.ema_halflife_kimg,
                    mixed_precision=a.mixed_precision, checkpoint_every=a.checkpoint_every, log_every=a.log_every,
                    max_nan_fraction=a.max_nan_fraction, seed=a.seed,
                    prefit=prefit_cfg)
    if a.time_limit_min is not None and not a.time_limit_min > 0:
        raise ValueError(f"--time-limit-min must be > 0; got {a.time_limit_min}")
    train_sid(a.teacher, a.out, cfg, resume=a.resume, cache_dir=a.cache_dir, progress=not a.no_progress,
              time_limit_s=None if a.time_limit_min is None else 60 * a.time_limit_min, overwrite=a.overwrite,
              log_with=a.log_with)
    print(f"sid: wrote {a.out}: a one-step generator (kind: generator, sig_init {cfg.sig_init}); "
          f"sample it with `python sample.py --run {a.out}`")
    return 0
