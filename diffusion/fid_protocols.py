"""FID protocols (which preprocessing, network and reference make a number comparable) and the fid50k recipe.

| protocol | features | matches |
|---|---|---|
| ``clean`` | clean-fid "clean": PIL bicubic resize to 299, then Inception-v3 (2015-12-05 TF weights) | clean-fid (Parmar et al. 2022) and papers that report clean-fid |
| ``legacy-tf`` | clean-fid "legacy_tensorflow": the same TF Inception resizing inside the network | TF FID (TTUR), StyleGAN2-ADA / StyleGAN3 ``fid50k_full`` |
| ``edm`` | ``legacy-tf`` features against an EDM / ADM reference ``.npz`` (``mu``, ``sigma``) | EDM ``fid.py`` and the papers that use it: EDM, AMED, SiD, GITS; ADM's reference batches |

The ``edm`` protocol reads only ``mu`` and ``sigma`` from the reference (``np.load(allow_pickle=False)``;
ADM's batches also hold images, which are not loaded), and its published numbers are the minimum over
3 sets of 50,000 images (``fid50k``: seeds 0.., 50000.., 100000..).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

PROTOCOLS = {
    "clean": {"cleanfid_mode": "clean", "matches": "clean-fid (Parmar et al. 2022) and papers reporting clean-fid"},
    "legacy-tf": {"cleanfid_mode": "legacy_tensorflow",
                  "matches": "TF FID (TTUR), StyleGAN2-ADA / StyleGAN3 fid50k_full"},
    "edm": {"cleanfid_mode": "legacy_tensorflow",
            "matches": "EDM fid.py with EDM/ADM reference statistics: EDM, AMED, SiD, GITS (min over 3 x 50k)"},
}
FID50K_IMAGES = 50_000
FID50K_SEED_SETS = 3


def check_protocol(name: str, ref: str) -> dict:
    """The protocol's settings; refuses unknown names and, for ``edm``, a reference that is not an .npz."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {name!r}; valid: {sorted(PROTOCOLS)}")
    if name == "edm" and not (str(ref).endswith(".npz") and Path(ref).is_file()):
        raise ValueError(f"--protocol edm compares against EDM/ADM reference statistics: an .npz with mu and sigma "
                         f"(e.g. EDM's cifar10-32x32.npz); got --ref {ref!r}")
    return {"protocol": name, **PROTOCOLS[name]}


def load_reference_npz(path: str | Path):
    """mu and sigma of an EDM / ADM / clean-fid reference .npz, never unpickling (other arrays are not read)."""
    import numpy as np

    from .metrics import FeatureStats

    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"reference {str(path)!r} lacks {missing} (has {z.files}); expected EDM/ADM statistics "
                             f"with 'mu' [F] and 'sigma' [F, F]")
        return FeatureStats(np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64),
                            np.asarray(z["feats"]) if "feats" in z.files else None)


def seed_ranges(num: int = FID50K_IMAGES, sets: int = FID50K_SEED_SETS, start: int = 0) -> list[int]:
    """First seed of each set: disjoint ranges [start + k num, start + (k+1) num)."""
    if num < 2 or sets < 1:
        raise ValueError(f"need --num >= 2 images and --seed-sets >= 1; got {num}, {sets}")
    return [start + k * num for k in range(sets)]


def fid50k(sample: Callable[[int, Path], None], evaluate: Callable[[Path], dict], out_dir: str | Path,
           num: int = FID50K_IMAGES, sets: int = FID50K_SEED_SETS) -> dict:
    """Sample ``sets`` disjoint seed ranges of ``num`` images, FID each; min and mean (EDM reports the min)."""
    out_dir = Path(out_dir)
    runs, first_record = [], None
    for first in seed_ranges(num, sets):
        folder = out_dir / f"seeds_{first:07d}-{first + num - 1:07d}"
        sample(first, folder)
        rec = evaluate(folder)
        first_record = first_record or rec
        runs.append({"seeds": [first, first + num - 1], "folder": str(folder), "fid": rec["fid"],
                     "num_images": rec["num_images"]})
    fids = [r["fid"] for r in runs]
    return {"fid_min": min(fids), "fid_mean": sum(fids) / len(fids),
            "fid_std": math.sqrt(sum((f - sum(fids) / len(fids)) ** 2 for f in fids) / len(fids)),
            "num_images_per_set": num, "seed_sets": runs, "first_record": first_record}


__all__ = ["PROTOCOLS", "FID50K_IMAGES", "FID50K_SEED_SETS", "check_protocol", "load_reference_npz", "seed_ranges",
           "fid50k"]
