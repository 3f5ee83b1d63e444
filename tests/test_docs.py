"""The documentation against the code.

- Every `fedasr` command of README.md and docs/*.md (shell blocks and inline code) names a real subcommand,
  real options (the CLI's Click commands, introspected: no --help scraping) and, for options
  with fixed choices, a real choice: a renamed option or value breaks the build, not the reader.
- The cheap ones run: `fedasr recipes` and `fedasr config ...`; README's deploy block runs as
  written on a tiny trained run laid out as `make demo`'s (export, then sherpa-onnx transcribes
  a wav).
- docs/config.md documents every key of the config dataclasses and no other (both
  directions), and is what scripts/make_config_docs.py writes.
- README stays a five-minute read: at most 300 lines, every command in its table, the
  Results placeholder; relative links in the docs lead to files that exist.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
import typer

from conftest import FAST

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "<", ">", ">>", "<<", "|&", ";;"}
# files the docs link to that a later step makes
PENDING: set[str] = set()
# repeatable options whose values may hold commas themselves
KEY_VALUE_LISTS = {"--set", "--manifests"}
# inline code that starts with "fedasr" but is no command (a log line, a placeholder)
INLINE_NOT_COMMANDS = {"fedasr client worker: training on cuda (CUDA_VISIBLE_DEVICES=2)", "fedasr COMMAND --help"}


def _cli():
    from fedasr.cli import app

    return typer.main.get_command(app)


def _config_docs_script():
    spec = importlib.util.spec_from_file_location("make_config_docs", ROOT / "scripts" / "make_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- shell blocks
def shell_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every ```bash/sh/shell/console block of a page."""
    blocks, lines, start, lang = [], None, 0, None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^```(\w*)", line)
        if m and lines is None:
            lang, lines, start = m.group(1), [], i + 1
        elif line.startswith("```") and lines is not None:
            if lang in SHELL_LANGS:
                blocks.append((start, lines))
            lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def logical_lines(start: int, lines: list[str], console: bool = False) -> list[tuple[int, str]]:
    """A block's commands: continuation lines joined, multi-line quotes kept together,
    here-documents and (in a console block) output lines left out."""
    out, i = [], 0
    while i < len(lines):
        line, lineno = lines[i], start + i
        i += 1
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while True:
            if line.rstrip().endswith("\\") and i < len(lines):
                line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                continue
            try:
                shlex.split(line, comments=True)
            except ValueError:  # a quote spanning lines
                if i < len(lines):
                    line += "\n" + lines[i]
                    i += 1
                    continue
            break
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        out.append((lineno, line))
    return out


def fedasr_invocations(line: str) -> list[list[str]]:
    """The argument lists of the `fedasr` commands of a shell line."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commentchars = "#"
    tokens = list(lex)
    found, i = [], 0
    while i < len(tokens):
        prev = tokens[i - 1] if i else None
        at_command = prev is None or prev in SEPARATORS or re.match(r"^\w+=", prev) or prev in ("do", "then")
        if (tokens[i] == "fedasr" or tokens[i].endswith("/fedasr")) and at_command:
            j = i + 1
            while j < len(tokens) and tokens[j] not in SEPARATORS:
                j += 1
            found.append(tokens[i + 1:j])
            i = j
        else:
            i += 1
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    """("PAGE:LINE", argv) of every `fedasr` command in a shell block of README and docs/."""
    out = []
    for page in PAGES:
        for start, lines in shell_blocks(page):
            console = any(l.startswith("$ ") for l in lines)
            for lineno, line in logical_lines(start, lines, console):
                for argv in fedasr_invocations(line):
                    out.append((f"{page.relative_to(ROOT)}:{lineno}", argv))
    return out


def documented_inline() -> list[tuple[str, list[str]]]:
    """("PAGE:LINE", argv) of every inline `fedasr ...` code span outside the shell blocks
    (docs/cli.md's table of old spellings and log lines aside)."""
    out = []
    for page in PAGES:
        text = page.read_text()
        if page.name == "cli.md":
            text = text.split("## Old spellings", 1)[0]
        for m in re.finditer(r"`(fedasr [^`]+)`", text):
            if m.group(1) in INLINE_NOT_COMMANDS:
                continue
            where = f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            out.append((where, shlex.split(m.group(1))[1:]))
    return out


def _placeholder(value: str) -> bool:
    return "$" in value or "..." in value or "…" in value or value.isupper()


def check_invocation(group: click.Group, argv: list[str]) -> list[str]:
    """What is wrong with ``fedasr ARGV`` (nothing: an empty list)."""
    args = [a.strip("[]") for a in argv if a.strip("[]")]
    while args and args[0] in ("--help", "--version"):
        args = args[1:]
    if not args:
        return []
    name, rest = args[0], args[1:]
    if name not in group.commands:
        return [f"no command {name!r} (commands: {', '.join(group.commands)})"]
    cmd = group.commands[name]
    if name == "supernode":  # flower-supernode's own options, passed through
        return []
    params = {o: p for p in cmd.params if isinstance(p, click.Option) and not p.hidden
              for o in (*p.opts, *p.secondary_opts)}
    problems, i = [], 0
    while i < len(rest):
        tok = rest[i]
        i += 1
        if not tok.startswith("--") or tok == "--help":
            continue
        opt, _, inline = tok.partition("=")
        p = params.get(opt)
        if p is None:
            problems.append(f"fedasr {name}: no option {opt}")
            continue
        if p.is_flag or p.count:
            continue
        value = inline if inline else (rest[i] if i < len(rest) else "")
        i += 0 if inline else 1
        if isinstance(p.type, click.Choice) and not _placeholder(value) and value not in p.type.choices:
            problems.append(f"fedasr {name} {opt} {value}: not one of {', '.join(p.type.choices)}")
        if p.multiple and opt not in KEY_VALUE_LISTS and "," in value:
            problems.append(f"fedasr {name} {opt} {value}: the old comma spelling (repeat {opt} instead)")
    return problems


def test_every_documented_command_exists_with_its_options():
    group = _cli()
    cmds = documented_commands()
    assert len(cmds) > 40  # the parser found the pages' commands
    assert {argv[0] for _, argv in cmds if argv} >= set(group.commands) - {"supernode"} | {"train", "sweep"}
    inline = documented_inline()
    assert len(inline) > 80
    problems = [f"{where}: {p}" for where, argv in cmds + inline for p in check_invocation(group, argv)]
    assert problems == []


def test_the_checker_catches_a_renamed_option_a_wrong_choice_and_an_unknown_command():
    group = _cli()
    assert check_invocation(group, ["eval", "runs/x", "--beams", "4"]) == ["fedasr eval: no option --beams"]
    assert check_invocation(group, ["shard", "--by", "speakers", "--out", "x"]) == \
        ["fedasr shard --by speakers: not one of speaker, chapter, iid, dirichlet"]
    assert check_invocation(group, ["evaluate", "runs/x"])[0].startswith("no command 'evaluate'")
    assert check_invocation(group, ["train", "--config", "ci.yaml"]) == ["fedasr train: no option --config"]  # hidden
    assert check_invocation(group, ["eval", "r", "--split", "a,b"]) == \
        ["fedasr eval --split a,b: the old comma spelling (repeat --split instead)"]
    assert check_invocation(group, ["sweep", "ci", "[--sparsity", "0.5]", "--jobs", "2", "--engine", "flower"]) == []
    line = "CUDA_VISIBLE_DEVICES=1 fedasr train ci --out r && fedasr eval r | tee log  # fedasr nope"
    assert fedasr_invocations(line) == [["train", "ci", "--out", "r"], ["eval", "r"]]
    assert fedasr_invocations('sox "$(ls a/*.flac | head -n 1)" b.wav') == []
    block = ["fedasr export r --out o \\", "    --int8", "python - <<'EOF'", "fedasr x", "EOF", "fedasr info r"]
    assert [l for _, l in logical_lines(1, block)] == ["fedasr export r --out o      --int8", "python - <<'EOF'",
                                                       "fedasr info r"]


def test_cheap_documented_commands_run():
    """`fedasr recipes` and every `fedasr config ...` of the docs, as written."""
    from typer.testing import CliRunner

    from fedasr.cli import app

    ran = 0
    for where, argv in documented_commands():
        if argv and argv[0] in ("recipes", "config"):
            r = CliRunner().invoke(app, argv)
            assert r.exit_code == 0, f"{where}: fedasr {' '.join(argv)}: {r.output}"
            ran += 1
    assert ran >= 2


# ---------------------------------------------------------------------------- deploy
def _deploy_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- tests/test_docs.py runs the next block as written[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert m, "README's deploy block (with its marker comment) is missing"
    return m.group(1)


@pytest.fixture(scope="module")
def demo_layout(federation, corpus, tmp_path_factory, single_thread):
    """`make demo`'s layout in a temporary directory: demo/corpus (the tests' corpus) and
    demo/sweep/runs/dense (a tiny run with the ci recipe's stateless predictor, one round)."""
    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.runner import Runner

    root = tmp_path_factory.mktemp("readme")
    (root / "demo").mkdir()
    (root / "demo" / "corpus").symlink_to(corpus.parent)
    cfg = load_config("ci", [*FAST, "model.overrides.predictor=stateless", "model.overrides.simple_head=true",
                             "fl.rounds=1", "eval.every=0"])
    runner = Runner(root / "demo" / "sweep" / "runs" / "dense", Federation(federation), cfg)
    runner.start()
    runner.run_rounds()
    return root


def test_readme_deploy_block_runs_as_written(demo_layout, tmp_path):
    """Export `make demo`'s dense run (a run directory as the checkpoint), then sherpa-onnx
    transcribes a wav: README's block, run by bash as a reader would."""
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed (make install installs it)")
    pytest.importorskip("sherpa_onnx")
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, line in (("fedasr", f'exec "{sys.executable}" -m fedasr.cli "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"')):
        (shims / name).write_text(f"#!/bin/sh\n{line}\n")
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["bash", "-e", "-c", _deploy_block()], cwd=demo_layout, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    onnx = demo_layout / "demo" / "onnx"
    assert {p.name for p in onnx.iterdir()} >= {"encoder.onnx", "decoder.onnx", "joiner.onnx", "tokens.txt"}
    latest = (demo_layout / "demo/sweep/runs/dense/checkpoints/latest").read_text().strip()
    assert f"checkpoints/{latest}" in r.stdout  # the run directory resolved to its newest checkpoint
    assert re.search(r"^demo/utt\.wav: ", r.stdout, re.M), r.stdout  # sherpa-onnx's transcription line


# ---------------------------------------------------------------------------- config.md
def expected_config_keys() -> set[str]:
    """Every key of a recipe, from the dataclasses themselves (not from the generator)."""
    from fedasr.config import PruningSection, RunConfig
    from fedasr.methods import registry
    from fedasr.model.transducer import ModelConfig
    from fedasr.sweep import SweepConfig, SweepScheme

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is PruningSection and f.name == "blocks":  # the method blocks, below
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    keys = set(walk(RunConfig, "")) | set(walk(SweepConfig, "")) | {"extends"}
    keys |= {f"model.overrides.{f.name}" for f in dataclasses.fields(ModelConfig)}
    keys |= {f"sweep.schemes[].{f.name}" for f in dataclasses.fields(SweepScheme)}
    for name, method in registry().items():
        if method.Config is not None:
            keys |= {f"pruning.{name}.{f.name}" for f in dataclasses.fields(method.Config)}
    return keys


def test_config_md_documents_every_key_and_no_other():
    mod = _config_docs_script()
    page = (ROOT / "docs" / "config.md").read_text()
    documented = mod.documented_keys(page)
    assert len(documented) == len(set(documented))
    expected = expected_config_keys()
    assert sorted(expected - set(documented)) == [], "undocumented keys: run python scripts/make_config_docs.py"
    assert sorted(set(documented) - expected) == [], "documented keys that no longer exist"
    assert page == mod.render(), "docs/config.md is out of date: run python scripts/make_config_docs.py"


def test_config_docs_refuse_a_field_without_a_comment():
    mod = _config_docs_script()

    @dataclasses.dataclass
    class Section:
        """A section."""

        said: int = 1  # what it means
        unsaid: float = 2.0

    with pytest.raises(SystemExit, match=r"Section.unsaid: no comment"):
        mod.rows_of(Section, "x.")
    assert mod.field_comments(Section)["said"] == "what it means"


# ---------------------------------------------------------------------------- README
def test_readme_is_short_and_lists_every_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `fedasr (\w+)`", table, re.M))
    assert listed == set(_cli().commands)
    results = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    assert "docs/wer_vs_sparsity_full.png" in results


def test_readme_results_are_the_committed_curve():
    """README's results table is scripts/results_table.py's rendering of the committed
    docs/wer_vs_sparsity_full.csv (what `make curve-full` copied there), to the digit."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = (ROOT / "README.md").read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    table = mod.results_table(ROOT / "docs" / "wer_vs_sparsity_full.csv")
    assert table in results
    assert len(table.splitlines()) > 10  # the seed, dense and every scheme's runs


def test_relative_links_lead_to_files():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and str(path.relative_to(ROOT)) not in PENDING:
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert missing == []
