"""benchmarks/gpu_check.py keeps working: its CPU dry run (tiny sizes) measures every part and says it is a dry run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_dry_run_measures_every_part_and_says_it_is_not_a_gpu_run(tmp_path: Path) -> None:
    assert gpu_check.main(["--dry-run", "--skip-tests", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "this has not run on a GPU yet" in md and res["dry_run"] is True
    assert [r["compile"] for r in res["training"]] == [False, True]
    assert all(r["trainer_img_s"] > 0 and r["bare_img_s"] > 0 for r in res["training"])
    assert {(r["nfe"], r["ours"], r["diffusers"]) for r in res["sampling"]} == {
        (n, ours, theirs) for n in (10, 35) for ours, theirs in
        (("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"))}
    assert all(r["ratio"] == pytest.approx(r["ours_img_s"] / r["diffusers_img_s"]) for r in res["sampling"])
    assert res["skipped"] == ["tests (--skip-tests)"]


def test_dry_run_refuses_to_overwrite_the_committed_results_by_accident(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--dry-run"])
    assert e.value.code == 2 and "--dry-run needs --out DIR" in capsys.readouterr().err
