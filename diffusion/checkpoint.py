"""Run folders and training checkpoints: safetensors weights + YAML config, never pickled code.

A run folder ``RUN/`` holds ``config.yaml`` (resolved), ``model.safetensors``, ``ema.safetensors``,
``samples.png``, ``loss.png``, ``metrics.jsonl`` and ``checkpoints/step_NNNNNNN/``. Checkpoints are
written into ``checkpoints/.tmp-step_NNNNNNN``, fsynced (files and folder) and renamed into place only
when complete, so a run killed mid-write (or a power cut) leaves the previous checkpoints intact;
partial folders are never listed. Each checkpoint ends with ``index.json`` (every file and its size),
so a damaged one (a 0-byte, truncated or missing file) is recognised and ``--resume latest`` falls
back to the newest intact one. Everything is safetensors or JSON: optimizer tensors, LR-scheduler
state and RNG streams too, never pickles.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import torch
from omegaconf import DictConfig
from safetensors.torch import load_model, save_model
from torch import nn

from .config import load_config, to_yaml
from .score_model import ScoreModel

CONFIG_NAME = "config.yaml"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
INDEX_NAME = "index.json"  # written last into a checkpoint: its files and their sizes


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (damaged, incomplete or from an older format): one line, the file named."""


def _unwrap(net: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (their state-dict keys carry prefixes)."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk, so a power cut cannot leave it empty."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, path: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary name (fsynced) so readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _replace_durably(tmp, path)


def save_weights(net: nn.Module, path: str | Path) -> None:
    """A network's weights as safetensors (atomically and fsynced; shared tensors handled by safetensors)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(_unwrap(net), str(tmp))
    _replace_durably(tmp, path)


def load_weights(net: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load safetensors weights into ``net`` (strict: missing or unexpected keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    dev = torch.device(device)
    # safetensors accepts "cpu" but not "cpu:0" (what a distributed CPU process reports as its device)
    missing, unexpected = load_model(_unwrap(net), str(path), strict=False,
                                     device="cpu" if dev.type == "cpu" else str(dev))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the network built from the config: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    return net


def save_run(run_dir: str | Path, net: nn.Module, ema_net: Optional[nn.Module], cfg: DictConfig) -> Path:
    """Write ``config.yaml``, ``model.safetensors`` and (when given) ``ema.safetensors`` into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_NAME, to_yaml(cfg))
    save_weights(net, run_dir / MODEL_NAME)
    if ema_net is not None:
        save_weights(ema_net, run_dir / EMA_NAME)
    return run_dir


def load_run(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[ScoreModel, DictConfig]:
    """Rebuild the trained ScoreModel (EMA weights by default) and its config from a run folder."""
    from .build import build_score_model  # build imports the model zoo; keep checkpoint import light

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no {CONFIG_NAME}")
    cfg = load_config(cfg_path)
    weights = run_dir / (EMA_NAME if ema else MODEL_NAME)
    if not weights.is_file():
        ckpts = list_checkpoints(run_dir / CHECKPOINTS)
        hint = (f"; the run has checkpoints up to step {ckpts[-1][0]} (training unfinished? resume it with "
                f"`python train.py --config {cfg_path} --resume latest`)" if ckpts else "")
        raise FileNotFoundError(f"run folder {run_dir} has no {weights.name} (holds: "
                                f"{sorted(p.name for p in run_dir.iterdir())}){hint}")
    model = build_score_model(cfg)
    load_weights(model.net, weights, device)
    return model.to(device).eval(), cfg


# ---- training checkpoints ------------------------------------------------------------------------


def step_dir(root: str | Path, step: int) -> Path:
    """``root/step_NNNNNNN``."""
    return Path(root) / f"step_{step:07d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root as (step, path), oldest first; temporary folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _json_default(o: Any):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def save_json(obj: Any, path: Path) -> None:
    """A JSON file written atomically (tuples become lists; NaN/Inf keep Python's spelling)."""
    write_text_atomic(Path(path), json.dumps(obj, indent=1, default=_json_default) + "\n")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into named CPU tensors ("PID.KEY") and a JSON-able rest."""
    sd = opt.state_dict()
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                state[str(pid)][k] = {"tensor": f"{pid}.{k}"}
            else:
                state[str(pid)][k] = {"value": v}
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def optimizer_state_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``optimizer_to_tensors``: the state_dict to give ``opt.load_state_dict``."""
    state = {int(pid): {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in st.items()}
             for pid, st in meta["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_optimizer(opt: torch.optim.Optimizer, folder: Path, name: str = "optimizer") -> None:
    """An optimizer's state: its tensors to NAME.safetensors, the rest (hyper-parameters, ids) to NAME.json."""
    from safetensors.torch import save_file

    tensors, meta = optimizer_to_tensors(opt)
    tmp = folder / f"{name}.safetensors.tmp"
    save_file(tensors, str(tmp))
    _replace_durably(tmp, folder / f"{name}.safetensors")
    save_json(meta, folder / f"{name}.json")


def load_optimizer_state(folder: str | Path, name: str = "optimizer") -> dict:
    """The optimizer state_dict ``save_optimizer`` wrote (CPU tensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return optimizer_state_from(load_file(str(folder / f"{name}.safetensors")),
                                json.loads((folder / f"{name}.json").read_text()))


def load_optimizer(opt: torch.optim.Optimizer, folder: str | Path, name: str = "optimizer") -> None:
    """Restore what ``save_optimizer`` wrote (torch moves the tensors to the parameters' device)."""
    opt.load_state_dict(load_optimizer_state(folder, name))


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random streams (torch, CUDA, numpy, Python and the given generators) as tensors + metadata."""
    tensors = {k: g.get_state() for k, g in generators.items()}  # names must not be torch/cuda/numpy/python
    tensors["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": json.dumps([int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps([version, gauss_next])}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  generators: dict[str, torch.Generator]) -> None:
    """Inverse of ``rng_state``."""
    for k, g in generators.items():
        g.set_state(tensors[k])
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    if "numpy" in tensors and "numpy" in meta:
        pos, has_gauss, cached = json.loads(meta["numpy"])
        np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in tensors and "python" in meta:
        version, gauss_next = json.loads(meta["python"])
        random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss_next))


def save_rng(path: Path, generators: dict[str, torch.Generator]) -> None:
    """``rng_state`` to one safetensors file (the scalars in its metadata)."""
    from safetensors.torch import save_file

    tensors, meta = rng_state(generators)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    _replace_durably(tmp, path)


def load_rng(path: Path, generators: dict[str, torch.Generator]) -> None:
    """Restore the random streams ``save_rng`` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state(tensors, meta, generators)


def _file_problem(path: Path, size: Optional[int]) -> Optional[str]:
    """Why a checkpoint file cannot be read (None when it looks intact)."""
    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    if actual == 0:
        return "is empty (0 bytes)"
    if size is not None and actual != size:
        return f"has {actual} bytes, {size} were written"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is damaged
        return f"is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def checkpoint_problem(folder: str | Path) -> Optional[str]:
    """None for an intact checkpoint; else one phrase naming the damaged file and what is wrong."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    why = _file_problem(index, None)
    if why is not None:
        legacy = (folder / "optimizer.bin").is_file()
        return (f"{folder} was written by an older version (accelerate pickles, no {INDEX_NAME}); it cannot be "
                f"resumed safely" if legacy else f"{index} {why}")
    files = json.loads(index.read_text())
    files = files.get("files") if isinstance(files, dict) else None
    if not isinstance(files, dict):
        return f"{index} is corrupt (no file list)"
    for name, size in files.items():
        why = _file_problem(folder / name, size)
        if why is not None:
            return f"{folder / name} {why}"
    return None


def write_index(folder: Path) -> None:
    """Record every file of a finished checkpoint folder with its size (written last, fsynced)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".tmp")}
    for name in files:
        fsync_path(folder / name)
    save_json({"files": files}, folder / INDEX_NAME)


def resolve_checkpoint(spec: str, root: str | Path, log: Callable[[str], None] = print) -> Path:
    """``latest`` -> newest intact checkpoint under root (damaged newer ones are named and skipped);
    otherwise a checkpoint folder (or a run folder's newest), which must be intact."""
    if spec == "latest":
        ckpts = list_checkpoints(root)
        if not ckpts:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {root} (train.ckpt_every must be > 0 "
                                    f"for a run to write them)")
        damaged = []
        for _, path in reversed(ckpts):
            why = checkpoint_problem(path)
            if why is None:
                if damaged:
                    log(f"warning: --resume latest: skipped {len(damaged)} damaged checkpoint(s) "
                        f"({'; '.join(damaged)}); resuming from {path}, the newest intact one")
                return path
            damaged.append(why)
        raise CheckpointError(f"--resume latest: no intact checkpoint in {root}: {'; '.join(damaged)}")
    path = Path(spec)
    if (path / CHECKPOINTS).is_dir():
        return resolve_checkpoint("latest", path / CHECKPOINTS, log)
    if not path.is_dir() or not _STEP_DIR.match(path.name):
        raise FileNotFoundError(f"--resume {spec}: not a checkpoint folder (expected RUN/checkpoints/step_NNNNNNN, "
                                f"a run folder, or 'latest')")
    why = checkpoint_problem(path)
    if why is not None:
        raise CheckpointError(f"--resume {spec}: cannot resume: {why}")
    return path


def remove_partial(root: str | Path) -> list[Path]:
    """Delete temporary folders left by a run killed while writing a checkpoint; returns them."""
    root = Path(root)
    stale = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], is_main: bool,
                     barrier: Callable[[], None] = lambda: None, keep_last: Optional[int] = None) -> Path:
    """Run ``write(tmp_dir)`` on every process, then atomically rename tmp_dir to step_N on the main one.

    Before the rename the main process writes ``index.json`` and fsyncs every file and the folder; after
    it, the parent folder. Older checkpoints beyond ``keep_last`` are deleted only after the new one is in place.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_main:
        write_index(tmp)  # fsyncs every file; then the folder entries, then the rename itself
        fsync_path(tmp)
        old = root / f"{_TMP_PREFIX}old-{final.name}"
        if final.exists():  # the same step written again (a resumed run): swap, never leave a gap
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            for _, old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
