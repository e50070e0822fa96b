"""One GPU check (< 8 minutes on one GPU): the device-agnostic tests on CUDA, training and sampling speed.

1. **Tests on CUDA**: the trainer's test files (accelerate trains on the GPU by itself when there is
   one) and every test marked ``device`` run with ``UD_TEST_DEVICE=cuda`` (tests/conftest.py's ``device``
   fixture) and ``UD_TEST_INDUCTOR=1`` (the inductor variant of the compile test).
2. **Training images/s** of the CIFAR-10 recipe's network (configs/cifar10_unet.yaml: DDPM++ U-Net,
   EDM objective) in bf16, ``torch.compile`` off and on: ``diffusion.training.train`` against a bare
   PyTorch loop (forward, loss, backward, AdamW; data already on the GPU) on the same network, batch
   and objective. Synthetic in-memory images replace CIFAR-10 (nothing is downloaded); the trainer
   still reads them through its DataLoader with pinned memory.
3. **Sampling images/s** at NFE 10 and 35 with the same U-Net (bf16 autocast, eager): ``samplers.sample``
   (``euler``, ``ddim``) against diffusers' scheduler loop (``EulerDiscreteScheduler``, ``DDIMScheduler``:
   ``scale_model_input`` -> UNet2DModel -> ``step``), which is what a diffusers pipeline runs.

Writes ``benchmarks/results/gpu_check.{md,json}``. ``--dry-run`` runs every part on the CPU at tiny
sizes (< 60 s; tests are only collected, compile uses the ``eager`` backend (dynamo capture only)) so CI keeps the
script working; its output says that it is a dry run.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/x
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, markdown_table, write_json, write_markdown  # noqa: E402
from diffusion import build, training  # noqa: E402
from diffusion.config import load_config  # noqa: E402

NAME = "gpu_check"
CONFIG = ROOT / "configs" / "cifar10_unet.yaml"
TRAINER_TESTS = ["tests/test_train.py", "tests/test_train_parts.py", "tests/test_train_hot_path.py",
                 "tests/test_train_nonfinite.py", "tests/test_train_options.py"]
BUDGET_S = 7.5 * 60  # parts that would start after this are skipped (and say so)
TINY_UNET = {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_levels": []}


class SyntheticImages(torch.utils.data.Dataset):
    """Random images in [-1, 1] standing in for CIFAR-10 (only speed is measured)."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand((n, *shape), generator=g) * 2 - 1
        self.data_shape, self.num_classes = shape, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- 1. tests ------------------------------------------------------------------------------------------


def run_tests(dry: bool) -> dict[str, Any]:
    """The trainer's tests and the ``device``-marked tests with UD_TEST_DEVICE=cuda (dry run: collect only)."""
    env = {**os.environ, "UD_TEST_DEVICE": "cpu" if dry else "cuda", "UD_TEST_INDUCTOR": "0" if dry else "1",
           "PYTHONPATH": str(ROOT)}
    # (label, pytest arguments, timeout in seconds): at most 5 of the 7.5 minutes go to tests
    runs = [("trainer tests", TRAINER_TESTS, 240), ("tests marked `device`", ["-m", "device", "tests"], 60)]
    if dry:  # the dry run only proves the machinery: collecting one small file keeps it under a minute
        runs = [("trainer tests (dry run: tests/test_train_parts.py collected only)", ["tests/test_train_parts.py"],
                 60)]
    out = {}
    for label, args, timeout_s in runs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["--collect-only"] if dry else []),
               *args]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            tail, rc = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""], p.returncode
        except subprocess.TimeoutExpired:
            tail, rc = [f"timed out after {timeout_s:.0f} s"], -1
        # pytest exits 5 when a marker selects nothing: not a failure of the check
        out[label] = {"command": " ".join(cmd[1:]), "returncode": rc, "summary": tail[0],
                      "seconds": time.perf_counter() - t0, "ok": rc in (0, 5)}
    return out


# ---- 2. training -----------------------------------------------------------------------------------------


def _config(dry: bool, batch: int, compile_on: bool, steps: int, tmp: Path):
    over = [f"run_dir={tmp}", "train.overwrite=true", f"train.batch_size={batch}", f"train.steps={steps}",
            "train.log_every=25", "train.ckpt_every=0", "train.sample_every=0", "train.tensorboard=false",
            "data.num_workers=0", f"train.compile={str(compile_on).lower()}"]
    over += ["train.mixed_precision=no", "train.compile_backend=eager"] if dry else ["train.mixed_precision=bf16"]
    cfg = load_config(CONFIG, over)
    if dry:
        cfg.model.preset, cfg.model.options, cfg.data.resolution = "tiny", TINY_UNET, 8
    return cfg


def _dataset(cfg) -> SyntheticImages:
    r = cfg.data.resolution
    return SyntheticImages(max(1024, 4 * cfg.train.batch_size), (3, r, r))


def bare_train(cfg, device: torch.device, warmup: int, timed: int) -> float:
    """Images/s of forward + loss + backward + AdamW on GPU-resident data (bf16 autocast when asked)."""
    cfg = build.resolve(cfg, _dataset(cfg))
    torch.manual_seed(0)
    data = _dataset(cfg).images.to(device)
    net = build.build_network(cfg).to(device)
    if cfg.train.compile:
        net.compile(backend=cfg.train.compile_backend)
    model, objective = build.build_score_model(cfg, net), build.build_loss(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    g, b = torch.Generator().manual_seed(0), cfg.train.batch_size
    bf16 = cfg.train.mixed_precision == "bf16"

    def step() -> None:
        idx = torch.randint(0, len(data), (b,), generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective(model, data[idx], None, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    _sync(device)
    return b * timed / (time.perf_counter() - t0)


def trainer_train(cfg, warmup: int, timed: int) -> float:
    """Images/s of ``diffusion.training.train``: from entering step warmup+1 to the read-back at the last step."""
    marks: dict[str, float] = {}
    real_step, real_sync, real_data = training._Run.train_step, training._Run.sync, build.build_data

    def step(run):
        if run.step == warmup:
            marks["t0"] = time.perf_counter()
        return real_step(run)

    def sync(run):
        out = real_sync(run)  # reads the device back, so the GPU has finished every queued step
        marks["t1"] = time.perf_counter()
        return out

    training._Run.train_step, training._Run.sync = step, sync
    build.build_data = lambda c: _dataset(c)
    try:
        training.train(cfg)
    finally:
        training._Run.train_step, training._Run.sync, build.build_data = real_step, real_sync, real_data
    return cfg.train.batch_size * timed / (marks["t1"] - marks["t0"])


# ---- 3. sampling -------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        fn()  # warm-up: cuDNN plans, allocator
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def sampling(cfg, device: torch.device, batch: int, nfes: list[int], reps: int) -> list[dict[str, Any]]:
    """Images/s of samplers.sample vs diffusers' scheduler loop on the same UNet2DModel."""
    import samplers
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cfg = build.resolve(cfg, _dataset(cfg))
    torch.manual_seed(0)
    net = build.build_network(cfg).to(device).eval().requires_grad_(False)
    model, unet = build.build_score_model(cfg, net), net.net  # net.net: the diffusers UNet2DModel inside
    shape = (batch, *cfg.model.input_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    bf16 = device.type == "cuda"

    def ours(name: str, nfe: int) -> Callable[[], Any]:
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return samplers.sample(model, noise, sampler=name, nfe=nfe).x
        return run

    def theirs(scheduler, nfe: int) -> Callable[[], Any]:
        def run():
            scheduler.set_timesteps(nfe, device=device)
            x = noise * scheduler.init_noise_sigma
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for t in scheduler.timesteps:
                    eps = unet(scheduler.scale_model_input(x, t), t, return_dict=False)[0]
                    x = scheduler.step(eps, t, x, return_dict=False)[0]
            return x
        return run

    rows = []
    for nfe in nfes:
        for ours_name, sched in (("euler", EulerDiscreteScheduler()), ("ddim", DDIMScheduler())):
            s_ours = _timed(ours(ours_name, nfe), device, reps)
            s_theirs = _timed(theirs(sched, nfe), device, reps)
            rows.append({"nfe": nfe, "ours": ours_name, "diffusers": type(sched).__name__,
                         "ours_img_s": batch / s_ours, "diffusers_img_s": batch / s_theirs,
                         "ratio": s_theirs / s_ours})
    return rows


# ---- report -----------------------------------------------------------------------------------------


def report(res: dict[str, Any], dry: bool) -> str:
    """The markdown page."""
    head = ("**Dry run on the CPU at tiny sizes: this has not run on a GPU yet.** The numbers below only show "
            "that every part of the script works; they say nothing about GPU speed."
            if dry else f"Ran on {res['device_name']}.")
    tests = markdown_table(["tests (UD_TEST_DEVICE=%s)" % ("cpu, collect only" if dry else "cuda"), "result", "s"],
                           [[k, v["summary"], v["seconds"]] for k, v in res["tests"].items()])
    train = markdown_table(["compile", "trainer img/s", "bare loop img/s", "trainer / bare"],
                           [[r["compile"], r["trainer_img_s"], r["bare_img_s"], r["ratio"]] for r in res["training"]])
    samp = markdown_table(["NFE", "ours", "diffusers loop", "ours img/s", "diffusers img/s", "ours / diffusers"],
                          [[r["nfe"], r["ours"], r["diffusers"], r["ours_img_s"], r["diffusers_img_s"], r["ratio"]]
                           for r in res["sampling"]])
    skipped = "\n".join(f"- skipped: {s}" for s in res["skipped"]) or "- nothing skipped"
    t = res["train_setup"]
    return f"""# GPU check

`python benchmarks/gpu_check.py{res["argv"]}` ({res['seconds']:.0f} s)

{head}

## 1. Device-agnostic tests

{tests}

## 2. Training speed: CIFAR-10 recipe network ({t['network']}), {t['precision']}, batch {t['batch']}

Trainer = `diffusion.training.train` (accelerate, DataLoader (pinned memory on CUDA), EMA, on-device NaN and
grad-norm bookkeeping read every 25 steps); bare loop = forward + EDM loss + backward + AdamW on data already
on the device. {t['timed']} timed steps after {t['warmup']} warm-up steps (compile happens in the warm-up).

{train}

## 3. Sampling speed: same U-Net, batch {res['sample_batch']}, {'bf16 autocast' if not dry else 'fp32'}, eager

Ours = `samplers.sample(model, noise, sampler=..., nfe=N)` (EDM-preconditioned ScoreModel around the U-Net);
diffusers = its scheduler loop around the bare `UNet2DModel` (what `DDIMPipeline` / a pipeline with
`EulerDiscreteScheduler` runs). Ratio > 1: ours is faster.

{samp}

{skipped}
"""


def main(argv: list[str] | None = None) -> int:
    """Run the parts that fit the time budget and write markdown + JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, tests only collected (< 60 s)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; dry run: required "
                                               "unless --write-results)")
    p.add_argument("--write-results", action="store_true",
                   help="with --dry-run: write into benchmarks/results (the committed 'not run on a GPU' file)")
    p.add_argument("--skip-tests", action="store_true", help="skip part 1")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured (use --dry-run to exercise the script on the CPU)")
        return 0
    if dry and args.out is None and not args.write_results:
        p.error("--dry-run needs --out DIR (or --write-results to replace the committed results file)")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)
    t_start, skipped = time.perf_counter(), []

    def time_left() -> float:
        return BUDGET_S - (time.perf_counter() - t_start)

    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-results"]
    res: dict[str, Any] = {"argv": "".join(" " + a for a in shown), "dry_run": dry,
                           "device_name": "cpu" if dry else torch.cuda.get_device_name(),
                           "tests": {}, "training": [], "sampling": [], "skipped": skipped}
    if args.skip_tests:
        skipped.append("tests (--skip-tests)")
    else:
        res["tests"] = run_tests(dry)

    batch, warmup, timed = (4, 2, 3) if dry else (128, 5, 30)
    res["train_setup"] = {"network": "tiny U-Net (dry run)" if dry else "DDPM++ (ddpmpp_cifar preset)",
                          "precision": "fp32" if dry else "bf16", "batch": batch, "warmup": warmup, "timed": timed}
    with tempfile.TemporaryDirectory() as tmp:
        for compile_on in (False, True):
            if time_left() < (150 if compile_on and not dry else 20):
                skipped.append(f"training with compile={compile_on} (time budget)")
                continue
            w = warmup + (3 if compile_on else 0)
            cfg = _config(dry, batch, compile_on, w + timed, Path(tmp) / f"run{int(compile_on)}")
            t0 = time.perf_counter()
            bare = bare_train(cfg, device, w, timed)
            ours = trainer_train(cfg, w, timed)
            res["training"].append({"compile": compile_on, "trainer_img_s": ours, "bare_img_s": bare,
                                    "ratio": ours / bare, "seconds": time.perf_counter() - t0})
            print(f"training compile={compile_on}: trainer {ours:.1f} img/s, bare {bare:.1f} img/s")
        s_batch, nfes, reps = (2, [10, 35], 1) if dry else (256, [10, 35], 3)
        res["sample_batch"] = s_batch
        if time_left() > 20:
            t0 = time.perf_counter()
            res["sampling"] = sampling(_config(dry, batch, False, 1, Path(tmp) / "s"), device, s_batch, nfes, reps)
            res["sampling_seconds"] = time.perf_counter() - t0
            for r in res["sampling"]:
                print(f"sampling NFE {r['nfe']} {r['ours']}: ours {r['ours_img_s']:.1f} img/s, "
                      f"{r['diffusers']} {r['diffusers_img_s']:.1f} img/s")
        else:
            skipped.append("sampling (time budget)")
    res["seconds"] = time.perf_counter() - t_start
    res["environment"] = environment()
    write_markdown(NAME, report(res, dry), results_dir=out)
    write_json(NAME, res, results_dir=out)
    print(f"gpu_check: {'dry run ' if dry else ''}done in {res['seconds']:.0f} s -> {out / (NAME + '.md')}")
    failed = [k for k, v in res["tests"].items() if not v["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
