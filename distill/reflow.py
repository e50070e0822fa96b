"""Rectified-flow reflow and one-step distillation (docs/theory.md §11.2).

    python -m distill reflow --teacher RUN_DIR | oracle:ring2d | oracle:mixture64d | pretrained:DIR --out RUN_DIR
                             [--pairs N] [--iters K] [--one-step-iters K1]

1. Pairs: draw z ~ N(0, I), solve the teacher's PF-ODE accurately (samplers' adaptive dopri5,
   rtol = atol = 1e-5) to x = ODE(z). Pairs are cached as ``RUN/pairs/chunk_NNNNN.safetensors``; a
   rerun skips finished chunks, so an interrupted generation resumes where it stopped.
2. Reflow: a flow (alpha = 1-t, sigma = t) initialised from the teacher is trained with the velocity
   target on the stored pairs as (x0, eps) = (x, z). A teacher on another schedule is seen in flow
   coordinates through ``FlowPort``: in the EDM view every schedule's PF-ODE is the same
   (y = x/alpha, se = sigma/alpha), so the teacher's network is reused unchanged.
3. Optional one-step distillation: x0 = student(z, t=1) trained on the pairs with L2.

Logged: the straightness S = E_t E||(z - x) - v(x_t, t)||^2 on held-out pairs and the transport cost
E||z - x||^2 of the teacher's coupling and of the student's ODE coupling.

Outputs: ``RUN/`` with ``kind: reflow`` (the reflowed network under the teacher's schedule: sample it
with any sampler), ``RUN/onestep/`` with ``kind: generator`` when one-step distillation ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffusion.cli import HelpFormatter
from diffusion.trackers import RunTrackers, check_log_with, hyperparameters, log_image
from diffusion.losses import Draw, build_objective
from diffusion.schedules import by_name
from diffusion.score_model import ScoreModel

from .common import (PrefitConfig, Teacher, add_common_args, apply_common_args, check_finite, check_out_folder,
                     check_weights_finite, clear_outputs, distiller_parser, ema_decay, load_teacher, network_sections,
                     prefit)


# ---------------------------------------------------------------------------------------------
# A model in flow coordinates
# ---------------------------------------------------------------------------------------------


class FlowPort(nn.Module):
    """``net(x, t) -> x0`` of a ScoreModel on any schedule, read in flow coordinates x = (1-t) x0 + t z.

    se = t/(1-t), y = x/(1-t); above the inner schedule's largest se the input is rescaled to that
    level (y = x * se_max / t, the same noise direction), which keeps t = 1 (x = z) finite.
    """

    def __init__(self, inner: ScoreModel):
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        s = self.inner.schedule
        top, low = s.sigma_edm_max, s.sigma_edm_min
        se = (t / (1 - t)).clamp(max=top)  # t=1 -> inf -> top
        scale = (se / t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.inner.denoise(x * scale, se.clamp(min=low), class_labels)


def flow_student(model: ScoreModel) -> ScoreModel:
    """The flow-schedule ScoreModel to reflow: ``model`` itself on the plain flow schedule, else a FlowPort."""
    if model.schedule.name == "flow":
        return model
    return ScoreModel(FlowPort(model), by_name("flow"), "x0", "t", num_classes=model.num_classes)


def inner_model(student: ScoreModel) -> ScoreModel:
    """The network-carrying ScoreModel under a flow student (what a run folder stores)."""
    return student.net.inner if isinstance(student.net, FlowPort) else student


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def solve_ode(model: ScoreModel, z: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5,
              class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x = ODE(z): the PF-ODE from the schedule's top noise level to 0 by dopri5 (samplers' adaptive)."""
    import samplers
    from samplers.grids import default_se_last

    s = model.schedule
    grid = torch.tensor([s.sigma_edm_max, default_se_last(s), 0.0], dtype=torch.float64)
    return samplers.sample(model, z, sampler="adaptive", grid=grid, class_labels=class_labels, rtol=rtol, atol=atol).x


@dataclass
class Pairs:
    """Noise/data pairs of a deterministic coupling (and class labels for conditional teachers)."""

    noise: torch.Tensor
    data: torch.Tensor
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def slice(self, a: int, b: int) -> "Pairs":
        """Rows a:b."""
        return Pairs(self.noise[a:b], self.data[a:b], None if self.labels is None else self.labels[a:b])

    def cost(self) -> float:
        """Transport cost E||z - x||^2 of the coupling."""
        return float((self.noise - self.data).double().flatten(1).pow(2).sum(1).mean())


def make_pairs(teacher: Teacher, folder: str | Path, n: int, chunk: int = 4096, seed: int = 0, rtol: float = 1e-5,
               atol: float = 1e-5, progress: bool = False, log: Callable[[str], None] = print,
               overwrite: bool = False) -> Pairs:
    """n teacher pairs (z, ODE(z)), computed chunk by chunk and cached; finished chunks are reused.

    A cache made with other settings is an error, or with ``overwrite=True`` is deleted and rebuilt.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if n < 1 or chunk < 1:
        raise ValueError(f"need n >= 1 pairs and chunk >= 1; got n={n}, chunk={chunk}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": teacher.spec, "teacher_fingerprint": teacher.fingerprint, "chunk": chunk, "seed": seed,
            "rtol": rtol, "atol": atol, "solver": "samplers.adaptive (dopri5)", "shape": list(teacher.shape)}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff and not overwrite:
            raise ValueError(f"pair cache {folder} was made with other settings {diff} (stored, requested); "
                             f"use another --out, or pass --overwrite to rebuild it")
        if diff:
            import shutil

            shutil.rmtree(folder)
            folder.mkdir(parents=True)
            meta_path.write_text(json.dumps(meta, indent=1))
    else:
        meta_path.write_text(json.dumps(meta, indent=1))
    k = teacher.model.num_classes
    parts = []
    for i in tqdm(range(math.ceil(n / chunk)), desc="reflow pairs", disable=not progress):
        path = folder / f"chunk_{i:05d}.safetensors"
        if path.is_file():
            parts.append(load_file(str(path)))
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # chunk i is the same whatever n is
        z = torch.randn(chunk, *teacher.shape, generator=g)
        labels = torch.randint(0, k, (chunk,), generator=g) if k else None
        t0 = time.perf_counter()
        x = solve_ode(teacher.model, z, rtol, atol, labels).float().cpu()
        bad = int((~torch.isfinite(x).flatten(1).all(1)).sum())
        if bad:  # never drop pairs silently
            raise FloatingPointError(f"teacher ODE solve gave {bad} non-finite samples of {chunk} in chunk {i}; "
                                     f"stopping (the teacher or the tolerances rtol={rtol}, atol={atol} are at fault)")
        part = {"noise": z, "data": x} | ({"labels": labels} if labels is not None else {})
        tmp = path.with_name(path.name + ".tmp")
        save_file(part, str(tmp))
        os.replace(tmp, path)  # a chunk file exists only once complete
        log(f"reflow: pairs chunk {i} ({chunk} pairs) solved in {time.perf_counter() - t0:.1f}s")
        parts.append(part)
    cat = {key: torch.cat([p[key] for p in parts])[:n] for key in parts[0]}
    return Pairs(cat["noise"], cat["data"], cat.get("labels"))


# ---------------------------------------------------------------------------------------------
# Measures and training
# ---------------------------------------------------------------------------------------------


def _flow_draw(pairs: Pairs, t: torch.Tensor, schedule) -> Draw:
    """x_t = (1-t) x + t z with the pair's own noise (not an independent draw)."""
    shape = (-1,) + (1,) * (pairs.data.ndim - 1)
    tt = t.to(pairs.data.dtype).reshape(shape)
    return Draw(t, pairs.noise, (1 - tt) * pairs.data + tt * pairs.noise)


@torch.no_grad()
def straightness(student: ScoreModel, pairs: Pairs, n_t: int = 4, seed: int = 0, t_eps: float = 1e-3,
                 batch: int = 4096) -> float:
    """S = E_t E||(z - x) - v(x_t, t)||^2 over pairs (t ~ U[t_eps, 1], fixed draws for comparability)."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(n_t):
        for a in range(0, len(pairs), batch):
            p = pairs.slice(a, a + batch)
            t = t_eps + (1 - t_eps) * torch.rand(len(p), dtype=torch.float64, generator=g)
            d = _flow_draw(p, t, student.schedule)
            v = student(d.x_t, t, p.labels).velocity
            total += float((p.noise - p.data - v).double().flatten(1).pow(2).sum(1).sum())
            count += len(p)
    return total / count


@dataclass
class ReflowConfig:
    """Reflow hyper-parameters."""

    pairs: int = 20000
    val_pairs: int = 1024  # held out (the first ones) for S and the transport cost
    chunk: int = 4096
    rtol: float = 1e-5
    atol: float = 1e-5
    iters: int = 2000
    batch: int = 256
    lr: float = 1e-4
    t_eps: float = 1e-3
    ema_halflife_kimg: float = 20.0
    one_step_iters: int = 0  # > 0: also distil the reflowed flow into one step (x0 = student(z, t=1))
    one_step_lr: float = 1e-4
    log_every: int = 100
    seed: int = 0
    prefit: PrefitConfig = field(default_factory=PrefitConfig)

    def validate(self) -> "ReflowConfig":
        """Raise ValueError on out-of-range settings."""
        for name in ("pairs", "chunk", "iters", "batch", "lr", "rtol", "atol", "log_every", "ema_halflife_kimg",
                     "one_step_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"reflow {name} must be > 0; got {getattr(self, name)}")
        if not 0 <= self.val_pairs < self.pairs:
            raise ValueError(f"reflow val_pairs must lie in [0, pairs={self.pairs}); got {self.val_pairs}")
        if not 0 < self.t_eps < 1:
            raise ValueError(f"reflow t_eps must lie in (0, 1); got {self.t_eps}")
        if self.one_step_iters < 0 or self.seed < 0:
            raise ValueError(f"reflow one_step_iters and seed must be >= 0; got {self.one_step_iters}, {self.seed}")
        return self


def _batches(n: int, batch: int, g: torch.Generator):
    """Endless shuffled index batches (epoch after epoch)."""
    while True:
        perm = torch.randperm(n, generator=g)
        for a in range(0, n - batch + 1, batch):
            yield perm[a:a + batch]


def train_flow(student: ScoreModel, pairs: Pairs, cfg: ReflowConfig, val: Optional[Pairs] = None,
               progress: bool = False, history: Optional[list] = None):
    """Reflow: velocity regression on the pairs as (x0, eps); returns the EMA copy of the student's network."""
    from tqdm.auto import tqdm

    from diffusion.ema import EMA

    objective = build_objective("flow", t_eps=cfg.t_eps)
    net = inner_model(student).net
    net.train().requires_grad_(True)
    ema = EMA(net, decay=ema_decay(cfg.batch, cfg.ema_halflife_kimg))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(pairs), min(cfg.batch, len(pairs)), g)
    t0 = time.perf_counter()
    for step in tqdm(range(1, cfg.iters + 1), desc="reflow", disable=not progress):
        p = _take(pairs, next(batches))
        t = objective.sample_t(len(p), student.schedule, p.data.device, g)
        loss = objective(student, p.data, p.labels, draw=_flow_draw(p, t, student.schedule)).mean()
        check_finite(loss, f"reflow loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        if history is not None and (step % cfg.log_every == 0 or step == cfg.iters):
            row = {"step": step, "loss": float(loss.detach()), "time_s": time.perf_counter() - t0}
            if val is not None:
                with _swapped(net, ema.net):
                    row["straightness"] = straightness(student, val, seed=cfg.seed)
            history.append(row)
    net.eval()
    return ema.net


def _take(pairs: Pairs, idx: torch.Tensor) -> Pairs:
    return Pairs(pairs.noise[idx], pairs.data[idx], None if pairs.labels is None else pairs.labels[idx])


class _swapped:
    """Temporarily load ``other``'s weights into ``net`` (evaluate the EMA through the same wrapper)."""

    def __init__(self, net: nn.Module, other: nn.Module):
        self.net, self.other = net, other

    def __enter__(self):
        self.saved = copy.deepcopy(self.net.state_dict())
        self.net.load_state_dict(self.other.state_dict())

    def __exit__(self, *exc):
        self.net.load_state_dict(self.saved)


def train_one_step(student: ScoreModel, pairs: Pairs, cfg: ReflowConfig, progress: bool = False) -> ScoreModel:
    """Distil the flow into one step: min E||student(z, t=1).x0 - x||^2 over the pairs (L2)."""
    from tqdm.auto import tqdm

    one = copy.deepcopy(student)
    net = inner_model(one).net
    net.train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.one_step_lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    batches = _batches(len(pairs), min(cfg.batch, len(pairs)), g)
    t1 = one.schedule.t_max
    for step in tqdm(range(cfg.one_step_iters), desc="one-step", disable=not progress):
        p = _take(pairs, next(batches))
        x_1 = p.noise * float(one.schedule.sigma(t1))  # flow: alpha(1) = 0, x_1 = z
        loss = (one(x_1, t1, p.labels).x0 - p.data).pow(2).flatten(1).mean(1).mean()
        check_finite(loss, f"one-step distillation loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    return one


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


@dataclass
class ReflowResult:
    """What a reflow run measured (also written to RUN/config.yaml under ``reflow``)."""

    student: ScoreModel
    one_step: Optional[ScoreModel]
    stats: dict


@torch.no_grad()
def ode_coupling(student: ScoreModel, z: torch.Tensor, rtol: float, atol: float,
                 labels: Optional[torch.Tensor] = None) -> Pairs:
    """The deterministic coupling (z, ODE_student(z)) of a flow student."""
    return Pairs(z, solve_ode(inner_model(student), z, rtol, atol, labels).float(), labels)


def _write_run(run: Path, inner: ScoreModel, ema_net: nn.Module, base: dict, extra: dict, samples: torch.Tensor) -> None:
    from diffusion.checkpoint import EMA_NAME, MODEL_NAME, save_weights, write_text_atomic
    from diffusion.previews import save_samples

    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / "config.yaml", OmegaConf.to_yaml(OmegaConf.create({**base, **extra})))
    save_weights(inner.net, run / MODEL_NAME)
    save_weights(ema_net, run / EMA_NAME)
    x = samples.float().cpu()
    save_samples(x if x.ndim == 4 else x[:, :2], run / "samples.png", title=extra.get("kind", ""))


def reflow(teacher: Teacher | str, out: str | Path, cfg: ReflowConfig = ReflowConfig(),
           cache_dir: str | Path | None = "runs/.cache", progress: bool = True,
           log: Callable[[str], None] = print, overwrite: bool = False,
           log_with: Optional[str] = "tensorboard") -> ReflowResult:
    """Pairs from the teacher's ODE, a reflowed flow initialised from the teacher, optional one-step student.

    ``out`` may hold a pair cache (``pairs/``, reused); any other content is refused unless
    ``overwrite=True``, which removes the old outputs first. ``out`` is never the teacher's folder.
    """
    cfg.validate()
    if isinstance(teacher, str):
        teacher = load_teacher(teacher)
    run = Path(out)
    if check_out_folder(run, teacher.spec, overwrite, keep=("pairs",)):
        clear_outputs(run)
    pairs = make_pairs(teacher, run / "pairs", cfg.pairs, cfg.chunk, cfg.seed, cfg.rtol, cfg.atol, progress, log,
                       overwrite)
    val, train = pairs.slice(0, cfg.val_pairs), pairs.slice(cfg.val_pairs, len(pairs))
    if teacher.has_weights:
        init, net_cfg = teacher.model, teacher.cfg
    else:
        init, net_cfg = prefit(teacher, cfg.prefit, cache_dir, progress, log)
    student = flow_student(student_copy(init))
    stats = {"pairs": len(pairs), "val_pairs": len(val), "teacher_cost": val.cost()}
    if len(val):
        stats["straightness_init"] = straightness(student, val, seed=cfg.seed)
    history: list[dict] = []
    t0 = time.perf_counter()
    ema_net = train_flow(student, train, cfg, val if len(val) else None, progress, history)
    stats["train_seconds"] = time.perf_counter() - t0
    inner = inner_model(student)
    with _swapped(inner.net, ema_net):  # measure the EMA weights, which are what the run folder serves
        if len(val):
            stats["straightness"] = straightness(student, val, seed=cfg.seed)
            stats["student_cost"] = ode_coupling(student, val.noise, cfg.rtol, cfg.atol, val.labels).cost()
        samples = solve_ode(inner, torch.randn(2000 if len(teacher.shape) == 1 else 64, *teacher.shape,
                                               generator=torch.Generator().manual_seed(cfg.seed)), cfg.rtol, cfg.atol)
    base = network_sections(OmegaConf.to_container(net_cfg, resolve=True)) if net_cfg is not None else \
        {"model": {"kind": "pretrained", "path": teacher.spec.split(":", 1)[1]}}
    info = {"teacher": teacher.spec, "teacher_fingerprint": teacher.fingerprint, **stats,
            "config": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in asdict(cfg).items()}}
    check_weights_finite({"reflowed flow": inner.net, "its EMA": ema_net}, f"after {cfg.iters} reflow steps")
    _write_run(run, inner, ema_net, base, {"kind": "reflow", "reflow": info}, samples)
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    trackers = RunTrackers(check_log_with(log_with, "--log-with"), run, config=hyperparameters(info))
    for i, h in enumerate(history):
        trackers.log(h, step=int(h.get("step", i)))
    log_image(trackers, "samples", run / "samples.png", int(cfg.iters))
    trackers.finish()
    log(f"reflow: S {stats.get('straightness_init', float('nan')):.4g} -> {stats.get('straightness', float('nan')):.4g}, "
        f"transport cost teacher {stats['teacher_cost']:.4g}, student {stats.get('student_cost', float('nan')):.4g}")
    one = None
    if cfg.one_step_iters > 0:
        with _swapped(inner.net, ema_net):
            one = train_one_step(student, train, cfg, progress)
        top = inner_model(one).schedule.sigma_edm_max
        gen = {"method": "reflow+distill", "sig_init": top, "nfe": 1, "shape": list(teacher.shape),
               "teacher": teacher.spec, "teacher_fingerprint": teacher.fingerprint}
        if len(val):
            with torch.no_grad():
                pred = one(val.noise * float(one.schedule.sigma(one.schedule.t_max)), one.schedule.t_max, val.labels).x0
            stats["one_step_val_mse"] = float((pred - val.data).pow(2).flatten(1).mean(1).mean())
            gen["val_mse"] = stats["one_step_val_mse"]
        from .sid import generate

        z = torch.randn(2000 if len(teacher.shape) == 1 else 64, *teacher.shape, generator=torch.Generator().manual_seed(cfg.seed))
        with torch.no_grad():
            x1 = generate(inner_model(one), z, top)
        check_weights_finite({"one-step student": inner_model(one).net}, f"after {cfg.one_step_iters} one-step "
                             f"distillation steps", run)
        _write_run(run / "onestep", inner_model(one), inner_model(one).net, base, {"kind": "generator", "generator": gen}, x1)
    return ReflowResult(student, one, stats)


def student_copy(init: ScoreModel) -> ScoreModel:
    """A trainable deep copy of the network the student starts from."""
    m = copy.deepcopy(init)
    m.net.requires_grad_(True)
    return m


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m distill reflow`` argument parser."""
    d = ReflowConfig()
    p = distiller_parser("python -m distill reflow", "Rectified-flow reflow (+ one-step distillation).",
                         "run folder to write (pairs are cached under OUT/pairs)")
    p.add_argument("--pairs", type=int, default=d.pairs, help="teacher (noise, ODE(noise)) pairs to solve and train on")
    p.add_argument("--val-pairs", type=int, default=d.val_pairs, help="held-out pairs for the straightness and transport cost")
    p.add_argument("--chunk", type=int, default=d.chunk, help="pairs per cached chunk (the unit of resume)")
    p.add_argument("--rtol", type=float, default=d.rtol, help="dopri5 relative tolerance of the teacher solve")
    p.add_argument("--atol", type=float, default=d.atol, help="dopri5 absolute tolerance of the teacher solve")
    p.add_argument("--iters", type=int, default=d.iters, help="reflow training iterations")
    p.add_argument("--batch", type=int, default=d.batch, help="pairs per training batch")
    p.add_argument("--lr", type=float, default=d.lr, help="reflow learning rate (Adam)")
    p.add_argument("--one-step-iters", type=int, default=d.one_step_iters, help="> 0: also distil into one step")
    p.add_argument("--one-step-lr", type=float, default=d.one_step_lr, help="learning rate of the one-step distillation")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the pair noises and initialisation")
    add_common_args(p, d.prefit)
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of ``python -m distill reflow``."""
    return build_parser().parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m distill reflow``."""
    a = parse_args(argv)
    prefit_cfg = apply_common_args(a)
    cfg = ReflowConfig(pairs=a.pairs, val_pairs=a.val_pairs, chunk=a.chunk, rtol=a.rtol, atol=a.atol, iters=a.iters,
                       batch=a.batch, lr=a.lr, one_step_iters=a.one_step_iters, one_step_lr=a.one_step_lr, seed=a.seed,
                       prefit=prefit_cfg)
    res = reflow(a.teacher, a.out, cfg, cache_dir=a.cache_dir, progress=not a.no_progress, overwrite=a.overwrite,
                 log_with=a.log_with)
    print(json.dumps({k: v for k, v in res.stats.items()}, indent=1))
    return 0
