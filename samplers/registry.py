"""The sampler registry: name -> function, its NFE rule and its default grid."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

MAX_STEPS = 10_000


@dataclass(frozen=True)
class Spec:
    """A registered sampler: ``fn(model, x, grid, **opts)``, ``nfe(steps, **opts)`` and a human NFE rule."""

    name: str
    fn: Callable
    nfe: Optional[Callable[..., int]]  # None: adaptive, the NFE is only known afterwards
    rule: str
    grid: str  # "default" (samplers/defaults.py) or a grid kind from samplers.grids
    stochastic: bool

    def options(self) -> list[str]:
        """Keyword options the sampler function accepts."""
        return list(_keyword_options(self.fn))


@functools.lru_cache(maxsize=None)
def _keyword_options(fn: Callable) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY)


_REGISTRY: dict[str, Spec] = {}


def register(name: str, *, nfe: Optional[Callable[..., int]], rule: str, grid: str = "default",
             stochastic: bool = False) -> Callable[[Callable], Callable]:
    """Decorator adding a sampler function to the registry under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"sampler {name!r} registered twice")
        _REGISTRY[name] = Spec(name, fn, nfe, rule, grid, stochastic)
        return fn

    return deco


def available() -> list[str]:
    """Names of every registered sampler."""
    return sorted(_REGISTRY)


def spec(name: str) -> Spec:
    """The registry entry of ``name``; ValueError listing ``available()`` if unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available samplers: {available()}")
    return _REGISTRY[name]


def get(name: str) -> Callable:
    """The sampler function ``(model, x, grid, *, generator, callback, class_labels, **opts) -> x0``."""
    return spec(name).fn


def nfe_of(name: str, steps: int, **opts) -> int:
    """Network evaluations ``name`` uses for ``steps`` steps on a grid ending at 0."""
    s = spec(name)
    if s.nfe is None:
        raise ValueError(f"sampler {name!r} is adaptive: its NFE is only known after sampling (set rtol/atol)")
    return int(s.nfe(steps, **opts))


def steps_for_nfe(name: str, nfe: int, **opts) -> int:
    """The step count whose NFE is exactly ``nfe``; ValueError naming the nearest valid budgets."""
    s = spec(name)
    if s.nfe is None:
        raise ValueError(f"sampler {name!r} is adaptive and takes no NFE budget; give rtol/atol instead "
                         f"(or pick one of {[n for n in available() if _REGISTRY[n].nfe is not None]})")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"NFE budget must be an integer >= 1; got {nfe!r}")
    below, above = None, None
    for n in range(1, MAX_STEPS):  # every NFE rule increases with the step count
        b = nfe_of(name, n, **opts)
        if b == nfe:
            return n
        if b > nfe:
            above = b
            break
        if b >= 1:
            below = b
    near = [b for b in (below, above) if b is not None]
    shown = {k: v for k, v in opts.items() if k in ("afs", "corrector_steps")}
    raise ValueError(f"sampler {name!r}{' with ' + str(shown) if shown else ''} cannot use exactly {nfe} NFE "
                     f"(it needs {s.rule} for n steps); nearest valid budgets: {near}")


__all__ = ["Spec", "register", "available", "spec", "get", "nfe_of", "steps_for_nfe"]
