"""End to end through the real CLI: a reduced ci recipe swept over two sparsities, then reported."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FAST, run_cli, sets
from fedasr.checkpoint import read_checkpoint
from fedasr.config import load_config
from fedasr.fsutil import file_sha256
from fedasr.rundir import RunDir
from fedasr.errors import FedasrError
from fedasr.model.transducer import ModelConfig, Transducer

REPO = Path(__file__).resolve().parent.parent

# the ci recipe at toy size (its model options kept: FAST replaces model.overrides)
REDUCED = FAST + ["model.overrides.predictor=stateless", "model.overrides.simple_head=true",
                  "fl.rounds=2", "pruning.federated_pruning.start_round=1", "pruning.federated_pruning.end_round=2",
                  "pruning.fedtiny.start_round=2", "pruning.fedtiny.end_round=2", "pruning.fedtiny.update_every=1",
                  "pruning.fedtiny.phase_batches=1", "pruning.fedtiny.candidates=2"]


def test_reduced_ci_sweep_and_report(server_federation, tmp_path):
    """`make demo`'s part of the ci recipe's sweep at toy size: the seed model once on the
    server's data, every run from it (dense, the FP patterns, the server-only and centralized
    references at 0.5), the report with the seed row."""
    out = tmp_path / "sweep"
    schemes = ["unstructured-magnitude-adaptive", "unit-magnitude-global", "server-only", "centralized"]
    only = ["--only", "dense"] + [x for s in schemes for x in ("--only", f"{s}@0.5")]
    assert " ".join(only) in " ".join((REPO / "Makefile").read_text().replace("\\\n\t", "").split())
    args = ["sweep", "recipes/ci.yaml", "--federation", server_federation, "--out", out, *only,
            "--jobs", "2", *sets(*REDUCED, "seed_model.steps=2", "seed_model.rounds=1")]
    r = run_cli(*args, env={"FEDASR_PROGRESS": "1"}, timeout=1800)
    assert r.returncode == 0, r.stderr + r.stdout
    n_runs = 1 + len(schemes)
    total = 1 + 2 * n_runs  # the seed's round, then 2 rounds a run
    assert "sweep rounds (seed model first)" in r.stderr and f"{total}/{total}" in r.stderr  # followed by rounds
    rows = list(csv.DictReader((out / "wer_vs_sparsity.csv").open()))
    assert sorted((row["scheme"], float(row["sparsity"])) for row in rows) == sorted(
        [("seed", 0.0), ("dense", 0.0)] + [(s, 0.5) for s in schemes])
    assert {row["scheme"]: row["reference"] for row in rows if row["reference"]} == {
        "server-only": "server-only", "centralized": "centralized"}
    for row in rows:
        for split in ("test-clean", "test-other"):
            wer = float(row[f"wer_{split}"])
            assert math.isfinite(wer) and wer >= 0
        assert int(row["nonzero_params"]) > 0
        if row["scheme"] in ("seed", "dense"):
            assert float(row["achieved_sparsity"]) == 0.0
        else:  # within one group (unit: a whole FFN unit, head or channel)
            assert abs(float(row["achieved_sparsity"]) - 0.5) < 0.03
        # centralized runs (the seed, the references) send nothing
        assert (int(row["comm_bytes"]) == 0) == (row["scheme"] in ("seed", "server-only", "centralized"))
    dense = next(r for r in rows if r["scheme"] == "dense")
    sparse = next(r for r in rows if r["scheme"] not in ("dense", "seed"))
    assert int(sparse["model_bytes"]) < int(dense["model_bytes"])
    # the seed is trained once, on the server's data; every run's first checkpoint descends from it
    seed_run = RunDir(out / "seed")
    assert seed_run.read_config()["data"] == "server" and len(seed_run.metrics()) == 1
    seed_ckpt = seed_run.latest()
    seed_sha = file_sha256(seed_ckpt)
    steps = {}  # each run's optimizer steps, all its clients together (metrics.jsonl)
    for f in sorted((out / "runs").glob("**/sweep.json")):
        conf = RunDir(f.parent).read_config()
        steps[f.parent.parent.name] = sum(sum(row["steps"]) for row in RunDir(f.parent).metrics())
        if f.parent.parent.name in ("server-only", "centralized"):  # the FP scheme's pruning, centrally
            assert conf["data"] == ("server" if f.parent.parent.name == "server-only" else "clients")
            assert conf["mode"] == "centralized"
            assert conf["fl"]["centralized_optimizer"] == (  # server-only: a fresh one a round
                "per_round" if f.parent.parent.name == "server-only" else "persistent")
            fp = RunDir(out / "runs" / schemes[0] / "s0.50").read_config()["pruning"]
            assert conf["pruning"] == fp and conf["pruning"]["method"] == "federated_pruning"
        else:
            assert conf["mode"] == "federated"
        assert conf["init_from"] == str(seed_ckpt) and conf["init_from_sha256"] == seed_sha
    # the references took as many steps as the federated FP run's clients together
    # (REDUCED: 2 rounds x 2 clients x 2 local steps)
    assert steps["server-only"] == steps["centralized"] == steps[schemes[0]] == 2 * 2 * 2
    png = (out / "wer_vs_sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # re-running skips the finished runs (the seed too: trained once); report alone works too
    again = run_cli(*args)
    # every run is skipped; the seed (trained once, below) is not listed under --only
    assert again.returncode == 0 and again.stderr.count("skipped (finished)") == len(rows) - 1
    assert (out / "seed" / "log.txt").read_text().count("$ fedasr train") == 1
    rep = run_cli("report", out)
    assert rep.returncode == 0 and "WER vs sparsity" in rep.stdout and "seed" in rep.stdout


def test_seed_and_reference_plans_and_errors(tmp_path, federation):
    from fedasr.sweep import plan_runs, plan_seed

    fp = {"method": "federated_pruning", "federated_pruning": {"pattern": "row"}}
    recipe = {"seed_model": {"steps": 40, "rounds": 2, "overrides": ["train.lr=0.002"]},
              "fl": {"rounds": 3, "clients_per_round": 2, "local_steps": 5},
              "sweep": {"sparsities": [0.0, 0.5], "schemes": [
                  {"name": "fp", "pruning": fp, "overrides": ["train.lr=0.003"]},
                  {"name": "so", "like": "fp", "centralized": True, "data": "server"},
                  {"name": "twin", "like": "fp", "centralized": True, "sparsities": [0.0, 0.5, 0.7]}]}}
    seed = plan_seed(recipe, tmp_path)
    assert seed.path == tmp_path / "seed" and seed.rounds == 2
    assert {"fl.rounds=2", "fl.local_steps=20", "fl.clients_per_round=1", "train.lr=0.002"} <= set(seed.settings)
    runs = plan_runs(recipe, tmp_path)
    assert [(r.scheme, r.sparsity, r.from_seed, r.reference) for r in runs] == [
        ("dense", 0.0, True, ""), ("fp", 0.5, True, ""), ("so", 0.5, True, "server-only"),
        ("twin", 0.0, True, "centralized"), ("twin", 0.5, True, "centralized"), ("twin", 0.7, True, "centralized")]
    fed_run, so, twin0, twin = runs[1], runs[2], runs[3], runs[4]
    # a reference copies the federated scheme's pruning and overrides; server-only takes a fresh
    # optimizer every round, as the federated clients do
    assert so.train_args == ["--centralized", "--data", "server"] and twin.train_args[:3] == ["--centralized",
                                                                                            "--data", "clients"]
    assert set(fed_run.settings) <= set(twin.settings) and set(fed_run.settings) <= set(so.settings)
    assert "fl.centralized_optimizer=per_round" in so.settings
    assert not any(s.startswith("fl.centralized_optimizer") for s in twin.settings)
    assert "pruning.method=none" in twin0.settings and "train.lr=0.003" in twin0.settings
    for bad, msg in [
        ({"seed_model": {"steps": 5, "rounds": 2}}, "seed_model.steps: 5 is not a multiple of seed_model.rounds"),
        ({"sweep": {"schemes": [{"name": "so", "server_only": True, "pruning": fp}]}},
         r"sweep.schemes\[0\].server_only: replaced by `centralized: true` and `data: server`"),
        ({"sweep": {"schemes": [{"name": "so", "like": "nope", "centralized": True}]}},
         r"sweep.schemes\[0\].like: no scheme named 'nope'"),
        ({"sweep": {"schemes": [{"name": "so", "pruning": fp, "data": "server"}]}},
         "data: server needs centralized: true"),
    ]:
        with pytest.raises(FedasrError, match=msg):
            plan_runs(bad, tmp_path)
    # a seed needs server data: one line, nothing started
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = run_cli("sweep", tmp_path / "r.yaml", "--federation", federation, "--out", tmp_path / "s")
    assert r.returncode != 0 and "holds no server data" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_references_train_the_federated_runs_steps_and_samples(server_federation, tmp_path):
    """The centralized twin and the server-only baseline take as many optimizer steps a round as
    the federated run's clients together, of the same batches (train.max_duration seconds of
    audio: as many samples); server-only restarts its optimizer every round as a client does."""
    from fedasr.data.federation import Federation
    from fedasr.fl import client as fl_client
    from fedasr.fl.runner import Runner

    fed = Federation(server_federation)
    settings = FAST + ["fl.rounds=2", "fl.local_steps=3"]
    federated = Runner(tmp_path / "fed", fed, load_config(None, settings))
    federated.start()
    fed_steps = [sum(r["steps"]) for r in federated.run_rounds()]
    assert fed_steps == [6, 6]  # 2 clients x 3 steps a round
    for data, opt in (("clients", "persistent"), ("server", "per_round")):
        optimizers = []

        def spy(*args, **kw):
            optimizers.append(kw["optimizer"])
            return fl_client.train_client(*args, **kw)

        ref = Runner(tmp_path / data, fed, load_config(None, settings + [f"fl.centralized_optimizer={opt}"]),
                     centralized=True, data=data, client_fn=spy)
        ref.start()
        rows = ref.run_rounds()
        assert [r["steps"] for r in rows] == [[6], [6]]  # one client, the federated clients' steps together
        assert all(r["processed"] > 0 for r in rows)
        assert ref.cfg.train.max_duration == federated.cfg.train.max_duration  # batches of the same audio
        assert len({id(o) for o in optimizers}) == (2 if opt == "per_round" else 1)


def test_sweep_rejects_bad_recipe(federation, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: {sparsities: [0, 1.5], schemes: [{name: x, pruning: {pattern: column}}]}\n")
    r = run_cli("sweep", bad, "--federation", federation, "--out", tmp_path / "s")
    assert r.returncode != 0 and "sweep.sparsities[1]" in r.stderr
    bad.write_text("sweep: {schemes: [{name: x, pruning: {method: federated_pruning, "
                   "federated_pruning: {pattern: diagonal}}}]}\n")
    r = run_cli("sweep", bad, "--federation", federation, "--out", tmp_path / "s")
    assert r.returncode != 0 and "pruning.federated_pruning.pattern: unknown 'diagonal'" in r.stderr
    bad.write_text("sweep: {schemes: [{name: x, pruning: {federated_pruning: {pattern: row}}}]}\n")
    r = run_cli("sweep", bad, "--federation", federation, "--out", tmp_path / "s")
    assert r.returncode != 0 and "sweep.schemes[0].pruning.method: required" in r.stderr
    bad.write_text("sweep: {schemes: [{name: x, pruning: {method: fedtiny, fedtiny: {granularity: atoms}}}]}\n")
    r = run_cli("sweep", bad, "--federation", federation, "--out", tmp_path / "s")
    assert r.returncode != 0 and "pruning.fedtiny.granularity: unknown 'atoms'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s" / "runs").exists()


@pytest.mark.parametrize("recipe", ["recipes/ci.yaml", "recipes/ci_structured.yaml", "recipes/ci_baselines.yaml",
                                    "recipes/librispeech/federated_pruning.yaml",
                                    "recipes/librispeech100/federated_pruning.yaml"])
def test_recipes_parse_and_build_the_model(recipe):
    from fedasr.methods import validate
    from fedasr.sweep import load_recipe, split_recipe

    cfg = load_config(recipe)  # what `fedasr train --config` reads: the sweep's part ignored
    validate(cfg)
    model = Transducer(ModelConfig.preset(cfg.model.preset, vocab_size=256, **cfg.model.overrides))
    assert model.num_parameters() > 1e6
    run, sweep = split_recipe(load_recipe(recipe))
    assert run == cfg
    assert sweep.sweep.schemes and all(0 <= s < 1 for s in sweep.sweep.sparsities)


def test_knob_schemes_and_per_scheme_sparsities_plan_their_runs(tmp_path):
    from fedasr.sweep import plan_runs

    recipe = {"sweep": {"sparsities": [0.0, 0.5, 0.9], "schemes": [
        {"name": "fp", "pruning": {"method": "federated_pruning"}},
        {"name": "tiny", "pruning": {"method": "fedtiny"}, "sparsities": [0.9]},
        {"name": "asp", "pruning": {"method": "asp"}, "knob": {"key": "pruning.asp.k", "values": [1.5, 2.5]}}]}}
    runs = plan_runs(recipe, tmp_path)
    assert [(r.scheme, r.sparsity, r.path.name) for r in runs] == [
        ("dense", 0.0, "dense"), ("fp", 0.5, "s0.50"), ("fp", 0.9, "s0.90"), ("tiny", 0.9, "s0.90"),
        ("asp", 0.0, "k1.5"), ("asp", 0.0, "k2.5")]
    from fedasr.sweep import resolved_recipe

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    forced = plan_runs(resolved_recipe(tmp_path / "r.yaml", sparsities=[0.0, 0.3]), tmp_path)
    assert [(r.scheme, r.sparsity) for r in forced] == [("dense", 0.0), ("fp", 0.3), ("tiny", 0.3),
                                                        ("asp", 0.0), ("asp", 0.0)]  # --sparsities wins
    asp = runs[-1]
    assert "pruning.asp.k=2.5" in asp.settings and "pruning.method=\"asp\"" in asp.settings
    assert not any(s.startswith("pruning.target_sparsity") for s in asp.settings)
    assert asp.knob == {"key": "pruning.asp.k", "value": 2.5}


def test_recipe_extends_another(tmp_path):
    from fedasr.sweep import load_recipe, split_recipe

    (tmp_path / "base.yaml").write_text("seed: 3\ntrain: {lr: 0.002, ctc_weight: 0.3}\n"
                                        "sweep: {sparsities: [0.0, 0.5], schemes: [{name: a, pruning: {method: fedtiny}}]}\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\ntrain: {lr: 0.0005}\nsweep: {schemes: [{name: b, pruning: {method: asp}}]}\n")
    cfg = load_config(child)
    assert cfg.seed == 3 and cfg.train.lr == 0.0005 and cfg.train.ctc_weight == 0.3  # mappings merge
    sweep = split_recipe(load_recipe(child))[1].sweep
    assert [s.name for s in sweep.schemes] == ["b"] and sweep.sparsities == [0.0, 0.5]  # lists replace
    assert "extends" not in load_recipe(child)
    (tmp_path / "base.yaml").write_text("extends: sub/child.yaml\n")
    with pytest.raises(FedasrError, match="leads back to this file"):
        load_config(child)
    child.write_text("extends: ../missing.yaml\n")
    with pytest.raises(FedasrError, match="missing.yaml: config file does not exist"):
        load_config(child)


def test_parsing_a_recipe_imports_neither_torch_nor_the_methods():
    """The config parser is the schema and a generic loader; the method layer resolves the
    method blocks (fedasr.methods.validate), so reading a config stays cheap."""
    code = ("import sys; from fedasr.config import load_config; "
            "cfg = load_config('recipes/ci.yaml', ['pruning.method=fedtiny', 'pruning.fedtiny.candidates=3']); "
            "print(cfg.pruning.blocks['fedtiny']['candidates'], "
            "[m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'fedasr.methods'))])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "[]"]


def test_the_method_layer_resolves_the_method_blocks():
    from fedasr.config import parse_config
    from fedasr.methods import method_blocks, method_config, resolved_pruning, validate
    from fedasr.methods.fedtiny import FedTinyConfig

    cfg = load_config("recipes/ci.yaml", ["pruning.method=fedtiny", "pruning.fedtiny.candidates=3"])
    block = method_config(cfg.pruning)
    assert isinstance(block, FedTinyConfig) and block.candidates == 3 and block.granularity == "block"
    assert block.density_tolerance == FedTinyConfig().density_tolerance  # a default the recipe leaves out
    assert sorted(method_blocks(cfg.pruning)) == ["asp", "feddst", "federated_pruning", "fedtiny", "prunefl"]  # every block given, parsed
    assert method_config(load_config(None, []).pruning) is None  # method none: no block
    full = resolved_pruning(cfg.pruning)  # every block in full: what a run's config.yaml can record
    assert full["fedtiny"] == dataclasses.asdict(block) and full["target_sparsity"] == cfg.pruning.target_sparsity
    assert method_blocks(parse_config({"pruning": full}).pruning) == method_blocks(cfg.pruning)
    for setting, msg in [("pruning.bogus.x=1", "pruning.bogus: unknown key (known: method, target_sparsity, include, "
                                               "exclude, recalibrate_bn, asp, feddst, federated_pruning, fedtiny, prunefl, snip, synflow)"),
                         ("pruning.method=magic", "pruning.method: unknown 'magic' (asp, feddst, federated_pruning, "
                                                  "fedtiny, none, prunefl, snip, synflow)"),
                         ("pruning.fedtiny.candidates=0", "pruning.fedtiny.candidates/phase_batches/update_every: must be"),
                         ("pruning.fedtiny=5", "pruning.fedtiny: expected a mapping of fedtiny's settings, got 5")]:
        bad = load_config(None, [setting])  # the parser keeps the block as given ...
        with pytest.raises(FedasrError) as e:  # ... the method layer names the field
            validate(bad)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_sweep_progress_counts_rounds_of_runs_in_flight_and_finished(tmp_path):
    from fedasr.sweep import SweepProgress, SweepRun

    a, b = SweepRun("a", 0.5, tmp_path / "a", [], rounds=3), SweepRun("b", 0.9, tmp_path / "b", [], rounds=2)
    progress = SweepProgress([a, b])
    assert progress.total == 5 and progress.done() == 0
    a.path.mkdir()
    (a.path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')  # two rounds checkpointed
    assert progress.done() == 2
    progress.finish(b)  # a finished (or skipped) run counts whole
    assert progress.done() == 4


# ---------------------------------------------------------------------------- parts of a sweep, shared directories


def _tiny_recipe(tmp_path, seed_steps=2):
    recipe = {"fl": {"rounds": 1}, "seed_model": {"steps": seed_steps, "rounds": 1},
              "sweep": {"sparsities": [0.0, 0.5], "schemes": [
                  {"name": "fp", "pruning": {"method": "federated_pruning"}}]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_only_selects_runs_and_names_them_when_it_cannot(tmp_path):
    from fedasr.sweep import plan_sweep, resolved_recipe, runs_to_do, select_runs

    plan = plan_sweep(resolved_recipe(_tiny_recipe(tmp_path), ["sweep.sparsities=[0.0, 0.5, 0.7]"]), tmp_path / "s")
    assert [(r.scheme, r.sparsity) for r in select_runs(plan, ["fp@0.7", "dense"])] == [("dense", 0.0), ("fp", 0.7)]
    assert [r.sparsity for r in select_runs(plan, ["fp"])] == [0.5, 0.7]
    assert [r.scheme for r in runs_to_do(plan, ["fp@0.5"])] == ["seed", "fp"]  # its seed first
    assert [r.scheme for r in runs_to_do(plan, ["seed"])] == ["seed"]
    with pytest.raises(FedasrError, match=r"--only fp@0.9: no such run \(the sweep's runs: seed, dense, fp@0.50, fp@0.70\)"):
        select_runs(plan, ["fp@0.9"])


def test_a_claim_is_exclusive_and_a_dead_owners_claim_is_taken_over(tmp_path):
    import json
    import os
    import socket

    from fedasr.sweep import CLAIM_FILE, Claim, claim_run

    run = tmp_path / "run"
    mine = claim_run(run)
    assert isinstance(mine, Claim)
    owner = json.loads((run / CLAIM_FILE).read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert claim_run(run) == owner  # held (by a live process: this one)
    mine.release()
    assert not (run / CLAIM_FILE).exists()
    # a claim left by a process that died: taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / CLAIM_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "1"}))
    taken = claim_run(run)
    assert isinstance(taken, Claim) and json.loads((run / CLAIM_FILE).read_text())["pid"] == os.getpid()
    taken.release()
    # another host's claim: held while its heartbeat goes on
    (run / CLAIM_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert claim_run(run) == {"host": "elsewhere", "pid": 1}
    os.utime(run / CLAIM_FILE, (0, 0))  # no heartbeat for decades
    stale = claim_run(run)
    assert isinstance(stale, Claim)
    stale.release()


def test_two_only_jobs_at_once_give_the_csv_of_one_job(server_federation, tmp_path):
    """Two jobs started together on one sweep directory, each with its --only, the seed
    shared (one trains it, the other waits): the CSV of one job that runs everything (that
    one with --devices cpu,cpu: its runs placed round robin, as their records say)."""
    recipe = _tiny_recipe(tmp_path)
    common = ["sweep", str(recipe), "--federation", str(server_federation), *sets(*FAST)]
    shared = tmp_path / "shared"
    env = {**os.environ, "FEDASR_PROGRESS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "fedasr.cli", *common, "--out", str(shared), "--only", only],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for only in ("dense", "fp@0.5")]
    outs = [j.communicate(timeout=900) for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    assert sum("waiting (trained by" in err for _, err in outs) == 1  # the other job waited for the seed
    assert (shared / "seed" / "log.txt").read_text().count("$ fedasr train") == 1
    assert not list(shared.glob("**/.claim"))  # every claim released
    assert run_cli("report", shared).returncode == 0
    one = tmp_path / "one"
    r = run_cli(*common, "--out", one, "--devices", "cpu", "--devices", "cpu", timeout=900)
    assert r.returncode == 0, r.stderr
    a, b = (list(csv.DictReader((d / "wer_vs_sparsity.csv").open())) for d in (shared, one))
    assert [row["scheme"] for row in a] == [row["scheme"] for row in b] == ["seed", "dense", "fp"]
    for x, y in zip(a, b):  # comm_bytes: a reply carries its client's timing as text (a few bytes)
        assert {k: v for k, v in x.items() if k != "comm_bytes"} == {k: v for k, v in y.items() if k != "comm_bytes"}
        assert abs(int(x["comm_bytes"]) - int(y["comm_bytes"])) <= 64
    # round robin over the two devices, in the plan's order: seed, dense, fp
    placed = [json.loads((one / d / "sweep.json").read_text()) for d in ("seed", "runs/dense", "runs/fp/s0.50")]
    assert [(p["device"], p["device_slot"]) for p in placed] == [("cpu", 0), ("cpu", 1), ("cpu", 0)]
    assert [RunDir(one / d).read_config()["device"] for d in ("seed", "runs/dense", "runs/fp/s0.50")] == ["cpu"] * 3
