"""Pretrained diffusers models behind the ScoreModel interface.

A diffusers pipeline folder in the DDPMPipeline layout (``unet/`` holding a ``UNet2DModel`` and
``scheduler/``) or a Hub id of one becomes a ScoreModel (``score_model_kwargs``):

* a scheduler with ``alphas_cumprod`` (DDPM, DDIM, PNDM, DPM-Solver, ...) becomes
  ``ScoreModel(net, DDPM(betas), parametrization, conditioning="index")``: its ``alphas_cumprod`` are
  our ``alpha^2`` at the knots ``t = (n+1)/T`` (betas recomputed in float64), ``prediction_type``
  epsilon / v_prediction / sample becomes eps / v / x0 and the net sees diffusers' (fractional)
  timestep index ``n = t T - 1``;
* an EDM scheduler (EDMEuler, EDMDPMSolverMultistep) becomes EDM preconditioning on the EDM schedule
  with its sigma range and sigma_data (its precondition_noise is our c_noise = log(sigma)/4);
* FlowMatchEulerDiscreteScheduler becomes a velocity net on the flow schedule that sees 1000 t.

So every sampler, Skip-Tuning (the adapter exposes ``num_skips``/``set_skip_scales``), the AMED
bottleneck feature, likelihood and SiD work on it. Weights are read from safetensors only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .models.hooks import UNet2DHooks
from .scheduler_fields import ProcessedX0Model, x0_transform
from .schedules import DDPM, EDM, Flow
from .score_model import ScoreModel

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class DiffusersUNet(UNet2DHooks, nn.Module):
    """A diffusers ``UNet2DModel`` as a project net: ``net(x, c_noise, class_labels) -> x.shape``.

    ``c_noise`` is diffusers' timestep index (may be fractional). A learned-variance model
    (``out_channels = 2 * in_channels``) returns only its mean half. Skip i (0 = nearest the
    input) is element i of diffusers' ``down_block_res_samples``.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.img_channels = int(cfg.in_channels)
        self.img_resolution = int(cfg.sample_size) if isinstance(cfg.sample_size, int) else int(cfg.sample_size[0])
        out = int(cfg.out_channels)
        if out not in (self.img_channels, 2 * self.img_channels):
            raise ValueError(f"UNet2DModel has in_channels={self.img_channels}, out_channels={out}; expected out "
                             f"= in (a prediction) or 2*in (prediction + learned variance)")
        self.learned_variance = out == 2 * self.img_channels
        self.num_classes = int(cfg.num_class_embeds or 0) if cfg.class_embed_type is None else 0
        if cfg.class_embed_type is not None:
            raise ValueError(f"class_embed_type={cfg.class_embed_type!r} is not supported; only an embedding "
                             f"table (num_class_embeds) or no class conditioning")
        self._setup_unet2d_hooks(unet)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the UNet at (fractional) diffusers timestep ``c_noise`` [B]."""
        if class_labels is not None:
            if self.num_classes == 0:
                raise ValueError("class labels given to an unconditional diffusers UNet")
            if (class_labels >= self.num_classes).any() or (class_labels < 0).any():
                raise ValueError(f"class label out of range {int(class_labels.min())}..{int(class_labels.max())}: "
                                 f"this diffusers UNet has {self.num_classes} classes (0..{self.num_classes - 1}) and "
                                 f"no null class, so classifier-free guidance is unavailable")
        elif self.num_classes:
            raise ValueError(f"this diffusers UNet is class-conditional ({self.num_classes} classes): give class labels")
        c = torch.as_tensor(c_noise, device=x.device).to(torch.float32).reshape(-1).expand(x.shape[0])
        out = self.unet(x, c, class_labels=class_labels, return_dict=False)[0]
        return out[:, : self.img_channels] if self.learned_variance else out

    def _unet2d(self) -> nn.Module:
        return self.unet


def schedule_from_scheduler(scheduler) -> DDPM:
    """Our DDPM schedule with the scheduler's alphas_cumprod at the knots t = (n+1)/T."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; supported: discrete-time VP schedulers "
                         f"(DDPMScheduler, DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler, ...)")
    ac = torch.as_tensor(ac, dtype=torch.float64)
    if not ((ac > 0) & (ac < 1)).all():
        raise ValueError("scheduler alphas_cumprod must lie in (0, 1) (zero-terminal-SNR schedules, "
                         "rescale_betas_zero_snr=True, reach 0 and have no finite EDM sigma at the end)")
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return DDPM(betas=1 - ac / prev)


def score_model_kwargs(scheduler) -> dict:
    """Schedule, parametrization and conditioning that make a diffusers scheduler's net a ScoreModel.

    EDM schedulers (EDMEuler / EDMDPMSolverMultistep): EDM's preconditioning with c_noise = log(sigma)/4,
    which is diffusers' ``precondition_noise``; FlowMatchEuler: the flow schedule, a velocity net that
    sees 1000 * sigma; every scheduler with ``alphas_cumprod``: DDPM knots, diffusers' timestep index.
    """
    name, cfg = type(scheduler).__name__, scheduler.config
    pred = getattr(cfg, "prediction_type", "epsilon")
    if name.startswith("EDM"):
        if pred != "epsilon":
            raise ValueError(f"{name} prediction_type={pred!r} is not supported; valid: 'epsilon' (EDM's F, c_out > 0)")
        return dict(schedule=EDM(sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max)), parametrization="edm",
                    conditioning="edm", sigma_data=float(cfg.sigma_data))
    if name == "FlowMatchEulerDiscreteScheduler":
        if int(cfg.num_train_timesteps) != 1000:
            raise ValueError(f"{name} num_train_timesteps={cfg.num_train_timesteps} is not supported; valid: 1000 "
                             f"(the net sees 1000 * sigma)")
        return dict(schedule=Flow(), parametrization="velocity", conditioning="1000t")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {pred!r} is not supported; valid: {sorted(PREDICTION_TYPES)}")
    return dict(schedule=schedule_from_scheduler(scheduler), parametrization=PREDICTION_TYPES[pred], conditioning="index")


def _exported_schedule(folder: Path, kwargs: dict):
    """The continuous schedule a ``python -m diffusion.export`` DDIM folder was cut from (1000t nets), else None.

    Its DDIMScheduler holds that schedule at the knots t = n/1000 only; rebuilding it keeps
    ``--pretrained OUT`` on the same grids, hence the same images, as ``--run RUN``.
    """
    from omegaconf import OmegaConf

    from .export import EXPORT_INFO

    path = folder / EXPORT_INFO
    if kwargs["conditioning"] != "index" or not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("conditioning") != "1000t" or "schedule_config" not in record:
        return None
    from .build import build_schedule

    cfg = OmegaConf.create({"schedule": record["schedule_config"], "model": {"input_shape": record["input_shape"]}})
    return build_schedule(cfg)


def _local_folder(path_or_id: str) -> Path:
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"pretrained model {path_or_id!r}: no such folder, and not a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["model_index.json", "unet/*.json",
                                                                  f"unet/{WEIGHTS_FILE}", "scheduler/*"]))
    except Exception as e:  # offline, unknown repo, gated...: say what was tried
        raise FileNotFoundError(f"could not fetch {path_or_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                                f"download it elsewhere and pass the local folder to --pretrained") from e


def load_pretrained(path_or_id: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[ScoreModel, dict]:
    """Load a diffusers UNet2DModel + scheduler folder (or Hub id) as a ScoreModel; also returns info.

    ``info`` holds the folder, the weights' sha256, the scheduler class and prediction type.
    """
    import diffusers
    from diffusers import UNet2DModel

    from .metrics import sha256_file

    folder = _local_folder(path_or_id)
    need = [folder / "unet" / "config.json", folder / "unet" / WEIGHTS_FILE, folder / "scheduler" / "scheduler_config.json"]
    missing = [str(p.relative_to(folder)) for p in need if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a diffusers pipeline folder in DDPMPipeline layout with "
                                f"safetensors weights: missing {missing} (expected unet/config.json, unet/{WEIGHTS_FILE}, "
                                f"scheduler/scheduler_config.json)")
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls_name = sched_cfg.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {cls_name!r} in {folder / 'scheduler'}")
    scheduler = cls.from_pretrained(folder, subfolder="scheduler")
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, torch_dtype=dtype).to(device)
    unet.eval().requires_grad_(False)
    net = DiffusersUNet(unet)
    kwargs = score_model_kwargs(scheduler)
    exported = _exported_schedule(folder, kwargs)
    if exported is not None:
        kwargs.update(schedule=exported, conditioning="1000t")
    transform = x0_transform(scheduler)  # clip_sample / thresholding; refuses what cannot be read
    if transform is None:
        model = ScoreModel(net, **kwargs, num_classes=net.num_classes)
    else:
        model = ProcessedX0Model(net, **kwargs, num_classes=net.num_classes, x0_transform=transform)
    model.diffusers_scheduler = scheduler  # for native_sampling: the scheduler's own timesteps
    info = {"source": path_or_id, "folder": str(folder), "weights": str(folder / "unet" / WEIGHTS_FILE),
            "sha256": sha256_file(folder / "unet" / WEIGHTS_FILE), "scheduler": cls_name, "prediction_type": pred,
            "num_train_timesteps": int(scheduler.config.num_train_timesteps),
            "sample_shape": [net.img_channels, net.img_resolution, net.img_resolution],
            "schedule": model.schedule.name + (" (from the export record)" if exported is not None else "")}
    return model, info


def load_source(run: Optional[str] = None, pretrained: Optional[str] = None, ema: bool = True,
                device: str | torch.device = "cpu") -> tuple[ScoreModel, dict]:
    """A ScoreModel from a trained run folder or a pretrained diffusers model, with checkpoint info."""
    from .metrics import sha256_file

    if (run is None) == (pretrained is None):
        raise ValueError("give exactly one of a run folder (--run) or a pretrained model (--pretrained)")
    if pretrained is not None:
        model, info = load_pretrained(pretrained, device=device)
        return model, {"kind": "pretrained", **info}
    from .checkpoint import EMA_NAME, MODEL_NAME, load_run

    try:
        model, _ = load_run(run, ema=ema, device=device)  # raises clearly for missing weights and key mismatches
    except RuntimeError as e:  # torch's load_state_dict reports shape mismatches as RuntimeError
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ValueError(f"the weights in {run} do not fit the network built from its config.yaml "
                         f"({len(lines)} shape mismatches, e.g. {lines[0] if lines else str(e)[:200]})") from e
    weights = Path(run) / (EMA_NAME if ema else MODEL_NAME)
    return model, {"kind": "run", "run": str(run), "weights": str(weights), "sha256": sha256_file(weights), "ema": ema}


def sample_shape(model: ScoreModel) -> tuple[int, ...]:
    """Shape of one sample: (C, H, W) for image nets, (D,) for vector nets."""
    net = model.net
    if getattr(net, "img_resolution", None):
        return (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    if getattr(net, "dim", None):
        return (int(net.dim),)
    raise ValueError(f"cannot tell the sample shape of {type(net).__name__}: it has neither img_resolution nor dim")


__all__ = ["DiffusersUNet", "schedule_from_scheduler", "score_model_kwargs", "load_pretrained", "load_source", "sample_shape",
           "PREDICTION_TYPES"]
