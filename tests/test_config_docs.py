"""docs/configs.md stays generated from the schema; every CLI option has help; --print-config / --dry-run."""

import argparse
import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffusion.cli import option_actions
from diffusion.config import flatten, load_config, schema
from diffusion.config_docs import markdown, rows

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli_for_help", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configs_md_is_generated_from_the_schema():
    # regenerate with: python -m diffusion.config_docs > docs/configs.md
    assert (ROOT / "docs" / "configs.md").read_text() == markdown()


def test_every_key_has_type_default_and_meaning():
    documented = {k: (t, d, m) for k, t, d, m in rows()}
    leaves = flatten(OmegaConf.to_container(schema(), resolve=False))
    assert set(leaves) <= set(documented), sorted(set(leaves) - set(documented))
    missing = [k for k, (_, _, m) in documented.items() if not m.strip()]
    assert not missing, f"config keys without a meaning (add a # comment in config.py): {missing}"
    for key, value in leaves.items():
        default = documented[key][1]
        assert value == default or (value in ({}, []) and default in ({}, [])), (key, value, default)


def parsers() -> dict[str, argparse.ArgumentParser]:
    import distill.amed
    import distill.grid
    import distill.reflow
    import distill.sid
    import diffusion.export

    out = {"sample.py": script("sample").build_parser(), "evaluate.py": script("evaluate").build_parser(),
           "train.py": script("train").build_parser(), "export": diffusion.export.build_parser(),
           "distill amed": distill.amed.build_parser(), "distill grid": distill.grid.build_parser()}
    out["distill sid"] = distill.sid.build_parser()
    out["distill reflow"] = distill.reflow.build_parser()
    return out


def test_every_option_of_every_cli_has_help_and_shows_its_default():
    bare = []
    for name, p in parsers().items():
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for parser in [p] + [sp for a in subs for sp in a.choices.values()]:
            assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), (name, parser.prog)
        for sub, action in option_actions(p):
            if not (action.help or "").strip():
                bare.append(f"{name} {sub} {'/'.join(action.option_strings) or action.dest}".replace("  ", " "))
    assert not bare, f"options without help text: {bare}"
    text = parsers()["distill sid"].format_help()
    assert "(default: 2.5)" in text  # --sig-init shows its default


def test_train_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        script("train").parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--print-config" in out and "train.batch_size" in out and "docs/configs.md" in out


def test_print_config_round_trips(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = script("train")
    assert train.main(["--config", str(ROOT / "configs/digits_dit.yaml"), "--print-config", "train.steps=7"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    want = load_config(ROOT / "configs/digits_dit.yaml", ["train.steps=7"])
    assert flatten(printed) == flatten(want) and printed.train.steps == 7
    assert list(tmp_path.iterdir()) == []


def test_dry_run_takes_one_step_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = script("train")
    assert train.main(["--config", str(ROOT / "configs/gmm2d.yaml"), "--dry-run", "train.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run ok: gmm2d") and "one step on 32 items" in out and "nothing written" in out
    assert list(tmp_path.iterdir()) == []
    assert train.main(["--config", str(ROOT / "configs/gmm2d.yaml"), "--dry-run", "model.kind=unet"]) == 2
    assert "model.kind='unet' needs images" in capsys.readouterr().err
