"""Export a run folder as a diffusers pipeline folder that stock diffusers loads.

    python -m diffusion.export RUN OUT [--no-ema] [--overwrite] [--verify 4 --steps 10]

Which stock pipeline and scheduler reproduce a run (the model is the same function of the input;
only the names of the noise level differ):

* EDM preconditioning (``parametrization: edm``, any schedule): ``ConsistencyModelPipeline`` with an
  ``EDMEulerScheduler``. diffusers' ``precondition_inputs/outputs`` are EDM's c_in, c_skip and c_out
  for ``prediction_type="epsilon"`` and its ``precondition_noise`` is our c_noise = log(sigma)/4, so
  the stock ``UNet2DModel`` sees exactly what it saw in training (in the EDM view y = x/alpha, which
  is why the schedule does not matter). That pipeline is the only stock unconditional image pipeline
  that calls ``scale_model_input``; DDPMPipeline/DDIMPipeline skip it and so cannot run EDM models.
  Its start is ``sqrt(sigma_max^2 + 1) * eps`` (k-diffusion's convention), not ``sigma_max * eps``.
* Rectified flow (``schedule: flow`` unshifted, ``parametrization: velocity``, ``conditioning: 1000t``):
  ``DDPMPipeline`` with ``FlowMatchEulerDiscreteScheduler`` (the net sees ``1000 * sigma`` = 1000 t).
* eps / v / x0 on a variance-preserving schedule with ``conditioning: 1000t`` (or ``index`` on a
  ``ddpm`` schedule): ``DDIMPipeline`` with a ``DDIMScheduler`` whose ``trained_betas`` put diffusers'
  integer timestep n at our t = n/1000 (for ``index``: the schedule's own betas), ``clip_sample`` off
  and ``timestep_spacing="leading"``: the one spacing whose steps land on the knots they step to
  ("trailing" and "linspace" step to t - 1000//N but evaluate the net at a different knot next).

Anything else (DiT and MLP backbones, nets conditioned on t in [0, 1] or on logSNR, class-conditional
U-Nets, shifted flow) raises ``NoStockEquivalent`` with one line saying what would be needed.
``verify`` draws the same noise through the stock pipeline and through our sampler on the
scheduler's own grid and reports the largest difference in grey levels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from .cli import HelpFormatter

EXPORT_INFO = "unified_diffusion_export.json"
DIFFUSERS_T = 1000  # diffusers' num_train_timesteps for the schedulers written here


class NoStockEquivalent(ValueError):
    """The run has no stock diffusers pipeline + scheduler equivalent; the message says what would be needed."""


def _family(schedule) -> str:
    return getattr(schedule, "family", "other")


def plan(cfg: DictConfig, schedule) -> dict:
    """The stock pipeline, scheduler (class name and config) and our matching sampler for a run config."""
    m = cfg.model
    if m.kind != "unet":
        need = ("a pixel-space DiT pipeline (DiTPipeline needs a VAE and latents) and a weight map onto "
                "DiTTransformer2DModel" if m.kind == "dit" else "a diffusers model class for vector data")
        raise NoStockEquivalent(f"model.kind={m.kind!r} has no stock diffusers equivalent: needs {need}")
    if int(m.num_classes or 0) > 0:
        raise NoStockEquivalent(f"model.num_classes={m.num_classes}: the stock DDPM/DDIM pipelines pass no class labels "
                                f"and have no null label for guidance; needs a class-conditional image pipeline")
    if m.parametrization == "edm":
        return {"pipeline": "ConsistencyModelPipeline", "scheduler": "EDMEulerScheduler", "sampler": "euler",
                "scheduler_config": dict(sigma_min=float(schedule.sigma_edm_min), sigma_max=float(schedule.sigma_edm_max),
                                         sigma_data=float(m.sigma_data), sigma_schedule="karras", rho=7.0,
                                         prediction_type="epsilon", final_sigmas_type="zero",
                                         num_train_timesteps=DIFFUSERS_T)}
    if schedule.name == "flow" or _family(schedule) == "flow":
        if schedule.name != "flow":
            raise NoStockEquivalent(f"schedule {schedule.name}: diffusers' FlowMatchEuler conditions the net on the "
                                    f"shifted sigma, this run on the unshifted t; needs an unshifted flow schedule")
        if m.parametrization != "velocity" or m.conditioning != "1000t":
            raise NoStockEquivalent(f"flow with parametrization={m.parametrization}, conditioning={m.conditioning}: "
                                    f"FlowMatchEulerDiscreteScheduler feeds 1000*sigma to a velocity net; needs "
                                    f"model.parametrization=velocity and model.conditioning=1000t")
        return {"pipeline": "DDPMPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler", "sampler": "flow_euler",
                "scheduler_config": dict(num_train_timesteps=DIFFUSERS_T, shift=1.0)}
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}.get(m.parametrization)
    if pred is None or _family(schedule) != "vp":
        raise NoStockEquivalent(f"parametrization={m.parametrization} on schedule {schedule.name}: diffusers' DDPM-type "
                                f"schedulers take eps / v / x0 on variance-preserving schedules; needs one of those")
    if m.conditioning == "index" and hasattr(schedule, "betas"):
        betas = schedule.betas
    elif m.conditioning == "1000t":
        # diffusers' timestep n is our t = n/T, so the net sees n = 1000 t exactly
        t = torch.arange(DIFFUSERS_T, dtype=torch.float64) / DIFFUSERS_T
        ac = schedule.alpha(t) ** 2
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise NoStockEquivalent(f"schedule {schedule.name} has alpha(0) = 1, so diffusers' timestep 0 = our t=0 would "
                                    f"carry no noise; needs a schedule with a finite logSNR at t=0 (e.g. cosine)")
        betas = 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        if float(torch.cumprod(1 - betas.float(), 0)[0]) >= 1:  # diffusers builds alphas_cumprod in float32
            raise NoStockEquivalent(f"schedule {schedule.name}: logSNR(0) = {float(schedule.logsnr(0.0)):.1f} rounds "
                                    f"alphas_cumprod[0] to 1 in diffusers' float32; needs logSNR(0) <= 15")
    else:
        raise NoStockEquivalent(f"model.conditioning={m.conditioning}: diffusers' DDPM-type schedulers pass integer "
                                f"timesteps 0..999; needs model.conditioning=1000t (or index on a ddpm schedule)")
    return {"pipeline": "DDIMPipeline", "scheduler": "DDIMScheduler", "sampler": "ddim",
            "scheduler_config": dict(num_train_timesteps=int(betas.numel()), trained_betas=betas.tolist(),
                                     prediction_type=pred, clip_sample=False, thresholding=False,
                                     set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")}


def _pipeline(p: dict, unet):
    import diffusers

    scheduler = getattr(diffusers, p["scheduler"])(**p["scheduler_config"])
    return getattr(diffusers, p["pipeline"])(unet=unet, scheduler=scheduler)


def export_run(run: str | Path, out: str | Path, ema: bool = True, overwrite: bool = False) -> dict:
    """Write ``out`` (model_index.json, unet/, scheduler/, export record); returns the export record."""
    from .checkpoint import EMA_NAME, MODEL_NAME, load_run
    from .metrics import sha256_file

    run, out = Path(run), Path(out)
    model, cfg = load_run(run, ema=ema)
    p = plan(cfg, model.schedule)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = _pipeline(p, model.net.net)
    pipe.save_pretrained(tmp, safe_serialization=True)
    weights = run / (EMA_NAME if ema else MODEL_NAME)
    record = {"source_run": str(run), "weights": weights.name, "weights_sha256": sha256_file(weights),
              "pipeline": p["pipeline"], "scheduler": p["scheduler"], "matching_sampler": p["sampler"],
              "parametrization": cfg.model.parametrization, "conditioning": cfg.model.conditioning,
              "schedule": model.schedule.name,
              # lets `sample.py --pretrained OUT` rebuild the continuous schedule the DDIM knots were cut from
              "schedule_config": OmegaConf.to_container(cfg.schedule, resolve=True),
              "input_shape": list(cfg.model.input_shape), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "diffusers": __import__("diffusers").__version__}}
    (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return record


def scheduler_grid(scheduler, schedule, conditioning: str, steps: int) -> torch.Tensor:
    """The EDM noise levels (high -> low, ending in 0) a stock pipeline visits in ``steps`` steps."""
    scheduler.set_timesteps(steps)
    name = type(scheduler).__name__
    if name.startswith("EDM"):
        return scheduler.sigmas.double()
    if name == "FlowMatchEulerDiscreteScheduler":
        t = scheduler.sigmas.double()
        return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t))
    n = scheduler.timesteps.double()
    t = n / DIFFUSERS_T if conditioning == "1000t" else schedule.index_to_t(n)
    return torch.cat([schedule.sigma_edm(t), torch.zeros(1, dtype=torch.float64)])


def start_sigma(schedule, se0: float) -> float:
    """sigma(t_0) at the grid's first level: ``samplers.sample`` starts at x_T = sigma(t_0) * noise."""
    from samplers.core import alpha_at

    return float(schedule.sigma(schedule.t_max)) if math.isinf(se0) else alpha_at(schedule, se0) * se0


def verify(run: str | Path, out: str | Path, num: int = 4, steps: int = 10, seed: int = 0, ema: bool = True) -> dict:
    """Same noise through the stock pipeline and our sampler on its grid; max difference in grey levels."""
    import diffusers

    import samplers
    from samplers.noise import generators, randn

    from .checkpoint import load_run
    from .pretrained import sample_shape

    model, cfg = load_run(run, ema=ema)
    p = plan(cfg, model.schedule)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    kw = {"eta": 0.0} if p["pipeline"] == "DDIMPipeline" else {}
    last, step = [], pipe.scheduler.step

    def keep_last(*args, **kwargs):  # the state before the pipeline clamps it to [0, 1]
        result = step(*args, **kwargs)
        last[:] = [result[0]]
        return result

    pipe.scheduler.step = keep_last
    theirs = pipe(batch_size=num, generator=generators(seed, num), num_inference_steps=steps, output_type="np", **kw).images
    grid = scheduler_grid(pipe.scheduler, model.schedule, cfg.model.conditioning, steps)
    noise = randn((num, *sample_shape(model)), generators(seed, num))
    # the pipeline starts at init_noise_sigma * eps (EDM: sqrt(smax^2+1), others 1); ours at sigma(t_0) * eps
    noise = noise * (float(getattr(pipe.scheduler, "init_noise_sigma", 1.0)) / start_sigma(model.schedule, float(grid[0])))
    res = samplers.sample(model, noise, sampler=p["sampler"], grid=grid)
    ours = (res.x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    diff = float(abs(ours - theirs).max()) * 255
    raw = float((res.x - last[0].to(res.x.dtype)).abs().max() / last[0].abs().max().clamp_min(1))
    return {"max_rel_diff_unclamped": raw, "pipeline": p["pipeline"], "scheduler": p["scheduler"], "sampler": p["sampler"], "steps": steps,
            "nfe": res.nfe, "num": num, "seed": seed, "max_diff_grey_levels": diff}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m diffusion.export`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m diffusion.export", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("run", help="run folder written by train.py")
    p.add_argument("out", help="output folder for the diffusers pipeline")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights (default: EMA)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="after writing, draw N images through the stock pipeline and our sampler and compare (default: 0, off)")
    p.add_argument("--steps", type=int, default=10, help="pipeline steps for --verify (default: 10)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: one line per outcome, exit 2 on bad input or a run without a stock equivalent."""
    args = build_parser().parse_args(argv)
    try:
        rec = export_run(args.run, args.out, ema=not args.no_ema, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {rec['pipeline']} + {rec['scheduler']} (matching sampler: {rec['matching_sampler']}); "
          f"load with diffusers.DiffusionPipeline.from_pretrained({str(args.out)!r})")
    if args.verify > 0:
        v = verify(args.run, args.out, num=args.verify, steps=args.steps, ema=not args.no_ema)
        print(f"verified: {v['num']} images, {v['steps']} steps, stock pipeline vs {v['sampler']} on its grid: "
              f"max difference {v['max_diff_grey_levels']:.3g} grey levels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
