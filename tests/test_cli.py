"""The command line's conventions (docs/cli.md), through the real Typer app: every command in
the root help, every option's default visible, fixed choices as enumerations that agree with
the modules that define them, recipes by name, checkpoints as files, run directories or
RUN/checkpoints/latest, old spellings working with a one-line note, exit status 1 for runtime
errors and 2 for usage errors."""

from __future__ import annotations

import re
import sys

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from fedasr import cli
from fedasr.errors import FedasrError

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def group() -> click.Group:
    return typer.main.get_command(cli.app)


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args], env=WIDE)


def main_exit(monkeypatch, *args) -> int:
    """`fedasr ARGS` through :func:`fedasr.cli.main` (its error handling included): the exit status."""
    monkeypatch.setattr(sys, "argv", ["fedasr", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code


def test_root_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0
    commands = set(group().commands)
    assert commands >= {"synth", "shard", "train", "supernode", "eval", "prune", "compact", "export", "info", "sweep",
                        "report", "recipes", "config"}
    for name in commands:
        assert re.search(rf"^│ {name} ", r.output, re.M), name


def test_every_option_shows_its_default_or_is_required():
    missing = []
    for name, cmd in group().commands.items():
        for p in cmd.params:
            if getattr(p, "hidden", False) or p.name == "help" or name == "supernode":
                continue
            shown = p.required or getattr(p, "is_flag", False) or isinstance(p.show_default, str) \
                or (p.show_default is not False and p.default not in (None, ()))
            if not shown:
                missing.append(f"{name} {p.opts[0]}")
            if p.help and "[default" in p.help:  # rich markup would swallow it
                missing.append(f"{name} {p.opts[0]}: [default ...] inside the help text")
    assert missing == []


def test_synth_help_shows_every_default():
    r = invoke("synth", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for default in ("[default: 24]", "[default: 50]", "(speakers/4)", "(utterances/10)", "[default: 3]",
                    "[default: 0]", "[default: small]", "(the cores, at most 8)", "[default: no-overwrite]"):
        assert default in text, default
    assert "test-other ." not in text and "[small|open]" in text


def test_choices_are_enumerations_that_agree_with_the_modules():
    from fedasr.data.partition import SCHEMES
    from fedasr.data.text import DOMAINS
    from fedasr.data.tokenizer import MODEL_TYPES
    from fedasr.export import INT8_SCHEMES
    from fedasr.methods.federated_pruning import ALLOCATIONS, IMPORTANCES, PATTERNS

    assert cli.PARTITIONS == SCHEMES and cli.DOMAINS == DOMAINS and cli.TOKENIZER_TYPES == MODEL_TYPES
    assert cli.INT8_SCHEMES == tuple(INT8_SCHEMES)
    assert (cli.PATTERNS, cli.IMPORTANCES, cli.ALLOCATIONS) == (PATTERNS, IMPORTANCES, ALLOCATIONS)
    cmds = group().commands
    expect = {("synth", "--domain"): cli.DOMAINS, ("shard", "--by"): cli.PARTITIONS,
              ("shard", "--tokenizer-type"): cli.TOKENIZER_TYPES, ("train", "--engine"): cli.ENGINES,
              ("train", "--data"): cli.DATA, ("sweep", "--engine"): cli.ENGINES, ("prune", "--pattern"): cli.PATTERNS,
              ("prune", "--importance"): cli.IMPORTANCES, ("prune", "--allocation"): cli.ALLOCATIONS,
              ("prune", "--norm"): cli.NORMS, ("export", "--int8-scheme"): cli.INT8_SCHEMES}
    for (name, opt), values in expect.items():
        (p,) = [p for p in cmds[name].params if opt in p.opts]
        assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == tuple(values), (name, opt)
    r = invoke("shard", "--by", "speakers", "--train-split", "train", "--out", "x")
    assert r.exit_code == 2 and "speakers" in r.output


def test_runtime_errors_exit_1_usage_errors_2(monkeypatch, tmp_path, capsys):
    assert main_exit(monkeypatch, "info", tmp_path / "missing.pt") == 1  # a file: runtime
    assert "missing.pt: checkpoint does not exist" in capsys.readouterr().err
    assert main_exit(monkeypatch, "info") == 2  # Click's: a missing argument
    assert main_exit(monkeypatch, "eval", "--beam", "0", tmp_path) == 2  # Click's: out of range
    # ours, found after parsing: a bad combination of options
    assert main_exit(monkeypatch, "sweep", "ci", "--federation", tmp_path, "--out", tmp_path / "o",
                     "--superlink", "h:9092") == 2
    assert "--superlink/--insecure/--root-certificates: only with --engine flower" in capsys.readouterr().err
    assert main_exit(monkeypatch, "train", "ci") == 2  # no --federation/--out
    assert main_exit(monkeypatch, "sweep", "ci", "--federation", tmp_path / "nofed", "--out", tmp_path / "o") == 1
    assert not (tmp_path / "o").exists()


def test_a_recipe_is_a_file_or_a_shipped_name(tmp_path, monkeypatch):
    from fedasr.config import RECIPES_DIR, recipe_path, shipped_recipes

    names = shipped_recipes()
    assert {"ci", "ci_structured", "ci_baselines", "librispeech/federated_pruning",
            "librispeech100/federated_pruning"} <= set(names)
    monkeypatch.chdir(tmp_path)  # far from the repository's recipes/
    for given in ("ci", "ci.yaml", "recipes/ci.yaml"):
        assert recipe_path(given) == RECIPES_DIR / "ci.yaml"
    mine = tmp_path / "ci.yaml"  # a file of that name wins
    mine.write_text("fl: {rounds: 3}\n")
    assert recipe_path("ci.yaml").resolve() == mine
    with pytest.raises(FedasrError, match=r"nope: no such recipe file.*shipped: .*ci_structured"):
        recipe_path("nope")
    r = invoke("recipes")
    assert r.exit_code == 0 and all(name in r.output for name in names)


def test_config_prints_the_resolved_recipe_which_is_itself_a_recipe(tmp_path):
    import dataclasses

    from fedasr.config import TrainSection
    from fedasr.sweep import resolved_recipe, resolved_recipe_text

    r = invoke("config", "ci", "--set", "fl.rounds=3", "--set", "pruning.method=fedtiny", "--sparsity", "0.7")
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(r.output)
    assert resolved["fl"]["rounds"] == 3 and resolved["sweep"]["sparsities"] == [0.7]
    assert set(resolved["train"]) == {f.name for f in dataclasses.fields(TrainSection)}  # every key
    assert resolved["pruning"]["fedtiny"]["alpha"] == 0.1  # the selected method's block in full
    assert resolved["model"]["overrides"]["predictor"] == "stateless"  # the recipe's own value
    again = tmp_path / "resolved.yaml"  # a recipe that resolves to itself
    again.write_text(r.output)
    assert resolved_recipe_text(resolved_recipe(again)) == r.output.split("\n", 1)[1]


def test_checkpoint_resolution(tmp_path):
    from fedasr.rundir import RunDir, resolve_checkpoint

    run = RunDir(tmp_path / "run")
    run.ckpt_dir.mkdir(parents=True)
    with pytest.raises(FedasrError, match="no complete checkpoint yet"):
        resolve_checkpoint(run.root)
    for rnd in (1, 2):
        run.checkpoint(rnd).write_bytes(b"x")
    run.set_latest(run.checkpoint(2))
    newest = run.checkpoint(2)
    assert resolve_checkpoint(run.root) == newest
    assert resolve_checkpoint(run.ckpt_dir) == newest
    assert resolve_checkpoint(run.ckpt_dir / "latest") == newest
    assert resolve_checkpoint(run.checkpoint(1)) == run.checkpoint(1)
    assert resolve_checkpoint(tmp_path / "other.pt") == tmp_path / "other.pt"  # its existence: read_checkpoint's
    with pytest.raises(FedasrError, match="not a run directory"):
        resolve_checkpoint(tmp_path)


def test_old_spellings_still_work_with_a_note(monkeypatch, tmp_path, capsys):
    # train --config FILE: the note, then the same check as with the recipe first
    assert main_exit(monkeypatch, "train", "--config", "ci", "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "--config FILE is deprecated" in err and "--federation and --out are required" in err
    assert main_exit(monkeypatch, "train", "ci", "--config", "ci") == 2  # not both
    # sweep --sparsities A,B and --devices A,B: read as before (then the missing federation stops it)
    assert main_exit(monkeypatch, "sweep", "ci", "--federation", tmp_path / "nofed", "--out", tmp_path / "o",
                     "--sparsities", "0,0.5", "--devices", "cpu,cpu") == 1
    err = capsys.readouterr().err
    assert "--sparsities A,B is deprecated" in err and "--devices A,B is deprecated" in err
    assert "nofed" in err
    assert cli._sweep_sparsities([], "0,0.5") == [0.0, 0.5] and cli._sweep_sparsities([0.3], None) == [0.3]
    assert cli.listed(["cuda:0,cuda:1", "cpu"], "--devices") == ["cuda:0", "cuda:1", "cpu"]
    assert main_exit(monkeypatch, "sweep", "ci", "--federation", tmp_path, "--out", tmp_path / "o",
                     "--sparsities", "0,1.5") == 2
    # eval --checkpoint FILE: the note, then the same error as with the checkpoint first
    assert main_exit(monkeypatch, "eval", "--run", tmp_path, "--checkpoint", tmp_path / "x.pt") == 1
    err = capsys.readouterr().err
    assert "--checkpoint FILE is deprecated" in err and "not a run directory" in err
