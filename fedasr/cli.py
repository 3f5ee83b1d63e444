"""The `fedasr` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedasr import __version__
from fedasr.errors import FedasrError, OptionError

# Click >= 8.3 sets Parameter.help in its own __init__, after Typer's TyperArgument has set it,
# so positional arguments lost their help text: pass it through again (harmless where not needed).
_typer_argument_init = typer.core.TyperArgument.__init__


def _argument_init(self, *args, help: Optional[str] = None, **kwargs) -> None:
    _typer_argument_init(self, *args, help=help, **kwargs)
    self.help = help


typer.core.TyperArgument.__init__ = _argument_init

app = typer.Typer(
    name="fedasr",
    help="Pruning federated speech-recognition models (Conformer-Transducer). The pipeline: synth (or your own "
         "corpus) → shard → train or sweep → report, eval → prune, compact → export; `fedasr COMMAND --help` for each.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # logs and pipes: keep tables readable instead of 80 columns

# The CLI's conventions (docs/cli.md):
# - a recipe is the first argument (a YAML file or a shipped recipe's name: `fedasr recipes`);
# - a checkpoint is the first argument (a file, a run directory, or RUN/checkpoints/latest);
# - a list is a repeatable option (--split a --split b);
# - --jobs N: N workers run in parallel (what a worker is, each command's help says);
# - --device: where the command computes (auto, cpu, cuda, cuda:N);
# - runtime errors exit 1, usage errors (bad option values or combinations) 2.
# Fixed choices, as the modules below define them (tests/test_cli.py checks they agree; the
# CLI does not import them, so that `fedasr --help` does not load torch).
PARTITIONS = ("speaker", "chapter", "iid", "dirichlet")  # fedasr.data.partition.SCHEMES
DOMAINS = ("small", "open")  # fedasr.data.text.DOMAINS
TOKENIZER_TYPES = ("unigram", "bpe")  # fedasr.data.tokenizer.MODEL_TYPES
ENGINES = ("embedded", "flower")
DATA = ("clients", "server")
PATTERNS = ("unstructured", "row", "column", "half_row", "half_column", "coherent_column", "unit")  # fedasr.methods.federated_pruning
IMPORTANCES = ("magnitude", "gradient", "random")
ALLOCATIONS = ("uniform", "global", "adaptive")
NORMS = ("l1", "l2")
INT8_SCHEMES = ("u8u8", "u8s8-7bit", "u8s8")  # fedasr.export.INT8_SCHEMES
SPARSITY = click.FloatRange(0.0, 1.0, max_open=True)
DEVICE_HELP = "auto (CUDA when there is one), cpu, cuda or cuda:N"
FLOWER = "Flower engine"


def choice(values: tuple[str, ...]) -> click.Choice:
    return click.Choice(list(values))


def deprecated(old: str, new: str) -> None:
    """The one-line note an old spelling prints (it keeps working for one release)."""
    print(f"fedasr: note: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr, flush=True)


def listed(values: list[str], option: str) -> list[str]:
    """A repeatable option's values; the old comma-separated spelling (``--x a,b``) is split,
    with a deprecation note."""
    out: list[str] = []
    for v in values:
        if "," in v:
            deprecated(f"{option} A,B", f"{option} A {option} B")
            out += [x.strip() for x in v.split(",") if x.strip()]
        else:
            out.append(v)
    return out


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
        disable=not err_console.is_terminal and os.environ.get("FEDASR_PROGRESS") != "1",
    )


def _version(value: bool) -> None:
    if value:
        console.print(f"fedasr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """fedasr — federated pruning of Conformer-Transducer speech recognisers."""


def default_jobs() -> int:
    return max(1, min(8, os.cpu_count() or 1))


JOBS_DEFAULT = "the cores, at most 8"


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Root directory; the corpus is written to OUT/LibriSpeech."),
    speakers: int = typer.Option(24, min=1, help="Training speakers (seen in train, dev and test-clean)."),
    utterances_per_speaker: int = typer.Option(50, min=1, help="Training utterances per speaker."),
    test_other_speakers: Optional[int] = typer.Option(None, min=0, show_default="speakers/4",
                                                      help="Unseen speakers for test-other."),
    dev_per_speaker: Optional[int] = typer.Option(None, min=0, show_default="utterances/10",
                                                  help="Dev utterances per speaker."),
    test_per_speaker: Optional[int] = typer.Option(None, min=0, show_default="utterances/10",
                                                   help="test-clean utterances per speaker."),
    chapters_per_speaker: int = typer.Option(3, min=1, help="Chapters per speaker and split."),
    server_speakers: int = typer.Option(0, min=0, help="Further speakers in a train-server split: the server's own "
                                        "data (seed model), sentences disjoint from every other split."),
    domain: str = typer.Option("small", click_type=choice(DOMAINS),
                               help="Text domain: small (≤200 words: digits, times, dates, commands) or open "
                                    "(≥1000-word grammar, hard)."),
    seed: int = typer.Option(0, help="Seed for voices, texts and noise."),
    jobs: int = typer.Option(default_jobs(), min=1, show_default=JOBS_DEFAULT,
                             help="Parallel workers: text-to-speech processes at once."),
    overwrite: bool = typer.Option(False, help="Replace an existing OUT/LibriSpeech."),
) -> None:
    """Generate a synthetic LibriSpeech-layout corpus with text-to-speech (espeak-ng/flite; needs the Debian
    packages espeak-ng and sox, flite optional)."""
    from fedasr.data import synth as S

    S.require_tools()
    t0 = time.time()
    plan = S.plan_corpus(speakers, utterances_per_speaker, seed, domain, test_other_speakers,
                         dev_per_speaker, test_per_speaker, chapters_per_speaker, server_speakers)
    with progress_bar() as prog:
        task = prog.add_task("synthesizing", total=len(plan.utterances))
        summary = S.synthesize_corpus(out, plan, jobs=jobs, overwrite=overwrite,
                                      progress=lambda n: prog.advance(task, n))
    table = Table(title=f"Synthetic corpus ({domain} domain) — {out / 'LibriSpeech'}")
    for col in ("split", "speakers", "utterances", "hours"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in S.SPLITS:
        if split in summary:
            s = summary[split]
            table.add_row(split, str(s["speakers"]), str(s["utterances"]), f"{s['hours']:.3f}")
    total = sum(s["hours"] for s in summary.values())
    table.add_row("total", "", str(sum(s["utterances"] for s in summary.values())), f"{total:.3f}")
    console.print(table)
    console.print(f"generated {total:.2f} h of audio in {time.time() - t0:.1f} s")


@app.command()
def shard(
    corpus: Optional[Path] = typer.Option(None, show_default="none: every split from --manifests",
                                          help="LibriSpeech-layout root (the directory holding the split "
                                          "folders); the splits that --manifests does not name come from here."),
    manifests: list[str] = typer.Option([], "--manifests", show_default="none",
                                        help="SPLIT=PATH (repeatable): lhotse manifests of a "
                                        "split: a CutSet file, RECORDINGS,SUPERVISIONS, or a directory of them "
                                        "(docs/data.md). Any sample rate and channel count."),
    out: Path = typer.Option(..., help="Federation directory to create."),
    train_split: list[str] = typer.Option(..., "--train-split", help="Training split (repeatable)."),
    dev_split: list[str] = typer.Option([], "--dev-split", show_default="none", help="Dev split (repeatable)."),
    test_split: list[str] = typer.Option([], "--test-split", show_default="none", help="Test split (repeatable)."),
    server_split: list[str] = typer.Option([], "--server-split", show_default="none",
                                           help="The server's own data (repeatable; never a "
                                           "client): the seed model trains on it, e.g. train-clean-100."),
    by: str = typer.Option("speaker", click_type=choice(PARTITIONS),
                           help="Partition: one client per speaker or chapter; iid or dirichlet "
                                "(--num-clients)."),
    num_clients: Optional[int] = typer.Option(None, min=1, show_default="none; required by iid and dirichlet",
                                              help="Clients for iid/dirichlet."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (dirichlet only)."),
    min_utterances: int = typer.Option(1, min=1, help="Drop clients with fewer utterances."),
    max_clients: Optional[int] = typer.Option(None, min=1, show_default="all",
                                              help="Keep a seeded random subset of this many clients."),
    seed: int = typer.Option(0, help="Seed for iid/dirichlet partitions and client subsets."),
    vocab_size: Optional[int] = typer.Option(None, min=2, show_default="the most the transcripts allow, at most 256",
                                             help="SentencePiece vocabulary size (including blank and unk)."),
    tokenizer_type: str = typer.Option("unigram", click_type=choice(TOKENIZER_TYPES),
                                       help="SentencePiece model type."),
    tokenizer: Optional[Path] = typer.Option(None, show_default="train one",
                                             help="Use this SentencePiece model instead of training one."),
    skip_invalid: bool = typer.Option(False, help="Drop bad utterances (listed in federation.yaml) instead of failing."),
    jobs: int = typer.Option(default_jobs(), min=1, show_default=JOBS_DEFAULT,
                             help="Parallel workers: audio files scanned and feature-extraction processes at once."),
    overwrite: bool = typer.Option(False, help="Replace an existing federation directory."),
) -> None:
    """Shard a corpus (LibriSpeech layout or lhotse manifests) into federated pseudo-clients (+ tokenizer, features)."""
    from fedasr.data.federation import ShardOptions
    from fedasr.data.federation import shard as do_shard
    from fedasr.data.sources import parse_manifest_args

    t0 = time.time()
    opts = ShardOptions(corpus=corpus, train_splits=list(train_split), dev_splits=list(dev_split),
                        test_splits=list(test_split), server_splits=list(server_split), out=out, scheme=by, num_clients=num_clients,
                        alpha=alpha, min_utterances=min_utterances, max_clients=max_clients, seed=seed,
                        vocab_size=vocab_size, tokenizer_type=tokenizer_type, tokenizer=tokenizer,
                        skip_invalid=skip_invalid, jobs=jobs, overwrite=overwrite,
                        manifests=parse_manifest_args(manifests))
    with err_console.status("sharding") as status:
        meta = do_shard(opts, log=lambda s: status.update(s))
    s = meta["summary"]
    table = Table(title=f"Federation {out} — by {by}")
    table.add_column("")
    for col in ("count", "min", "median", "max", "total"):
        table.add_column(col, justify="right")
    table.add_row("utterances / client", str(s["clients"]), str(s["utterances_per_client"]["min"]),
                  f"{s['utterances_per_client']['median']:g}", str(s["utterances_per_client"]["max"]),
                  str(s["utterances"]))
    table.add_row("hours / client", "", f"{s['hours_per_client']['min']:.4f}",
                  f"{s['hours_per_client']['median']:.4f}", f"{s['hours_per_client']['max']:.4f}",
                  f"{s['hours']:.3f}")
    if meta.get("server"):
        sv = meta["server"]
        table.add_row(f"server: {', '.join(sv['splits'])} ({len(sv['speakers'])} speakers)", str(sv["utterances"]),
                      "", "", "", f"{sv['hours']:.3f} h")
    for split, e in meta["eval"].items():
        table.add_row(f"{e['role']}: {split}", str(e["utterances"]), "", "", "", f"{e['hours']:.3f} h")
    console.print(table)
    resampled = {s: a["sample_rates"] for s, a in meta["source"]["splits"].items() if a["resampled_to_16k"]}
    if resampled:
        console.print("resampled to 16 kHz: " + "; ".join(
            f"{s} ({', '.join(f'{n} at {r} Hz' for r, n in rates.items())})" for s, rates in resampled.items()))
    downmixed = {s: a["downmixed"] for s, a in meta["source"]["splits"].items() if a["downmixed"]}
    if downmixed:
        console.print("downmixed to mono: " + ", ".join(f"{s} ({n})" for s, n in downmixed.items()))
    if meta["dropped"]:
        console.print(f"[yellow]dropped {len(meta['dropped'])} invalid utterances (see federation.yaml)")
    if meta["excluded_clients"]:
        console.print(f"[yellow]excluded {len(meta['excluded_clients'])} clients by --min-utterances/--max-clients")
    tok = meta["tokenizer"]
    how = {"auto": " (chosen automatically: the most the training transcripts allow, at most 256)",
           "given": f" (given: {tok['source']})"}.get(str(tok["requested"]), "")
    console.print(f"tokenizer: {tok['vocab_size']} pieces{how}; sharded in {time.time() - t0:.1f} s")


class _RoundProgress:
    """Rich progress for rounds and the clients inside a round."""

    def __init__(self, prog: Progress, rounds: int, done: int):
        self.prog = prog
        self.rounds = prog.add_task("rounds", total=rounds, completed=done)
        self.clients = prog.add_task("clients", total=1, visible=False)

    def round_start(self, rnd, clients):
        self.prog.update(self.clients, total=len(clients), completed=0, visible=True,
                         description=f"round {rnd} clients")

    def client_done(self, client, ok):
        self.prog.advance(self.clients)

    def round_end(self, row):
        self.prog.advance(self.rounds)
        dev = f" dev_wer={row['dev_wer']:.3f}" if "dev_wer" in row else ""
        loss = f" loss={row['train_loss']:.3f}" if row.get("train_loss") is not None else ""
        drop = f" dropped={len(row['dropped'])}" if row.get("dropped") else ""
        self.prog.console.print(f"round {row['round']}:{loss}{dev}{drop} ({row['round_time']:.1f} s)")


RECIPE_HELP = "Recipe: a YAML file or a shipped recipe's name (`fedasr recipes`), e.g. ci."
CHECKPOINT_HELP = "a checkpoint file, a run directory (its newest checkpoint) or RUN/checkpoints/latest"


def _recipe_arg(recipe: Optional[str], config: Optional[Path], command: str) -> Optional[str]:
    """The recipe as the first argument; the old ``--config FILE`` still read, with a note."""
    if config is None:
        return recipe
    if recipe is not None:
        raise OptionError("--config: give the recipe once, as the first argument")
    deprecated("--config FILE", f"the recipe as the first argument (fedasr {command} FILE ...)")
    return str(config)


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, show_default="the built-in defaults", help=RECIPE_HELP),
    federation: Optional[Path] = typer.Option(None, show_default="required; with --resume: the run's",
                                              help="Federation directory made by `fedasr shard`."),
    out: Optional[Path] = typer.Option(None, show_default="required unless --resume",
                                       help="Run directory to create."),
    set_: list[str] = typer.Option([], "--set", show_default="none",
                                   help="Override a config key, e.g. --set fl.rounds=20 (repeatable; "
                                        "docs/config.md lists the keys)."),
    centralized: bool = typer.Option(False, help="Train centrally: on the union of the clients' data (baseline), "
                                     "or with --data server on the server's own data (the seed model)."),
    data: str = typer.Option("clients", click_type=choice(DATA),
                             help="--centralized only: the clients' data (their union) or the server's "
                                  "(`shard --server-split`)."),
    resume: Optional[Path] = typer.Option(None, show_default="none",
                                          help="Continue the run in this directory from its latest checkpoint."),
    init_from: Optional[Path] = typer.Option(None, show_default="none",
                                             help=f"Start from this checkpoint's weights and masks ({CHECKPOINT_HELP}; "
                                                  "e.g. the output of `fedasr prune`) and fine-tune."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", show_default="the config's device: auto",
                                         help=f"Where the clients train: {DEVICE_HELP}; replaces the config's "
                                              "device, with --resume too (a run going on on another machine)."),
    engine: str = typer.Option("embedded", click_type=choice(ENGINES),
                               help="embedded (one process) or flower (Flower's Deployment Engine)."),
    superlink: Optional[str] = typer.Option(None, show_default="start one and SuperNodes on this machine, on "
                                            "loopback", help="A running SuperLink HOST:PORT.",
                                            rich_help_panel=FLOWER),
    insecure: bool = typer.Option(False, help="Plain HTTP to --superlink (loopback or tests only).",
                                  rich_help_panel=FLOWER),
    root_certificates: Optional[Path] = typer.Option(None, show_default="none",
                                                     help="CA certificate(s) of --superlink (TLS).",
                                                     rich_help_panel=FLOWER),
    slots: Optional[int] = typer.Option(None, min=1, show_default="one per --devices entry; one on a GPU; else "
                                        "clients per round, at most the cores",
                                        help="One machine: SuperNodes = concurrent clients.", rich_help_panel=FLOWER),
    round_timeout: float = typer.Option(900.0, help="Seconds a round waits for its clients.", rich_help_panel=FLOWER),
    devices: list[str] = typer.Option([], "--devices", show_default="none",
                                      help="One machine: a SuperNode slot's device (repeatable: slot i on the i-th, "
                                           "round robin; each sees only its GPU).", rich_help_panel=FLOWER),
    config: Optional[Path] = typer.Option(None, "--config", hidden=True, help="Deprecated: the recipe, now the "
                                          "first argument."),
) -> None:
    """Train the Conformer-Transducer federatedly (or centrally) over the federation's clients."""
    from fedasr.commands.train import train as do_train

    recipe = _recipe_arg(recipe, config, "train")

    @contextmanager
    def rounds_progress(rounds: int, done: int):
        with progress_bar() as prog:
            yield _RoundProgress(prog, rounds, done)

    history, root = do_train(federation=federation, config=recipe, out=out, overrides=set_, centralized=centralized,
                             data=data, resume=resume, init_from=init_from, overwrite=overwrite, engine=engine,
                             superlink=superlink, insecure=insecure, root_certificates=root_certificates,
                             slots=slots, round_timeout=round_timeout, devices=listed(devices, "--devices"),
                             device=device, events=rounds_progress)
    _print_history(history, root)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def supernode(ctx: typer.Context) -> None:
    """Flower SuperNode with a warm fedasr client worker (flower-supernode's options; --isolation process)."""
    from fedasr.fl.flower.node import main as node_main

    sys.exit(node_main(list(ctx.args)))


def _print_history(history: list[dict], root: Path) -> None:
    table = Table(title=f"Training — {root}")
    for col in ("round", "clients", "examples", "sparsity", "train loss", "dev loss", "dev WER", "MB down",
                "MB up", "time s"):
        table.add_column(col, justify="right")
    for r in history:
        table.add_row(
            str(r["round"]), str(len(r["clients"]) - len(r.get("dropped", []))), str(r["examples"]),
            f"{100 * r.get('sparsity', 0):.1f}%",
            f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "-",
            f"{r['dev_loss']:.3f}" if "dev_loss" in r else "-",
            f"{100 * r['dev_wer']:.2f}%" if "dev_wer" in r else "-",
            f"{r['bytes_down'] / 1e6:.1f}", f"{r['bytes_up'] / 1e6:.1f}", f"{r['round_time']:.1f}")
    console.print(table)


@app.command(name="eval")
def eval_(
    checkpoint: Optional[Path] = typer.Argument(None, show_default="--run's newest checkpoint",
                                                help=f"What to evaluate: {CHECKPOINT_HELP}."),
    run: Optional[Path] = typer.Option(None, show_default="the checkpoint's run directory",
                                       help="Run directory (made by `fedasr train`): its federation, and where "
                                            "results.json goes."),
    split: list[str] = typer.Option([], "--split", show_default="the federation's test splits",
                                    help="Split to evaluate (repeatable)."),
    beam: int = typer.Option(1, min=1, help="Beam size; 1 = greedy search."),
    federation: Optional[Path] = typer.Option(None, show_default="the run's", help="Federation directory."),
    max_duration: float = typer.Option(120.0, min=0.001, help="Seconds of audio per decoding batch."),
    device: str = typer.Option("auto", metavar="DEVICE", help=f"Where to decode: {DEVICE_HELP}."),
    max_symbols_per_frame: int = typer.Option(1, min=1, help="Greedy search: symbols a frame at most (1: sherpa-onnx's "
                                              "greedy search, the deployed decoding)."),
    unrestricted: int = typer.Option(3, min=0, help="Also score greedy search with up to this many symbols a frame, "
                                     "shown beside where it differs (0: off)."),
    checkpoint_old: Optional[Path] = typer.Option(None, "--checkpoint", hidden=True,
                                                  help="Deprecated: the checkpoint, now the first argument."),
) -> None:
    """Decode test splits and report WER/CER (per split and per client) into RUN_DIR/results.json."""
    from fedasr.commands.evaluate import evaluate_run
    from fedasr.rundir import RunDir

    if checkpoint_old is not None:
        if checkpoint is not None:
            raise OptionError("--checkpoint: give the checkpoint once, as the first argument")
        deprecated("--checkpoint FILE", "the checkpoint as the first argument (fedasr eval FILE --run RUN)")
        checkpoint = checkpoint_old
    with progress_bar() as prog:
        def progress(split, total):
            task = prog.add_task(f"decoding {split}", total=total)
            return lambda n: prog.advance(task, n)

        results, splits, ckpt_path, run_dir = evaluate_run(
            run, checkpoint=checkpoint, splits=split, beam=beam, federation=federation, max_duration=max_duration,
            device=device, progress=progress, max_symbols_per_frame=max_symbols_per_frame, unrestricted=unrestricted)
    results_path = RunDir(run_dir).results_path
    table = Table(title=f"WER — {ckpt_path}", caption=results[splits[0]]["decoding"] if splits else None)
    alt = next((results[s]["unrestricted"]["decoding"] for s in splits if "unrestricted" in results[s]), None)
    cols = ["split", "utts", "WER", "CER", "sub", "del", "ins", "RTF", "clients"] + ([f"WER, {alt}"] if alt else [])
    for col in cols:
        table.add_column(col, justify="right" if col != "split" else "left")
    for s in splits:
        r = results[s]
        row = [s, str(r["utterances"]), f"{100 * r['wer']:.2f}%", f"{100 * r['cer']:.2f}%",
               str(r["substitutions"]), str(r["deletions"]), str(r["insertions"]), f"{r['rtf']:.3f}",
               str(len(r.get("per_client", {})))]
        if alt:
            row.append(f"{100 * r['unrestricted']['wer']:.2f}%" if "unrestricted" in r else "(same)")
        table.add_row(*row)
    console.print(table)
    console.print(f"results: {results_path}")


@app.command()
def prune(
    checkpoint: Path = typer.Argument(..., help=f"Checkpoint to prune: {CHECKPOINT_HELP}."),
    out: Path = typer.Option(..., help="Pruned checkpoint to write."),
    sparsity: float = typer.Option(..., click_type=SPARSITY,
                                   help="Target share of prunable weights set to zero, in [0, 1)."),
    pattern: str = typer.Option("unstructured", click_type=choice(PATTERNS),
                                help="What is pruned together (docs/methods.md)."),
    importance: str = typer.Option("magnitude", click_type=choice(IMPORTANCES),
                                   help="How weights are ranked; gradient needs --federation."),
    allocation: str = typer.Option("uniform", click_type=choice(ALLOCATIONS),
                                   help="Sparsity per layer: the same, one global threshold, or by importance."),
    norm: str = typer.Option("l2", click_type=choice(NORMS), help="Group norm for magnitude importance."),
    federation: Optional[Path] = typer.Option(None, show_default="none",
                                              help="Federation whose training data gives gradients."),
    batches: int = typer.Option(8, min=1, help="Training batches for gradient importance."),
    seed: int = typer.Option(0, help="Seed (random importance, gradient batches)."),
    device: str = typer.Option("auto", metavar="DEVICE", help=f"Where gradients are computed: {DEVICE_HELP}."),
) -> None:
    """One-shot pruning of a trained checkpoint (the centralized-pruning baseline).

    The output can be fine-tuned with `fedasr train --init-from OUT`."""
    from fedasr.commands.prune import prune_checkpoint

    rep = prune_checkpoint(checkpoint, out, sparsity=sparsity, pattern=pattern, importance=importance,
                           allocation=allocation, norm=norm, federation=federation, batches=batches, seed=seed,
                           device=device)
    console.print(f"pruned {rep['checkpoint']} -> {out}: sparsity {100 * rep['sparsity']:.2f}% of "
                  f"{rep['prunable']:,} prunable weights ({pattern}, {importance}, {allocation})")


@app.command()
def compact(
    checkpoint: Path = typer.Argument(..., help=f"Checkpoint whose unit masks remove whole units: {CHECKPOINT_HELP}."),
    out: Path = typer.Option(..., help="Checkpoint of the smaller model to write."),
    allow_partial: bool = typer.Option(False, help="Masks of another pattern: compact the whole units only "
                                       "and keep the other masks."),
) -> None:
    """Remove the units a unit-pattern checkpoint pruned whole: a physically smaller model
    (per-layer widths; surviving weights and BatchNorm statistics copied) with the same outputs."""
    from fedasr.commands.compact import compact_checkpoint

    rep = compact_checkpoint(checkpoint, out, allow_partial)
    table = Table(title=f"{rep['checkpoint']} -> {out}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{rep['parameters_before']:,} -> {rep['parameters_after']:,} "
                                f"({rep['parameters_after'] / rep['parameters_before']:.3f}x)")
    table.add_row("units removed", f"{rep['units_removed']:,}")
    table.add_row("masks left", str(rep["masks_left"]))
    for k, v in sorted(rep["widths"].items()):
        table.add_row(f"width {k}", str(v))
    console.print(table)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help=f"Checkpoint to export (compact it first for a smaller model): "
                                                f"{CHECKPOINT_HELP}."),
    out: Path = typer.Option(..., help="Directory to write encoder/decoder/joiner .onnx, tokens.txt, config.json."),
    federation: Optional[Path] = typer.Option(None, show_default="the checkpoint's run's",
                                              help="Federation whose normalisation statistics go into the encoder."),
    int8: bool = typer.Option(False, "--int8", help="Also write dynamically int8-quantised *.int8.onnx models."),
    int8_scheme: str = typer.Option("u8u8", click_type=choice(INT8_SCHEMES),
                                    help="--int8: u8u8 (uint8 weights: accurate on every CPU), u8s8-7bit "
                                         "(7-bit int8 weights) or u8s8 (int8 weights: saturates on x86 CPUs "
                                         "without VNNI)."),
) -> None:
    """Export to ONNX (encoder, predictor, joiner; dynamic batch and length axes) for onnxruntime
    and sherpa-onnx (stateless predictor)."""
    from fedasr.commands.export import export_checkpoint

    meta = export_checkpoint(checkpoint, out, federation, int8=int8, int8_scheme=int8_scheme)
    console.print(f"exported {meta['source']} -> {out}: encoder.onnx, decoder.onnx ({meta['predictor']}), joiner.onnx"
                  f"{' (+ *.int8.onnx)' if int8 else ''}, tokens.txt, config.json; {meta['parameters']:,} parameters"
                  f"{'' if meta['sherpa_onnx'] else '; sherpa-onnx needs model.predictor=stateless'}")


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help=f"Checkpoint to describe: {CHECKPOINT_HELP}."),
    seconds: float = typer.Option(10.0, min=0.01, help="Utterance length for the FLOP count."),
    json_out: Optional[Path] = typer.Option(None, "--json", show_default="none",
                                            help="Also write the numbers to this JSON file."),
) -> None:
    """Per-layer shape, sparsity and nonzeros; parameter, byte and FLOP totals of a checkpoint."""
    import json

    from fedasr.fsutil import atomic_write_text
    from fedasr.commands.info import checkpoint_info

    d = checkpoint_info(checkpoint, seconds)
    table = Table(title=f"{d['checkpoint']}")
    for col in ("layer", "shape", "sparsity", "nonzeros"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for l in d["layers"]:
        table.add_row(l["name"] + ("" if l["prunable"] else " [dim](not prunable)[/]"),
                      "×".join(map(str, l["shape"])), f"{100 * l['sparsity']:.1f}%", f"{l['nonzeros']:,}")
    console.print(table)
    tot = Table(title="Totals")
    tot.add_column("")
    tot.add_column("value", justify="right")
    tot.add_row("parameters", f"{d['parameters']:,}")
    tot.add_row("nonzero parameters", f"{d['nonzeros']:,}")
    tot.add_row("prunable share of parameters", f"{100 * d['prunable_fraction']:.1f}%")
    tot.add_row("sparsity of prunable weights", f"{100 * d['sparsity']:.2f}%")
    tot.add_row("dense size (fp32 payload)", f"{d['dense_bytes']:,} B")
    tot.add_row("sparse-encoded size (bitmask + values)", f"{d['sparse_bytes']:,} B")
    tot.add_row(f"FLOPs / {seconds:g} s utterance (dense)", f"{d['flops'] / 1e9:.3f} G")
    tot.add_row(f"FLOPs / {seconds:g} s utterance (nonzero weights)", f"{d['flops_nonzero'] / 1e9:.3f} G")
    console.print(tot)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(d, indent=2))


def _sweep_sparsities(sparsity: list[float], sparsities: Optional[str]) -> Optional[list[float]]:
    """``--sparsity`` (repeatable); the old ``--sparsities A,B`` still read, with a note."""
    if sparsities is None:
        return list(sparsity) or None
    if sparsity:
        raise OptionError("--sparsities: give the targets once, as --sparsity A --sparsity B")
    deprecated("--sparsities A,B", "--sparsity A --sparsity B")
    try:
        values = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--sparsities: expected comma-separated numbers, got {sparsities!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise OptionError(f"--sparsities: each value must be in [0, 1), got {sparsities!r}")
    return values


def _engine_args(engine: str, superlink: Optional[str], insecure: bool, root_certificates: Optional[Path]) -> list[str]:
    """`fedasr train`'s engine options for a sweep's federated runs (checked here, before any run)."""
    if engine != "flower":
        if superlink or insecure or root_certificates:
            raise OptionError("--superlink/--insecure/--root-certificates: only with --engine flower")
        return []
    if superlink and not insecure and root_certificates is None:
        raise OptionError("--superlink: give --root-certificates CA.pem (TLS), or --insecure for loopback tests")
    return ["--engine", "flower", *(["--superlink", superlink] if superlink else []),
            *(["--insecure"] if insecure else []),
            *(["--root-certificates", str(root_certificates)] if root_certificates else [])]


@app.command()
def sweep(
    recipe: str = typer.Argument(..., help="Recipe with a sweep: section: a YAML file or a shipped recipe's name "
                                           "(`fedasr recipes`), e.g. ci."),
    federation: Path = typer.Option(..., help="Federation directory."),
    out: Path = typer.Option(..., help="Sweep directory (runs/ inside; re-running skips finished runs)."),
    sparsity: list[float] = typer.Option([], "--sparsity", click_type=SPARSITY,
                                         show_default="the recipe's",
                                         help="A target sparsity (repeatable): replaces the recipe's targets, the "
                                              "schemes' own lists too."),
    jobs: int = typer.Option(1, min=1, help="Parallel workers: training runs at once (each a process; the cores "
                                            "are split between them)."),
    set_: list[str] = typer.Option([], "--set", show_default="none",
                                   help="Override a recipe key for every run (repeatable)."),
    only: list[str] = typer.Option([], "--only", show_default="every run",
                                   help="Run only SCHEME or SCHEME@SPARSITY (repeatable; dense, "
                                   "seed too): a part of the sweep, e.g. one job of an array sharing --out."),
    devices: list[str] = typer.Option([], "--devices", show_default="none: each run's config device",
                                      help="A device to spread runs over (repeatable; round robin; each run's "
                                           "--set device=...; flower: its SuperNode slots)."),
    engine: str = typer.Option("embedded", click_type=choice(ENGINES),
                               help="The federated runs' engine (the seed and the centralized reference runs stay embedded)."),
    superlink: Optional[str] = typer.Option(None, show_default="each run starts its own on this machine",
                                            help="A running SuperLink HOST:PORT.", rich_help_panel=FLOWER),
    insecure: bool = typer.Option(False, help="Plain HTTP to --superlink (loopback or tests only).",
                                  rich_help_panel=FLOWER),
    root_certificates: Optional[Path] = typer.Option(None, show_default="none",
                                                     help="CA certificate(s) of --superlink (TLS).",
                                                     rich_help_panel=FLOWER),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", hidden=True,
                                             help="Deprecated: comma-separated targets (now --sparsity, repeated)."),
) -> None:
    """Train and evaluate one run per (pruning scheme, sparsity) of a recipe."""
    from fedasr.fl.flower.launch import parse_devices
    from fedasr.sweep import plan_sweep, resolved_recipe, run_sweep, runs_to_do

    t0 = time.time()
    engine_args = _engine_args(engine, superlink, insecure, root_certificates)
    device_list = parse_devices(listed(devices, "--devices"))
    plan = plan_sweep(resolved_recipe(recipe, set_, _sweep_sparsities(sparsity, sparsities)), out)
    total = sum(r.rounds for r in runs_to_do(plan, only))  # (an unknown --only: one line, nothing started)
    with progress_bar() as prog:
        # rounds, not runs: a run takes minutes, so the bar follows the rounds each run in
        # flight has checkpointed; the seed model's rounds come first
        events = _SweepProgress(prog, total, seed=plan.seed is not None)
        run_sweep(plan, federation, jobs=jobs, events=events, only=only, devices=device_list,
                  engine_args=engine_args)
    console.print(f"sweep finished in {time.time() - t0:.0f} s; `fedasr report {out}` for the curve")
    _report(out)


class _SweepProgress:
    """Rich progress for a sweep's rounds (fedasr.sweep.SweepEvents)."""

    def __init__(self, prog: Progress, total: int, seed: bool):
        self.prog = prog
        self.task = prog.add_task("sweep rounds" + (" (seed model first)" if seed else ""), total=total)

    def run_done(self, run, status: str) -> None:
        self.prog.console.print(f"{run.scheme} @ {run.sparsity:.2f}: {status}")

    def rounds(self, done: int, total: int) -> None:
        self.prog.update(self.task, completed=done)


def _report(sweep_dir: Path) -> None:
    from fedasr.sweep import write_report

    rows, splits, csv_path, png_path = write_report(sweep_dir)
    table = Table(title=f"WER vs sparsity — {sweep_dir}")
    for col in ("scheme", "target", "achieved", *[f"WER {s}" for s in splits], "nonzero params", "params",
                "model MB", "comm MB"):
        table.add_column(col, justify="left" if col == "scheme" else "right")
    for r in rows:
        table.add_row(r["scheme"] + (f" ({r['reference']})" if r.get("reference") and r["scheme"] != r["reference"]
                                     else ""),
                      r.get("knob") or f"{r['sparsity']:.2f}", f"{100 * r['achieved_sparsity']:.1f}%",
                      *[f"{100 * r[f'wer_{s}']:.2f}%" if f"wer_{s}" in r else "-" for s in splits],
                      f"{r['nonzero_params']:,}", f"{r['num_params']:,}", f"{r['model_bytes'] / 1e6:.2f}",
                      f"{r['comm_bytes'] / 1e6:.0f}")
    console.print(table)
    console.print(f"wrote {csv_path} and {png_path}")


@app.command()
def report(sweep_dir: Path = typer.Argument(..., help="Sweep directory made by `fedasr sweep`.")) -> None:
    """Gather a sweep into wer_vs_sparsity.csv and wer_vs_sparsity.png (+ a table)."""
    _report(sweep_dir)


@app.command()
def recipes() -> None:
    """List the shipped recipes (their names work wherever a recipe is asked for)."""
    from fedasr.config import recipe_description, shipped_recipes

    table = Table(title="Shipped recipes (`fedasr config NAME` shows one resolved)")
    for col in ("name", "what", "file"):
        table.add_column(col)
    for name, path in shipped_recipes().items():
        table.add_row(name, recipe_description(path), str(path))
    console.print(table)


@app.command(name="config")
def config_(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    set_: list[str] = typer.Option([], "--set", show_default="none", help="Override a key (repeatable), as in "
                                   "train and sweep."),
    sparsity: list[float] = typer.Option([], "--sparsity", click_type=SPARSITY,
                                         show_default="the recipe's",
                                         help="A target sparsity (repeatable), as in sweep."),
) -> None:
    """Print a recipe resolved: every key of the run config (defaults filled in, method blocks in full)
    and its sweep part, as YAML (itself a recipe; docs/config.md explains each key)."""
    from fedasr.sweep import resolved_recipe, resolved_recipe_text

    text = resolved_recipe_text(resolved_recipe(recipe, set_, list(sparsity) or None))
    options = "".join(f" --set {o}" for o in set_) + "".join(f" --sparsity {v:g}" for v in sparsity)
    print(f"# fedasr config {recipe}{options}\n{text}", end="")


def _error(message: str, code: int) -> None:
    """Every error the same way: one line on stderr, then the exit status."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """The `fedasr` entry point: runtime errors (FedasrError) exit 1, usage errors (Click's and
    OptionError: bad option values or combinations) 2, each as one line."""
    try:
        rv = app(standalone_mode=False)
    except FedasrError as e:
        _error(str(e), e.exit_code)
    except click.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `fedasr` alone: the help was printed
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" ({ctx.command_path} --help)" if ctx is not None else ""
        _error(" ".join(e.format_message().split()) + hint, e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _error("interrupted", 130)
    if rv == 130:  # Typer turns an interrupt inside a command into exit status 130
        _error("interrupted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
