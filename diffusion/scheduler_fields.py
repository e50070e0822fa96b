"""The diffusers scheduler fields that change a result, and how ``--pretrained`` honours or refuses each.

Model fields (they change the denoiser, so every sampler sees them):

* ``prediction_type``, the beta schedule (``beta_schedule`` / ``beta_start`` / ``beta_end`` /
  ``trained_betas``): read through ``alphas_cumprod`` (see pretrained.py); ``rescale_betas_zero_snr``
  is refused (alpha reaches 0, no finite EDM sigma).
* ``clip_sample`` (+ ``clip_sample_range``) and ``thresholding`` (+ ``dynamic_thresholding_ratio``,
  ``sample_max_value``): applied to the x0 prediction, the noise estimate then follows from the
  clipped x0, as DDPMScheduler does (DDIMScheduler does so with ``use_clipped_model_output=True``).

Grid and step fields (they change only the scheduler's own method): with the scheduler's own sampler
(``native_sampler``: ddim for DDIM/DDPM, euler for EDMEuler, flow_euler for FlowMatchEuler)
``native_sampling`` puts our sampler on the scheduler's timesteps: ``timestep_spacing`` /
``steps_offset``, FlowMatchEuler's ``shift``, the EDM ``sigma_schedule``, and DDPM's ``variance_type``
(fixed_small -> ddim eta 1 with the posterior variance, fixed_large -> ``variance="large"``). Values
the grid cannot express are refused in one line naming the field and value. Other samplers use our
own grids, which do not depend on these fields.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .prediction import Prediction
from .score_model import ScoreModel

NATIVE_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddim", "EDMEulerScheduler": "euler",
                   "FlowMatchEulerDiscreteScheduler": "flow_euler"}
# FlowMatchEuler options that bend its grid in ways a fixed-shift flow grid does not express
FLOW_REFUSED = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


def refuse(scheduler, field: str, value, why: str) -> ValueError:
    """The one-line error for a field value ``--pretrained`` cannot reproduce."""
    return ValueError(f"{type(scheduler).__name__} {field}={value!r} is not supported: {why}")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = clamp(quantile(|x0|, ratio), 1, max); x0 -> clamp(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs().float(), ratio, dim=1).clamp(1, max_value).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def x0_transform(scheduler) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The scheduler's x0 post-processing (thresholding, else clipping), or None; refuses what it cannot read."""
    cfg = scheduler.config
    if cfg.get("rescale_betas_zero_snr", False):
        raise refuse(scheduler, "rescale_betas_zero_snr", True, "alpha reaches 0 at the last step, where the EDM "
                     "sigma is infinite; valid: false")
    if cfg.get("thresholding", False):
        ratio, top = float(cfg.get("dynamic_thresholding_ratio", 0.995)), float(cfg.get("sample_max_value", 1.0))
        return lambda x0: dynamic_threshold(x0, ratio, top)
    if cfg.get("clip_sample", False):
        r = float(cfg.get("clip_sample_range", 1.0))
        return lambda x0: x0.clamp(-r, r)
    return None


class ProcessedX0Model(ScoreModel):
    """A ScoreModel whose x0 prediction goes through the scheduler's clipping / thresholding."""

    def __init__(self, *args, x0_transform: Callable[[torch.Tensor], torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        self.x0_transform = x0_transform

    def forward(self, x: torch.Tensor, t, class_labels: Optional[torch.Tensor] = None) -> Prediction:
        """The wrapped prediction with x0 processed; eps, v, score follow from the processed x0."""
        p = super().forward(x, t, class_labels)
        return Prediction(p.x, self.x0_transform(p.x0), "x0", p.alpha, p.sigma, p.dalpha, p.dsigma)


def _consistent_steps(scheduler, ts: torch.Tensor, n: int) -> None:
    """DDIM/DDPM step from t to t - T//N; a grid exists only when that is the next timestep they evaluate."""
    stride = int(scheduler.config.num_train_timesteps) // n
    bad = [(int(a), int(b)) for a, b in zip(ts[:-1], ts[1:]) if int(a) - stride != int(b)]
    if bad:
        value = scheduler.config.get("timestep_spacing", "leading")
        raise refuse(scheduler, "timestep_spacing", value,
                     f"with {n} steps diffusers steps from {bad[0][0]} to {bad[0][0] - stride} but evaluates the net at "
                     f"{bad[0][1]} next, which no grid reproduces; use 'leading', or an NFE that divides "
                     f"{scheduler.config.num_train_timesteps}")


def native_sampling(model: ScoreModel, scheduler, sampler: Optional[str], nfe: Optional[int],
                    opts: dict) -> tuple[Optional[torch.Tensor], dict]:
    """(grid, extra sampler options) that make our sampler take the scheduler's own steps, or (None, {}).

    Only when ``sampler`` is the scheduler's own method (NATIVE_SAMPLERS) and an NFE is given.
    """
    name = type(scheduler).__name__
    if sampler is None or nfe is None or NATIVE_SAMPLERS.get(name) != sampler:
        return None, {}
    cfg, s = scheduler.config, model.schedule
    extra: dict = {}
    if name == "FlowMatchEulerDiscreteScheduler":
        for field in FLOW_REFUSED:
            if cfg.get(field):
                raise refuse(scheduler, field, cfg.get(field), "only a fixed shift is reproduced; valid: false/None")
        scheduler.set_timesteps(nfe)
        t = scheduler.sigmas.double()
        return torch.where(t >= 1, torch.full_like(t, float("inf")), t / (1 - t)), extra
    if name == "EDMEulerScheduler":
        if cfg.get("final_sigmas_type", "zero") != "zero":
            raise refuse(scheduler, "final_sigmas_type", cfg.final_sigmas_type, "it ends at sigma_min without the x0 "
                         "readout; valid: 'zero'")
        scheduler.set_timesteps(nfe)
        return scheduler.sigmas.double(), extra
    # DDIM / DDPM: integer timesteps; the net's conditioning says where timestep n sits in t
    scheduler.set_timesteps(nfe)
    ts = scheduler.timesteps.long()
    _consistent_steps(scheduler, ts, nfe)
    if name == "DDIMScheduler" and not cfg.get("set_alpha_to_one", True) and int(ts[-1]) - int(cfg.num_train_timesteps) // nfe < 0:
        raise refuse(scheduler, "set_alpha_to_one", False, "its last step ends at timestep 0's noise level, not at x0; "
                     "valid: true (or another sampler)")
    if name == "DDPMScheduler":
        vt = cfg.get("variance_type", "fixed_small")
        if vt in ("learned", "learned_range"):
            raise refuse(scheduler, "variance_type", vt, "the learned variance half of the net output is not used; "
                         "valid: fixed_small, fixed_small_log, fixed_large, fixed_large_log")
        if "eta" not in opts:  # DDPMPipeline's ancestral steps; an explicit --eta keeps the user's choice
            extra = {"eta": 1.0, "variance": "large" if vt.startswith("fixed_large") else "posterior"}
    n = ts.double()
    t = n / 1000 if model.conditioning == "1000t" else s.index_to_t(n)
    return torch.cat([s.sigma_edm(t), torch.zeros(1, dtype=torch.float64)]), extra


def native_noise_scale(model: ScoreModel, scheduler, grid: torch.Tensor) -> float:
    """Factor on unit noise so our start equals the pipeline's ``init_noise_sigma * eps``.

    ``samplers.sample`` starts at sigma(t_0) * noise; DDIM/DDPM pipelines start at eps, EDM ones at
    sqrt(sigma_max^2 + 1) * eps (k-diffusion's convention).
    """
    from samplers.core import alpha_at

    se0 = float(grid[0])
    s = model.schedule
    start = float(s.sigma(s.t_max)) if se0 == float("inf") else alpha_at(s, se0) * se0
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) / start


__all__ = ["native_noise_scale", "NATIVE_SAMPLERS", "dynamic_threshold", "x0_transform", "ProcessedX0Model", "native_sampling", "refuse"]
