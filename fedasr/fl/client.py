"""One federated client: local training from the global weights.

A client is a function of (global weights, masks, client data, config, seed) -> (update,
number of examples, metrics); the pruning method's hooks run inside its training loop.
The engine reuses one model instance for every client, so memory does not grow with the
number of clients.
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
from fedasr.model.transducer import Transducer
from fedasr.trainer import BatchStream, make_optimizer, train_steps


def derive_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys (run seed, round, client index, ...)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] >> 1)


@dataclass
class ClientResult:
    client: str
    update: dict[str, torch.Tensor]  # deltas of trainable tensors, values of BN statistics
    num_examples: int  # the client's dataset size n_k (utterances): FedAvg's weight
    metrics: dict = field(default_factory=dict)  # loss, steps, processed (utterances, repeats included), ...


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
    hooks=None,
    num_steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stream: BatchStream | None = None,
) -> ClientResult:
    """``hooks``: the pruning method's client hooks (mask gradients and weights, collect
    what the method reports); ``num_steps`` [default ``fl.local_steps``] or ``fl.local_epochs``;
    ``optimizer``/``stream``: kept across rounds by a persistent client (the centralized
    baseline), else made afresh."""
    model.load_state_dict(global_state)
    torch.manual_seed(seed)  # dropout
    optimizer = optimizer or make_optimizer(model, cfg.train)
    fl = cfg.fl
    steps = num_steps if num_steps is not None else fl.local_steps
    res = train_steps(model, optimizer, dataset, cfg.train, seed=seed, num_steps=steps,
                      num_epochs=fl.local_epochs if steps is None else None, global_step=global_step,
                      after_backward=hooks.after_backward if hooks else None,
                      after_step=hooks.after_step if hooks else None, stream=stream)
    update = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if is_bn_stat(k) or not v.is_floating_point():
            update[k] = v.clone()
        else:
            update[k] = (v - global_state[k]).clone()
    metrics = {"loss": res.loss, "steps": res.steps, "time": res.time, "processed": res.examples,
               **{f"loss_{k}": v for k, v in res.stats.items() if k != "loss"}}
    return ClientResult(name, update, len(dataset), metrics)
