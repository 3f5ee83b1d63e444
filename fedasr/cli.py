"""The `fedasr` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedasr import __version__
from fedasr.errors import FedasrError

app = typer.Typer(
    name="fedasr",
    help="Pruning federated speech-recognition models: synth → shard → train → prune → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # logs and pipes: keep tables readable instead of 80 columns


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


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Root directory; the corpus is written to OUT/LibriSpeech."),
    speakers: int = typer.Option(24, help="Training speakers (seen in train, dev and test-clean)."),
    utterances_per_speaker: int = typer.Option(50, help="Training utterances per speaker."),
    test_other_speakers: Optional[int] = typer.Option(None, help="Unseen speakers for test-other [default: speakers/4]."),
    dev_per_speaker: Optional[int] = typer.Option(None, help="Dev utterances per speaker [default: utts/10]."),
    test_per_speaker: Optional[int] = typer.Option(None, help="test-clean utterances per speaker [default: utts/10]."),
    chapters_per_speaker: int = typer.Option(3, help="Chapters per speaker and split."),
    server_speakers: int = typer.Option(0, help="Further speakers in a train-server split: the server's own "
                                        "data (seed model), sentences disjoint from every other split."),
    domain: str = typer.Option("small", help="Text domain: 'small' (≤200 words: digits, times, dates, "
                               "commands) or 'open' (≥1000-word grammar, hard)."),
    seed: int = typer.Option(0, help="Seed for voices, texts and noise."),
    jobs: int = typer.Option(default_jobs(), help="Parallel TTS processes."),
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
    corpus: Optional[Path] = typer.Option(None, help="LibriSpeech-layout root (the directory holding the split "
                                          "folders); the splits that --manifests does not name come from here."),
    manifests: list[str] = typer.Option([], "--manifests", help="SPLIT=PATH (repeatable): lhotse manifests of a "
                                        "split: a CutSet file, RECORDINGS,SUPERVISIONS, or a directory of them "
                                        "(docs/data.md). Any sample rate and channel count."),
    out: Path = typer.Option(..., help="Federation directory to create."),
    train_split: list[str] = typer.Option(..., "--train-split", help="Training split (repeatable)."),
    dev_split: list[str] = typer.Option([], "--dev-split", help="Dev split (repeatable)."),
    test_split: list[str] = typer.Option([], "--test-split", help="Test split (repeatable)."),
    server_split: list[str] = typer.Option([], "--server-split", help="The server's own data (repeatable; never a "
                                           "client): the seed model trains on it, e.g. train-clean-100."),
    by: str = typer.Option("speaker", help="Partition: speaker, chapter, iid, dirichlet."),
    num_clients: Optional[int] = typer.Option(None, help="Clients for iid/dirichlet."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (dirichlet only)."),
    min_utterances: int = typer.Option(1, help="Drop clients with fewer utterances."),
    max_clients: Optional[int] = typer.Option(None, help="Keep a seeded random subset of this many clients."),
    seed: int = typer.Option(0, help="Seed for iid/dirichlet partitions and client subsets."),
    vocab_size: Optional[int] = typer.Option(None, help="SentencePiece vocabulary size (including blank and unk) "
                                             "[default: the most the transcripts allow, at most 256]."),
    tokenizer_type: str = typer.Option("unigram", help="SentencePiece model type: unigram or bpe."),
    tokenizer: Optional[Path] = typer.Option(None, help="Use this SentencePiece model instead of training one."),
    skip_invalid: bool = typer.Option(False, help="Drop bad utterances (listed in federation.yaml) instead of failing."),
    jobs: int = typer.Option(default_jobs(), help="Parallel workers for scanning and features."),
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


@app.command()
def train(
    federation: Optional[Path] = typer.Option(None, help="Federation directory made by `fedasr shard`."),
    config: Optional[Path] = typer.Option(None, help="Recipe YAML (e.g. recipes/ci.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Run directory to create."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set fl.rounds=20 (repeatable)."),
    centralized: bool = typer.Option(False, help="Train centrally: on the union of the clients' data (baseline), "
                                     "or with --data server on the server's own data (the seed model)."),
    data: str = typer.Option("clients", help="--centralized only: clients (their union) or server (the "
                             "federation's server data, `shard --server-split`)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its latest checkpoint."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this checkpoint's weights and masks "
                                             "(e.g. the output of `fedasr prune`) and fine-tune."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    engine: str = typer.Option("embedded", help="embedded (one process) or flower (Flower's Deployment Engine)."),
    superlink: Optional[str] = typer.Option(None, help="flower: a running SuperLink HOST:PORT [default: start one "
                                            "and SuperNodes on this machine, on loopback]."),
    insecure: bool = typer.Option(False, help="flower: plain HTTP to --superlink (loopback or tests only)."),
    root_certificates: Optional[Path] = typer.Option(None, help="flower: CA certificate(s) of --superlink (TLS)."),
    slots: Optional[int] = typer.Option(None, help="flower, one machine: SuperNodes = concurrent clients "
                                        "[default: one per --devices entry; one on a GPU; else clients per "
                                        "round, at most the cores]."),
    round_timeout: float = typer.Option(900.0, help="flower: seconds a round waits for its clients."),
    devices: Optional[str] = typer.Option(None, help="flower, one machine: the SuperNode slots' devices, e.g. "
                                          "cuda:0,cuda:1 (slot i on the i-th, round robin; each sees only its "
                                          "GPU) [default: one slot per device given]."),
    device: Optional[str] = typer.Option(None, help="The config's device replaced (auto, cpu, cuda, cuda:N); "
                                         "with --resume too (a run going on on another machine)."),
) -> None:
    """Train the Conformer-Transducer federatedly (or centrally) over the federation's clients."""
    from fedasr.commands.train import train as do_train

    @contextmanager
    def rounds_progress(rounds: int, done: int):
        with progress_bar() as prog:
            yield _RoundProgress(prog, rounds, done)

    history, root = do_train(federation=federation, config=config, out=out, overrides=set_, centralized=centralized,
                             data=data, resume=resume, init_from=init_from, overwrite=overwrite, engine=engine,
                             superlink=superlink, insecure=insecure, root_certificates=root_certificates,
                             slots=slots, round_timeout=round_timeout, devices=devices, device=device,
                             events=rounds_progress)
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
    run: Path = typer.Option(..., help="Run directory (made by `fedasr train`)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to evaluate [default: the run's latest]."),
    split: list[str] = typer.Option([], "--split", help="Split to evaluate (repeatable) [default: all test splits]."),
    beam: int = typer.Option(1, help="Beam size; 1 = greedy search."),
    federation: Optional[Path] = typer.Option(None, help="Federation directory [default: the run's]."),
    max_duration: float = typer.Option(120.0, help="Seconds of audio per decoding batch."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    max_symbols_per_frame: int = typer.Option(1, help="Greedy search: symbols a frame at most (1: sherpa-onnx's "
                                              "greedy search, the deployed decoding)."),
    unrestricted: int = typer.Option(3, help="Also score greedy search with up to this many symbols a frame, shown "
                                     "beside where it differs (0: off)."),
) -> None:
    """Decode test splits and report WER/CER (per split and per client) into RUN_DIR/results.json."""
    from fedasr.commands.evaluate import evaluate_run
    from fedasr.rundir import RunDir

    with progress_bar() as prog:
        def progress(split, total):
            task = prog.add_task(f"decoding {split}", total=total)
            return lambda n: prog.advance(task, n)

        results, splits, ckpt_path = evaluate_run(run, checkpoint=checkpoint, splits=split, beam=beam,
                                                  federation=federation, max_duration=max_duration, device=device,
                                                  progress=progress, max_symbols_per_frame=max_symbols_per_frame,
                                                  unrestricted=unrestricted)
    results_path = RunDir(run).results_path
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
    checkpoint: Path = typer.Argument(..., help="Checkpoint to prune (e.g. RUN_DIR/checkpoints/round_0020.pt)."),
    out: Path = typer.Option(..., help="Pruned checkpoint to write."),
    sparsity: float = typer.Option(..., help="Target share of prunable weights set to zero, in [0, 1)."),
    pattern: str = typer.Option("unstructured", help="unstructured, row, column, half_row, half_column, coherent_column, unit."),
    importance: str = typer.Option("magnitude", help="magnitude, gradient (needs --federation), random."),
    allocation: str = typer.Option("uniform", help="uniform, global, adaptive."),
    norm: str = typer.Option("l2", help="Group norm for magnitude importance: l1 or l2."),
    federation: Optional[Path] = typer.Option(None, help="Federation whose training data gives gradients."),
    batches: int = typer.Option(8, help="Training batches for gradient importance."),
    seed: int = typer.Option(0, help="Seed (random importance, gradient batches)."),
) -> None:
    """One-shot pruning of a trained checkpoint (the centralized-pruning baseline).

    The output can be fine-tuned with `fedasr train --init-from OUT`."""
    from fedasr.commands.prune import prune_checkpoint

    rep = prune_checkpoint(checkpoint, out, sparsity=sparsity, pattern=pattern, importance=importance,
                           allocation=allocation, norm=norm, federation=federation, batches=batches, seed=seed)
    console.print(f"pruned {checkpoint} -> {out}: sparsity {100 * rep['sparsity']:.2f}% of "
                  f"{rep['prunable']:,} prunable weights ({pattern}, {importance}, {allocation})")


@app.command()
def compact(
    checkpoint: Path = typer.Argument(..., help="Checkpoint whose unit masks remove whole units."),
    out: Path = typer.Option(..., help="Checkpoint of the smaller model to write."),
    allow_partial: bool = typer.Option(False, help="Masks of another pattern: compact the whole units only "
                                       "and keep the other masks."),
) -> None:
    """Remove the units a unit-pattern checkpoint pruned whole: a physically smaller model
    (per-layer widths; surviving weights and BatchNorm statistics copied) with the same outputs."""
    from fedasr.commands.compact import compact_checkpoint

    rep = compact_checkpoint(checkpoint, out, allow_partial)
    table = Table(title=f"{checkpoint} -> {out}")
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
    checkpoint: Path = typer.Argument(..., help="Checkpoint to export (compact it first for a smaller model)."),
    out: Path = typer.Option(..., help="Directory to write encoder/decoder/joiner .onnx, tokens.txt, config.json."),
    federation: Optional[Path] = typer.Option(None, help="Federation whose normalisation statistics go into the "
                                              "encoder [default: the checkpoint's run's]."),
    int8: bool = typer.Option(False, "--int8", help="Also write dynamically int8-quantised *.int8.onnx models."),
    int8_scheme: str = typer.Option("u8u8", help="--int8: u8u8 (uint8 weights: accurate on every CPU), u8s8-7bit "
                                    "(7-bit int8 weights) or u8s8 (int8 weights: saturates on x86 CPUs "
                                    "without VNNI)."),
) -> None:
    """Export to ONNX (encoder, predictor, joiner; dynamic batch and length axes) for onnxruntime
    and sherpa-onnx (stateless predictor)."""
    from fedasr.commands.export import export_checkpoint

    meta = export_checkpoint(checkpoint, out, federation, int8=int8, int8_scheme=int8_scheme)
    console.print(f"exported {checkpoint} -> {out}: encoder.onnx, decoder.onnx ({meta['predictor']}), joiner.onnx"
                  f"{' (+ *.int8.onnx)' if int8 else ''}, tokens.txt, config.json; {meta['parameters']:,} parameters"
                  f"{'' if meta['sherpa_onnx'] else '; sherpa-onnx needs model.predictor=stateless'}")


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to describe."),
    seconds: float = typer.Option(10.0, help="Utterance length for the FLOP count."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
) -> None:
    """Per-layer shape, sparsity and nonzeros; parameter, byte and FLOP totals of a checkpoint."""
    import json

    from fedasr.fsutil import atomic_write_text
    from fedasr.commands.info import checkpoint_info

    d = checkpoint_info(checkpoint, seconds)
    table = Table(title=f"{checkpoint}")
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


def _parse_sparsities(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedasrError(f"--sparsities: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise FedasrError(f"--sparsities: each value must be in [0, 1), got {text!r}")
    return values


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a sweep: section (e.g. recipes/ci.yaml)."),
    federation: Path = typer.Option(..., help="Federation directory."),
    out: Path = typer.Option(..., help="Sweep directory (runs/ inside; re-running skips finished runs)."),
    sparsities: Optional[str] = typer.Option(
        None, help="Replace the recipe's targets (the schemes' own lists too), e.g. 0,0.5,0.9."),
    jobs: int = typer.Option(1, help="Runs in parallel (threads are split between them)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key for every run (repeatable)."),
    only: list[str] = typer.Option([], "--only", help="Run only SCHEME or SCHEME@SPARSITY (repeatable; dense, "
                                   "seed too): a part of the sweep, e.g. one job of an array sharing --out."),
    devices: Optional[str] = typer.Option(None, help="Spread runs over these devices, round robin (e.g. "
                                          "cuda:0,cuda:1; each run's --set device=...; flower: its SuperNode "
                                          "slots)."),
    engine: str = typer.Option("embedded", help="The federated runs' engine: embedded or flower (Flower's "
                               "Deployment Engine; the seed and the centralized reference runs stay embedded)."),
    superlink: Optional[str] = typer.Option(None, help="flower: a running SuperLink HOST:PORT [default: each "
                                            "run starts its own on this machine]."),
    insecure: bool = typer.Option(False, help="flower: plain HTTP to --superlink (loopback or tests only)."),
    root_certificates: Optional[Path] = typer.Option(None, help="flower: CA certificate(s) of --superlink (TLS)."),
) -> None:
    """Train and evaluate one run per (pruning scheme, sparsity) of a recipe."""
    from fedasr.fl.flower.launch import parse_devices
    from fedasr.sweep import plan_sweep, resolved_recipe, run_sweep, runs_to_do

    t0 = time.time()
    if engine not in ("embedded", "flower"):
        raise FedasrError(f"--engine: unknown {engine!r} (embedded, flower)")
    if engine != "flower" and (superlink or insecure or root_certificates):
        raise FedasrError("--superlink/--insecure/--root-certificates: only with --engine flower")
    if superlink and not insecure and root_certificates is None:
        raise FedasrError("--superlink: give --root-certificates CA.pem (TLS), or --insecure for loopback tests")
    engine_args = [] if engine == "embedded" else ["--engine", "flower", *(["--superlink", superlink] if superlink
                                                                           else []),
                                                   *(["--insecure"] if insecure else []),
                                                   *(["--root-certificates", str(root_certificates)]
                                                     if root_certificates else [])]
    plan = plan_sweep(resolved_recipe(recipe, set_, _parse_sparsities(sparsities)), out)
    total = sum(r.rounds for r in runs_to_do(plan, only))  # (an unknown --only: one line, nothing started)
    with progress_bar() as prog:
        # rounds, not runs: a run takes minutes, so the bar follows the rounds each run in
        # flight has checkpointed; the seed model's rounds come first
        events = _SweepProgress(prog, total, seed=plan.seed is not None)
        run_sweep(plan, federation, jobs=jobs, events=events, only=only, devices=parse_devices(devices),
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


def main() -> None:
    try:
        app()
    except FedasrError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
