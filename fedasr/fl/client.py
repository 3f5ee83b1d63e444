"""One federated client: local training from the global weights.

A client is a function of (global weights, client data, config, seed) -> (update,
number of examples, metrics). The engine reuses one model instance for every client,
so memory does not grow with the number of clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import torch
from lhotse import CutSet

from fedasr.config import RunConfig
from fedasr.data.batching import AsrDataset
from fedasr.data.features import GlobalCMVN, SpecAugment
from fedasr.data.tokenizer import Tokenizer
from fedasr.fl.server import is_bn_stat
from fedasr.prune.pruner import ClientPruning
from fedasr.model.transducer import Transducer
from fedasr.trainer import make_optimizer, train_steps


def derive_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys (run seed, round, client index, ...)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] >> 1)


@dataclass
class ClientResult:
    client: str
    update: dict[str, torch.Tensor]  # deltas of trainable tensors, values of BN statistics
    num_examples: int  # the client's dataset size n_k (utterances): FedAvg's weight
    metrics: dict = field(default_factory=dict)  # loss, steps, processed (utterances, repeats included), ...
    report: dict[str, torch.Tensor] = field(default_factory=dict)  # pruning extras (e.g. mean |grad|)


def make_dataset(cuts: CutSet, tokenizer: Tokenizer, cmvn: GlobalCMVN, cfg: RunConfig) -> AsrDataset:
    return AsrDataset(cuts, tokenizer, cmvn, SpecAugment() if cfg.train.spec_augment else None)


def train_client(
    name: str,
    model: Transducer,
    global_state: dict[str, torch.Tensor],
    dataset: AsrDataset,
    cfg: RunConfig,
    *,
    seed: int,
    global_step: int,
    pruning: ClientPruning | None = None,
) -> ClientResult:
    model.load_state_dict(global_state)
    torch.manual_seed(seed)  # dropout
    optimizer = make_optimizer(model, cfg.train)
    fl = cfg.fl
    pruning = pruning or ClientPruning({})
    res = train_steps(model, optimizer, dataset, cfg.train, seed=seed, num_steps=fl.local_steps,
                      num_epochs=fl.local_epochs, global_step=global_step,
                      after_backward=pruning.after_backward, after_step=pruning.after_step)
    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    update = {}
    for k, v in local.items():
        if is_bn_stat(k) or not v.is_floating_point():
            update[k] = v.detach().clone()
        else:
            update[k] = (v.detach() - global_state[k]).clone()
    metrics = {"loss": res.loss, "steps": res.steps, "time": res.time, "processed": res.examples,
               **{f"loss_{k}": v for k, v in res.stats.items() if k != "loss"}}
    return ClientResult(name, update, len(dataset), metrics, pruning.report())
