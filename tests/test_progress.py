"""Progress bars: sample.py counts images; the grid and AMED distillers show a bar instead of log lines."""

from pathlib import Path

import distill.__main__ as distill_cli
from test_sample_cli import make_run, sample


def test_sampling_bar_counts_images(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert sample.main(["--run", str(run), "--sampler", "euler", "--nfe", "2", "--num", "5", "--batch-size", "2",
                        "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "sampling" in err and "5/5" in err and "img" in err and "3/3" not in err  # images, not 3 batches


def test_grid_and_amed_show_bars_not_lines(tmp_path, capsys):
    assert distill_cli.main(["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--opt", "afs=true", "--n-train", "16",
                             "--n-val", "8", "--max-evals", "2", "--out", str(tmp_path / "g.json")]) == 0
    cap = capsys.readouterr()
    assert "grid fit" in cap.err and "solve" in cap.err and "  eval " not in cap.out
    assert distill_cli.main(["amed", "--teacher", "oracle:ring2d", "--nfe", "4", "--no-afs", "--n-train", "16",
                             "--iters", "3", "--out", str(tmp_path / "p.safetensors")]) == 0
    cap = capsys.readouterr()
    assert "amed" in cap.err and "3/3" in cap.err and "  iter " not in cap.out
    # --no-progress keeps the log lines
    assert distill_cli.main(["amed", "--teacher", "oracle:ring2d", "--nfe", "4", "--no-afs", "--n-train", "16",
                             "--iters", "3", "--no-progress", "--out", str(tmp_path / "q.safetensors")]) == 0
    assert "  iter    0" in capsys.readouterr().out
