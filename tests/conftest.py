"""Shared fixtures: one small synthetic corpus and its federation, built once per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")

# A model small enough for exhaustive checks (model, decoding tests).
MICRO_MODEL = dict(num_features=20, vocab_size=7, d_model=16, num_layers=1, num_heads=2, ffn_dim=24,
                   conv_kernel=5, subsampling_channels=4, dropout=0.0, pred_embed_dim=8, pred_hidden=12,
                   pred_layers=2, joint_dim=10)


def tiny_model(seed: int | None = 0, *, preset: str | None = None, **overrides):
    """The tests' model builder: :data:`MICRO_MODEL` with ``overrides`` (or the named
    ``preset`` with them), built right after ``torch.manual_seed(seed)`` (None: as the
    global generator stands)."""
    import torch

    from fedasr.model.transducer import ModelConfig, Transducer

    if seed is not None:
        torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, **overrides) if preset else ModelConfig.from_dict({**MICRO_MODEL, **overrides})
    return Transducer(cfg)


def tiny_batch(feat_lens, target_lens, *, seed: int = 0, frames: int | None = None, tokens: int | None = None,
               num_features: int = MICRO_MODEL["num_features"], vocab: int = MICRO_MODEL["vocab_size"],
               feats=None, targets=None, targets_first: bool = False, pad_targets: bool = False, ids=None):
    """The tests' batch builder: a :class:`~fedasr.data.batching.Batch` of random features
    (B, ``frames`` [max of ``feat_lens``], ``num_features``) and random tokens in
    [1, ``vocab``) (B, ``tokens`` [max of ``target_lens``]), both drawn from one generator
    seeded ``seed``: features first (``targets_first``: tokens first). ``feats``/``targets``
    given are used as they are (not drawn); ``pad_targets``: zeros past each target length."""
    import torch

    from fedasr.data.batching import Batch

    feat_lens = torch.as_tensor(feat_lens, dtype=torch.long)
    target_lens = torch.as_tensor(target_lens, dtype=torch.long)
    B = len(feat_lens)
    g = torch.Generator().manual_seed(seed)
    frames = int(feat_lens.max()) if frames is None else frames
    tokens = int(target_lens.max()) if tokens is None else tokens

    def draw_targets():
        t = torch.randint(1, vocab, (B, tokens), generator=g)
        if pad_targets:
            t[torch.arange(tokens) >= target_lens.view(B, 1)] = 0
        return t

    if targets is None and targets_first:
        targets = draw_targets()
    if feats is None:
        feats = torch.randn(B, frames, num_features, generator=g)
    if targets is None:
        targets = draw_targets()
    return Batch([str(i) for i in range(B)] if ids is None else list(ids), [""] * B, feats, feat_lens, targets,
                 target_lens)


# The one fast training config of the tests: a 1-layer d=64 model, 2 clients x 2 steps a round.
FAST_MODEL = ("model.overrides={num_layers: 1, d_model: 64, ffn_dim: 128, pred_hidden: 64, pred_embed_dim: 64, "
              "joint_dim: 64}")
FAST = ["fl.clients_per_round=2", "fl.local_steps=2", "train.max_duration=20", "eval.dev_max_utterances=4",
        "train.warmup_steps=5", FAST_MODEL]


def sets(*settings: str) -> list[str]:
    """``--set`` arguments for the CLI."""
    return [a for s in settings for a in ("--set", s)]


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run the real `fedasr` CLI in a subprocess; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "fedasr.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=None if env is None else {**os.environ, **env})


class Stopped(Exception):
    """Raised by :class:`StopAfterRound` once round N is checkpointed."""


class StopAfterRound:
    """Runner events that stop a run right after round ``n`` (its checkpoint is written),
    as a crash would; `Runner.resume` then continues it."""

    def __init__(self, n: int):
        self.n = n

    def round_start(self, rnd, clients):
        pass

    def client_done(self, client, ok):
        pass

    def round_end(self, row):
        if row["round"] == self.n:
            raise Stopped


def interrupted_then_resumed(run_dir, fed, cfg, n: int):
    """A run stopped after round ``n`` and resumed to the end; returns the resumed Runner."""
    from fedasr.fl.runner import Runner

    half = Runner(run_dir, fed, cfg, events=StopAfterRound(n))
    half.start()
    with pytest.raises(Stopped):
        half.run_rounds()
    resumed = Runner.resume(run_dir)
    assert resumed.round == n
    resumed.run_rounds()
    return resumed


E2E_FIXTURES = {"corpus", "federation", "server_federation"}


def pytest_collection_modifyitems(config, items):
    """Tests on the synthetic TTS corpus (its fixtures) are end-to-end: marked ``e2e``;
    `make test-fast` deselects them. CLI-subprocess tests without the corpus are marked
    in their modules."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: extra intra-op threads only contend on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """4 training speakers x 12 utterances (+dev/test), 1 unseen test-other speaker, and
    2 server speakers x 12 utterances (train-server: the other splits do not change)."""
    from fedasr.data import synth  # (here: the model tests' helpers import without the data stack)

    root = tmp_path_factory.mktemp("corpus")
    plan = synth.plan_corpus(speakers=4, utterances_per_speaker=12, seed=7, domain="small",
                             test_other_speakers=1, dev_per_speaker=2, test_per_speaker=2, server_speakers=2)
    synth.synthesize_corpus(root, plan, jobs=2)
    return root / "LibriSpeech"


@pytest.fixture(scope="session")
def federation(corpus, tmp_path_factory) -> Path:
    from fedasr.data.federation import ShardOptions, shard

    out = tmp_path_factory.mktemp("fed") / "federation"
    shard(ShardOptions(corpus=corpus, train_splits=["train"], dev_splits=["dev"],
                       test_splits=["test-clean", "test-other"], out=out, vocab_size=48, jobs=2))
    return out


@pytest.fixture(scope="session")
def server_federation(corpus, tmp_path_factory) -> Path:
    """The same clients, plus the server's own data (train-server): never a client."""
    from fedasr.data.federation import ShardOptions, shard

    out = tmp_path_factory.mktemp("fed") / "server_federation"
    shard(ShardOptions(corpus=corpus, train_splits=["train"], dev_splits=["dev"],
                       test_splits=["test-clean", "test-other"], server_splits=["train-server"], out=out,
                       vocab_size=48, jobs=2))
    return out
