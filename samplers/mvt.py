"""Mean-value-theorem solver (AMED-style, docs/theory.md §6.10) and its small learned predictor.

One step from se_c to se_n with coefficients (r, c, a):

    s     = se_n^r se_c^(1-r)                 (the learned intermediate level; (1-r) se_c when se_n = 0)
    y_mid = y + (s - se_c) (y - D(y, se_c))/se_c
    y     = y + c (se_n - se_c) (y_mid - D(y_mid, a s))/s

two network calls per step. r=0 is Euler; r=1/2, c=a=1 the geometric midpoint (DPM-Solver-2). The
step to se=0 uses the linear midpoint family s = (1-r) se_c because the geometric one collapses to
0 there (for se_c << data std the mean-value point of that last integral is se_c/2).

``mvt_step`` is differentiable in (r, c, a), so a training loop (``python -m distill amed``) can fit
an ``AMEDPredictor`` by regressing one student step onto a finer teacher solve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion.prediction import expand

from .core import FiniteWatch, afs_slope, from_edm, report, steps, to_edm
from .noise import GeneratorLike
from .registry import register

Coef = Union[float, torch.Tensor]
#: se=0 (the last step's target) is embedded as this level: below any grid's se_last.
EMBED_SE_FLOOR = 1e-4
FORMAT = "unified-diffusion/amed-predictor"
R_MARGIN = 1e-4


def noise_embedding(se: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of log(se)/4 (EDM's c_noise axis), frequencies 0.5..32."""
    if dim % 2:
        raise ValueError(f"embedding dim must be even; got {dim}")
    u = torch.log(torch.as_tensor(se, dtype=torch.float64).clamp_min(EMBED_SE_FLOOR)) / 4
    freqs = torch.exp(torch.linspace(math.log(0.5), math.log(32.0), dim // 2, dtype=torch.float64, device=u.device))
    ang = u.reshape(-1, 1) * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


class AMEDPredictor(nn.Module):
    """g_phi(se_c, se_n, features) -> (r, c, a): the per-step coefficients of the mvt solver.

    Features (the U-Net bottleneck's channel means, ``feature_dim`` values) go through an MLP
    ``feature_dim -> hidden -> 4`` (SiLU); a model with no features (the oracle) feeds the time
    embeddings to the MLP instead. The MLP output and the embeddings of se_c and se_n feed one
    linear head; ``r = sigmoid``, ``c = 1 + delta_c (2 sigmoid - 1)``, ``a`` likewise. The head
    starts at zero, i.e. at the geometric midpoint r=1/2, c=a=1.
    """

    def __init__(self, feature_dim: int = 0, hidden: int = 128, emb_dim: int = 16, delta_c: float = 0.01,
                 delta_a: float = 0.0):
        super().__init__()
        if feature_dim < 0 or hidden < 1 or emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"AMEDPredictor needs feature_dim >= 0, hidden >= 1 and an even emb_dim >= 2; "
                             f"got feature_dim={feature_dim}, hidden={hidden}, emb_dim={emb_dim}")
        if not (0 <= delta_c < 1 and 0 <= delta_a < 1):
            raise ValueError(f"delta_c and delta_a must lie in [0, 1); got {delta_c}, {delta_a}")
        self.feature_dim, self.hidden, self.emb_dim = int(feature_dim), int(hidden), int(emb_dim)
        self.delta_c, self.delta_a = float(delta_c), float(delta_a)
        self.meta: dict[str, Any] = {}
        in_dim = self.feature_dim if self.feature_dim > 0 else 2 * self.emb_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, 4))
        self.head = nn.Linear(4 + 2 * self.emb_dim, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in the safetensors metadata)."""
        return dict(feature_dim=self.feature_dim, hidden=self.hidden, emb_dim=self.emb_dim,
                    delta_c=self.delta_c, delta_a=self.delta_a)

    def forward(self, se_c: Coef, se_n: Coef, features: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r, c, a), each [B] (B from the features, else from se_c / se_n, else 1)."""
        p = self.head.weight
        levels = [torch.as_tensor(v, dtype=torch.float64, device=p.device).reshape(-1) for v in (se_c, se_n)]
        batch = features.shape[0] if features is not None else max(v.numel() for v in levels)
        emb = torch.cat([noise_embedding(v.expand(batch) if v.numel() == 1 else v, self.emb_dim) for v in levels],
                        dim=1).to(p.dtype)
        if self.feature_dim > 0:
            if features is None or features.shape[-1] != self.feature_dim:
                got = None if features is None else tuple(features.shape)
                raise ValueError(f"this AMED predictor needs features of shape [B, {self.feature_dim}]; got {got}")
            h = self.mlp(features.to(p.dtype))
        else:
            h = self.mlp(emb)
        out = self.head(torch.cat([h, emb], dim=1))
        # kept off 0 and 1: r=1 on the last step would put the intermediate level at s=0
        r = torch.sigmoid(out[:, 0]).clamp(R_MARGIN, 1 - R_MARGIN)
        c = 1 + self.delta_c * (2 * torch.sigmoid(out[:, 1]) - 1)
        a = 1 + self.delta_a * (2 * torch.sigmoid(out[:, 2]) - 1)
        return r, c, a


def save_predictor(path: Union[str, Path], pred: AMEDPredictor, meta: Optional[dict] = None) -> None:
    """Write the predictor's weights as safetensors; config and ``meta`` (JSON) go in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in pred.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(pred.config()),
                                            "meta": json.dumps(meta if meta is not None else pred.meta)})


def load_predictor(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> AMEDPredictor:
    """Rebuild a predictor saved by ``save_predictor``; its saved ``meta`` dict is on ``.meta``."""
    path = str(path)
    with safe_open(path, framework="pt") as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT or "config" not in md:
        raise ValueError(f"{path} is not an AMED predictor file (metadata format={md.get('format')!r}, "
                         f"expected {FORMAT!r})")
    pred = AMEDPredictor(**json.loads(md["config"]))
    pred.load_state_dict(load_file(path, device=str(device)))
    pred.meta = json.loads(md.get("meta", "{}"))
    return pred.to(device)


def _coef(v: Coef, y: torch.Tensor) -> torch.Tensor:
    """A coefficient as float64 (scalar or [B]) on y's device, keeping its autograd graph."""
    return torch.as_tensor(v, device=y.device).to(torch.float64)


def mvt_step(model, y: torch.Tensor, se_c: float, se_n: float, r: Coef = 0.5, c: Coef = 1.0, a: Coef = 1.0, *,
             x0_c: Optional[torch.Tensor] = None, class_labels: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One mvt step from se_c to se_n in the EDM view; returns (y_next, D(y, se_c)).

    Differentiable in r, c, a (floats or [B] tensors). Pass ``x0_c`` (the denoiser output at
    (y, se_c), or the AFS value) to reuse it: the step then costs one network call.
    """
    if not (se_c > se_n >= 0):
        raise ValueError(f"mvt_step needs se_c > se_n >= 0; got se_c={se_c}, se_n={se_n}")
    if x0_c is None:
        x0_c = model.denoise(y, se_c, class_labels)
    if all(isinstance(v, (float, int)) for v in (r, c, a)):
        # fixed coefficients: Python floats all the way, so the levels hit the model's cache
        s = mid_level(se_c, se_n, r)
        y_mid = y + (s - se_c) * (y - x0_c) / se_c
        x0_mid = model.denoise(y_mid, a * s, class_labels)
        return y + (c * (se_n - se_c) / s) * (y_mid - x0_mid), x0_c
    # learned per-sample coefficients (the predictor keeps r inside (0, 1), so s > 0 without a check)
    rr = _coef(r, y)
    s = torch.exp(rr * math.log(se_n) + (1 - rr) * math.log(se_c)) if se_n > 0 else (1 - rr) * se_c
    y_mid = y + expand(s - se_c, y) * (y - x0_c) / se_c
    x0_mid = model.denoise(y_mid, _coef(a, y) * s, class_labels)
    y_next = y + expand(_coef(c, y) * (se_n - se_c) / s, y) * (y_mid - x0_mid)
    return y_next, x0_c


def mid_level(se_c: float, se_n: float, r: float) -> float:
    """The intermediate level s = se_n^r se_c^(1-r) ((1-r) se_c on the step to 0); ValueError unless s > 0."""
    s = math.exp(r * math.log(se_n) + (1 - r) * math.log(se_c)) if se_n > 0 else (1 - r) * se_c
    if not s > 0:
        raise ValueError(f"mvt_step: intermediate level s must be > 0 (r < 1 on the last step); got r={r}")
    return s


def features_of(model, predictor: AMEDPredictor) -> Optional[torch.Tensor]:
    """The predictor's input features from the model's last forward (bottleneck means), or None."""
    if predictor.feature_dim == 0:
        return None
    get = getattr(model.net, "bottleneck_features", None)
    if get is None:
        raise ValueError(f"this AMED predictor expects {predictor.feature_dim} features but the network "
                         f"({type(model.net).__name__}) has no bottleneck_features()")
    return get()


@register("mvt", nfe=lambda n, afs=False, **_: 2 * n - int(bool(afs)), rule="2n (2n-1 with afs)")
@torch.no_grad()
def mvt(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
        class_labels: Optional[torch.Tensor] = None, progress: bool = False,
        predictor: Union[None, str, Path, AMEDPredictor] = None, r: float = 0.5, c: float = 1.0, a: float = 1.0,
        afs: bool = False) -> torch.Tensor:
    """AMED-style mean-value solver: per step (r, c, a) from ``predictor`` (module or .safetensors path), else fixed.

    With AFS the first step's first call is the analytic slope; its predictor features are zeros.
    """
    pred = load_predictor(predictor) if isinstance(predictor, (str, Path)) else predictor
    y, sig = to_edm(model, x, grid)
    batch = y.shape[0]
    if pred is not None:
        pred = pred.to(y.device)
        if pred.feature_dim > 0 and getattr(model.net, "bottleneck_features", None) is None:
            features_of(model, pred)  # raises the explanatory error
    watch = FiniteWatch()
    if pred is None and hasattr(model, "prepare_levels"):  # fixed (r, c, a): every level is known up front
        model.prepare_levels([a * mid_level(sig[i], sig[i + 1], r) for i in range(len(sig) - 1)])
    for i in steps(sig, progress, "mvt"):
        se, sn = sig[i], sig[i + 1]
        if afs and i == 0:
            x0 = y - se * afs_slope(y, se)
            feats = None if pred is None or pred.feature_dim == 0 else torch.zeros(batch, pred.feature_dim, device=y.device)
        else:
            x0 = model.denoise(y, se, class_labels)
            feats = None if pred is None else features_of(model, pred)
        if pred is not None:
            full = lambda v: torch.full((batch,), v, dtype=torch.float64, device=y.device)  # noqa: E731
            rr, cc, aa = pred(full(se), full(sn), feats)
        else:
            rr, cc, aa = r, c, a
        y, _ = mvt_step(model, y, se, sn, rr, cc, aa, x0_c=x0, class_labels=class_labels)
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


__all__ = ["AMEDPredictor", "noise_embedding", "save_predictor", "load_predictor", "mvt_step", "features_of", "mvt"]
