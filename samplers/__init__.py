"""Samplers: short functions over an explicit grid of EDM noise levels, plus one entry point.

    import samplers
    samplers.available()                       # registered names
    fn = samplers.get("heun")                  # fn(model, x_T, grid, *, generator, callback, class_labels, **opts) -> x0
    res = samplers.sample(model, noise, nfe=10)                   # measured default sampler + grid
    res = samplers.sample(model, noise, sampler="heun", nfe=35)   # res.x, res.nfe, res.grid, res.sampler
"""

from . import grids, noise
from . import adaptive as _adaptive  # noqa: F401  (registers)
from . import flow as _flow  # noqa: F401
from . import multistep as _multistep  # noqa: F401
from . import ode as _ode  # noqa: F401
from . import stochastic as _stochastic  # noqa: F401
from .api import SampleResult, default_grid, sample
from .core import NonFiniteError
from .mvt import AMEDPredictor, load_predictor, mvt_step, save_predictor
from .registry import available, get, nfe_of, steps_for_nfe
from .skip_tuning import skip_scales, skip_tuning

__all__ = ["available", "get", "sample", "SampleResult", "default_grid", "nfe_of", "steps_for_nfe", "grids", "noise",
           "NonFiniteError", "AMEDPredictor", "save_predictor", "load_predictor", "mvt_step", "skip_tuning",
           "skip_scales"]
