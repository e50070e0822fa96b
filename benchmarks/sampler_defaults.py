"""Choose the default sampler + grid (samplers/defaults.py) by measurement on the exact oracle.

Problems: the 2-D ring (8 modes) and the 64-D mixture (10 modes) on the DDPM schedule, with the
exact mixture denoiser. Reference: dopri5 (rtol=atol=1e-8) from the same x_T. Peers: diffusers'
schedulers fed the same exact denoiser, NFE counted. One configuration must serve every dimension
and NFE in (4, 5, 6, 8, 10, 15, 20). Candidates are scored on seed 1234 against the issue's targets
(RMSE <= 0.6x the best diffusers configuration at NFE 5 and 10; at NFE 20 RMSE <= 1x and median
<= 0.5x; never worse than 1x elsewhere): score = the largest (ratio / allowed ratio), lower is
better. The winner is re-measured on seed 777. The formal benchmark (benchmarks/samplers.py) uses
seed 0, which this script never touches.

    .venv/bin/python benchmarks/sampler_defaults.py      # ~3-10 min on 2 busy CPU cores
Writes benchmarks/results/sampler_defaults.{md,json,png}.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import samplers  # noqa: E402
from diffusion import oracle, schedules  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED_TUNE, SEED_CHECK = 1234, 777
NFES = (4, 5, 6, 8, 10, 15, 20)
PROBLEMS: dict[str, tuple[Callable[[], oracle.GaussianMixture], int]] = {
    "ring2d": (oracle.ring2d, 2000), "mixture64d": (oracle.mixture64d, 500)}
ALLOWED = {5: 0.6, 10: 0.6, 20: 1.0}  # issue 3 targets on the RMSE ratio; 1.0 elsewhere
MEDIAN_ALLOWED_20 = 0.5

# diffusers' schedulers as the issue lists them: (class, config); default spacing and Karras sigmas
PEERS = {
    "DDIM trailing": ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "Heun": ("HeunDiscreteScheduler", {}),
    "Heun karras": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    "DPM++2M": ("DPMSolverMultistepScheduler", dict(solver_order=2)),
    "DPM++2M karras": ("DPMSolverMultistepScheduler", dict(solver_order=2, use_karras_sigmas=True)),
    "DPM++3M": ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    "DPM++3M karras": ("DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "UniPC karras": ("UniPCMultistepScheduler", dict(use_karras_sigmas=True)),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DEIS karras": ("DEISMultistepScheduler", dict(use_karras_sigmas=True)),
}


def candidates() -> list[tuple[str, dict, dict]]:
    """(sampler, options, grid) around the region a wider search (p 0.5..3, se_last 0.002..0.08) found best."""
    out = []
    for order in (3, 4):
        for p in (0.7, 0.8, 1.0):
            for se_last in (0.02, 0.025, 0.03, 0.04):
                out.append(("ipndm", {"afs": True, "order": order}, {"kind": "polynomial", "p": p, "se_last": se_last}))
    for p in (0.8, 1.0):
        for se_last in (0.025, 0.04):
            out.append(("dpmpp_2m", {"afs": True}, {"kind": "polynomial", "p": p, "se_last": se_last}))
    return out


def run_diffusers(cls_name: str, cfg: dict, model, x_T: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """A diffusers scheduler driven by our exact denoiser, evaluated at the scheduler's own sigma."""
    import diffusers

    s = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                     beta_schedule="linear", **cfg)
    s.set_timesteps(steps)
    y_space = cls_name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")  # k-diffusion scaling
    sample = x_T / float(model.schedule.alpha(1.0)) if y_space else x_T.clone()
    nfe = 0
    for i, t in enumerate(s.timesteps):
        if getattr(s, "sigmas", None) is not None and len(s.sigmas) > i:
            se = float(s.sigmas[i])
        else:  # DDIM keeps no sigma table
            ac = float(s.alphas_cumprod[int(t)])
            se = math.sqrt((1 - ac) / ac)
        s.scale_model_input(sample, t)  # initialises the scheduler's step index
        y = sample if y_space else sample * math.sqrt(1 + se * se)
        eps = (y - model.denoise(y, se)) / se
        nfe += 1
        sample = s.step(eps, t, sample).prev_sample
    return sample, nfe


def peer_steps(name: str, nfe: int):
    """Steps for an NFE budget; Heun needs 2n-1 calls, so even budgets are skipped."""
    if name.startswith("Heun"):
        return (nfe + 1) // 2 if nfe % 2 else None
    return nfe


def errors(x: torch.Tensor, ref: torch.Tensor, mix: oracle.GaussianMixture) -> dict:
    """RMSE per dimension, median per-sample error, % of samples in a different mode than the reference."""
    e = (x - ref).norm(dim=1) / math.sqrt(mix.dim)
    flips = (mix.nearest_mode(x) != mix.nearest_mode(ref)).double().mean().item() * 100
    return {"rmse": e.pow(2).mean().sqrt().item(), "median": e.median().item(), "flip_pct": flips}


def measure(seed: int, configs: list[tuple[str, dict, dict]]) -> dict:
    """Reference, peers and our configurations on both problems for one noise seed."""
    sch = schedules.by_name("ddpm")
    out = {}
    for pname, (make, n) in PROBLEMS.items():
        mix = make()
        model = oracle.oracle_model(mix, sch)
        eps = torch.randn(n, mix.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        grid = torch.tensor([sch.sigma_edm_max, 1e-4, 0.0], dtype=torch.float64)
        ref = samplers.sample(model, eps, sampler="adaptive", grid=grid, rtol=1e-8, atol=1e-8)
        x_T = eps * float(sch.sigma(1.0))  # the same start as samplers.sample uses
        res = {"reference_nfe": ref.nfe, "peers": {}, "ours": {}}
        for name, (cls, cfg) in PEERS.items():
            for nfe in NFES:
                steps = peer_steps(name, nfe)
                if steps is not None:
                    x, used = run_diffusers(cls, cfg, model, x_T, steps)
                    res["peers"][f"{name}@{nfe}"] = {**errors(x, ref.x, mix), "nfe": used}
        for sampler, opts, grid_cfg in configs:
            key = config_key(sampler, opts, grid_cfg)
            gopts = {k: v for k, v in grid_cfg.items() if k != "kind"}
            for nfe in NFES:
                r = samplers.sample(model, eps, sampler=sampler, nfe=nfe, grid=grid_cfg["kind"], grid_opts=gopts, **opts)
                res["ours"][f"{key}@{nfe}"] = {**errors(r.x, ref.x, mix), "nfe": r.nfe}
        out[pname] = res
        print(f"  seed {seed} {pname}: reference NFE {ref.nfe}", flush=True)
    return out


def config_key(sampler: str, opts: dict, grid_cfg: dict) -> str:
    """A readable key: 'ipndm afs=True order=3 | polynomial p=0.8 se_last=0.025'."""
    o = " ".join(f"{k}={v}" for k, v in opts.items())
    g = " ".join(f"{k}={v}" for k, v in grid_cfg.items() if k != "kind")
    return f"{sampler} {o} | {grid_cfg['kind']} {g}"


def best_peer(res: dict, nfe: int) -> tuple[str, dict]:
    """The diffusers configuration with the lowest RMSE at this NFE."""
    items = [(k, v) for k, v in res["peers"].items() if k.endswith(f"@{nfe}")]
    return min(items, key=lambda kv: kv[1]["rmse"])


def score(results: dict, key: str) -> tuple[float, dict]:
    """max over (problem, NFE) of RMSE ratio / allowed ratio, and of median ratio / 0.5 at NFE 20."""
    parts = {}
    for pname, res in results.items():
        for nfe in NFES:
            peer_name, peer = best_peer(res, nfe)
            ours = res["ours"][f"{key}@{nfe}"]
            parts[f"{pname}@{nfe} rmse"] = ours["rmse"] / peer["rmse"] / ALLOWED.get(nfe, 1.0)
            if nfe == 20:
                parts[f"{pname}@20 median"] = ours["median"] / peer["median"] / MEDIAN_ALLOWED_20
    return max(parts.values()), parts


def table(results: dict, key: str) -> str:
    """Markdown: per problem and NFE, the best diffusers configuration beside ours, as ratios."""
    lines = ["| problem | NFE | best diffusers | its RMSE | ours RMSE | RMSE ratio | median ratio | flips % ours / peer |",
             "|---|---|---|---|---|---|---|---|"]
    for pname, res in results.items():
        for nfe in NFES:
            pn, peer = best_peer(res, nfe)
            ours = res["ours"][f"{key}@{nfe}"]
            lines.append(f"| {pname} | {nfe} | {pn.split('@')[0]} | {peer['rmse']:.4g} | {ours['rmse']:.4g} | "
                         f"{ours['rmse'] / peer['rmse']:.3f} | {ours['median'] / peer['median']:.3f} | "
                         f"{ours['flip_pct']:.2f} / {peer['flip_pct']:.2f} |")
    return "\n".join(lines)


def plot(payload: dict) -> Path:
    """results/sampler_defaults.png: RMSE vs NFE (log-log) of the default, beside every diffusers peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tune, key = payload["tune"], payload["chosen"]
    fig, axes = plt.subplots(1, len(tune), figsize=(6.2 * len(tune), 4.6), squeeze=False)
    for ax, (pname, res) in zip(axes[0], tune.items()):
        for name in PEERS:
            pts = [(n, res["peers"][f"{name}@{n}"]["rmse"]) for n in NFES if f"{name}@{n}" in res["peers"]]
            ax.loglog(*zip(*pts), color="0.6", lw=0.8, alpha=0.7, label="diffusers schedulers" if name == "DDIM trailing" else None)
        best = [best_peer(res, n)[1]["rmse"] for n in NFES]
        ax.loglog(NFES, best, "k--", lw=1.5, label="best diffusers config at each NFE")
        ax.loglog(NFES, [res["ours"][f"{key}@{n}"]["rmse"] for n in NFES], "o-", color="tab:red", lw=2,
                  label="samplers default (one config)")
        ax.set_title(f"{pname}, DDPM schedule, seed {payload['seeds']['tune']}")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE per dimension vs dopri5 reference")
        ax.set_xticks(list(NFES))
        ax.set_xticklabels([str(n) for n in NFES])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "sampler_defaults.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    """Tune on SEED_TUNE, check the winner on SEED_CHECK, write results/sampler_defaults.{md,json,png}."""
    torch.set_num_threads(1)  # tiny tensors: threads only spin on a shared machine
    t0 = time.time()
    cands = candidates()
    tune = measure(SEED_TUNE, cands)
    scored = sorted(((score(tune, config_key(*c))[0], c) for c in cands), key=lambda z: z[0])
    best = scored[0][1]
    best_key = config_key(*best)
    check = measure(SEED_CHECK, [best])
    check_score, check_parts = score(check, best_key)
    current = config_key(samplers.defaults.SAMPLER, samplers.defaults.OPTIONS, samplers.defaults.GRID)
    payload = {"seeds": {"tune": SEED_TUNE, "check": SEED_CHECK}, "nfes": NFES, "allowed": ALLOWED,
               "ranking": [{"config": config_key(*c), "score": s} for s, c in scored], "chosen": best_key,
               "chosen_score_tune": scored[0][0], "chosen_score_check": check_score, "check_parts": check_parts,
               "defaults_py": current, "tune": tune, "check": check, "seconds": time.time() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampler_defaults.json").write_text(json.dumps(payload, indent=1) + "\n")
    md = [
        "# Default sampler + grid: tuning on the exact oracle",
        "",
        "DDPM schedule (linear betas 1e-4..0.02, T=1000); exact mixture denoiser; reference dopri5 "
        "rtol=atol=1e-8 from the same x_T. Samples: " + ", ".join(f"{k} {n}" for k, (_, n) in PROBLEMS.items()) + ".",
        f"Tuning seed {SEED_TUNE}, check seed {SEED_CHECK} (the formal benchmark uses seed 0). "
        "Score = max over problems and NFE of (RMSE ratio to the best diffusers configuration at that NFE) / "
        "(allowed ratio: 0.6 at NFE 5 and 10, 1 elsewhere), and (median ratio / 0.5) at NFE 20; < 1 meets every target.",
        "",
        f"**Chosen:** `{best_key}` — score {scored[0][0]:.3f} on seed {SEED_TUNE}, {check_score:.3f} on seed {SEED_CHECK}.",
        f"`samplers/defaults.py` currently holds: `{current}`"
        + (" (same)." if current == best_key else " (DIFFERENT: update defaults.py)."),
        "",
        "## Ranking (seed %d)" % SEED_TUNE, "",
        "| score | configuration |", "|---|---|",
        *[f"| {s:.3f} | `{config_key(*c)}` |" for s, c in scored],
        "", f"## Chosen configuration vs the best diffusers configuration per NFE, seed {SEED_TUNE}", "",
        table(tune, best_key),
        "", "![RMSE vs NFE](sampler_defaults.png)",
        "", f"## Check on seed {SEED_CHECK}", "", table(check, best_key),
        "", f"Wall time {payload['seconds']:.0f} s.",
    ]
    (RESULTS / "sampler_defaults.md").write_text("\n".join(md) + "\n")
    plot(payload)
    print(f"chosen: {best_key} (score {scored[0][0]:.3f} tune, {check_score:.3f} check); defaults.py: {current}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
