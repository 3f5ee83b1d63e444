"""The hook contract of :mod:`fedasr.methods.base`, checked for every registered pruning
method (a method registered later is picked up by the parametrisation): a few federated
rounds of a micro model, driven in the order the engines call the hooks, with every
message through :mod:`fedasr.codec` as it travels; and a restore from ``state_dict`` at
every round boundary, which must give the same round."""

import copy
import io
import json

import pytest
import torch

from conftest import tiny_batch, tiny_model
from fedasr import codec
from fedasr.config import load_config
from fedasr.methods import make_method, method_config
from fedasr.methods.base import ClientHooks, Instructions, MethodUpdate, PruningMethod, Report, RoundContext, registry
from fedasr.trainer import train_step

pytestmark = pytest.mark.usefixtures("single_thread")

ROUNDS = 4
CLIENTS = {"a": 3.0, "b": 1.0}  # client -> aggregation weight
# Settings that make a method act within ROUNDS rounds of a micro model (report gradients,
# select among candidates, adjust masks, shrink); a method without an entry runs on its defaults.
SETTINGS = {
    "federated_pruning": ["pruning.federated_pruning.importance=gradient"],
    "fedtiny": ["pruning.fedtiny.candidates=2", "pruning.fedtiny.phase_batches=1", "pruning.fedtiny.update_every=1"],
    "asp": ["pruning.asp.k=0.5"],
    "feddst": ["pruning.feddst.alpha=0.5", "pruning.feddst.update_every=1", "pruning.feddst.end_round=4"],
    "prunefl": ["pruning.prunefl.reconfig_every=1", "pruning.prunefl.init_batches=1"],
    "snip": ["pruning.snip.batches=2"],
    "synflow": ["pruning.synflow.iterations=3"],
}


def run_config(name):
    return load_config(None, [f"pruning.method={name}", "pruning.target_sparsity=0.5", "train.lr=0.01",
                              *SETTINGS.get(name, [])])


def client_batches(client):
    seed = sorted(CLIENTS).index(client)
    return [tiny_batch([40, 33, 26], [4, 3, 2], seed=10 * seed + i) for i in range(2)]


def server_batches():
    """The server's own data (methods that score weights on it read ``ctx.server_batches``)."""
    return iter([tiny_batch([36, 29], [3, 4], seed=90 + i) for i in range(2)])


def wire(tensors, masks, meta):
    """A message as a receiver sees it (encoded and decoded): masked tensors come back
    zero at pruned positions, meta as JSON."""
    out, got_masks, got_meta = codec.decode_message(codec.encode(tensors, masks, meta))
    return out, got_masks, got_meta


def check_masks(masks, method, model, what):
    params = dict(model.named_parameters())
    assert isinstance(masks, dict), what
    for n, m in masks.items():
        assert n in method.names, f"{what}: {n} is not a prunable parameter"
        assert m.dtype == torch.bool and tuple(m.shape) == tuple(params[n].shape), f"{what}: {n}"


def check_update(upd, method, model, what):
    assert isinstance(upd, MethodUpdate), what
    check_masks(upd.masks, method, model, what)
    state = model.state_dict()
    for n, r in upd.reset.items():
        assert r.dtype == torch.bool and tuple(r.shape) == tuple(state[n].shape), f"{what}: reset {n}"
    json.dumps(upd.metrics)  # goes into the round's metrics row
    if upd.keep:
        fams = {f.name: f for f in model.group_table()}
        for fam, k in upd.keep.items():
            assert fam in fams and k.dtype == torch.bool and k.shape == (fams[fam].num_units,), f"{what}: keep {fam}"
            assert bool(k.any()), f"{what}: {fam} keeps no unit"


class Server:
    """The server's side of the rounds: the dense master model and the masks."""

    def __init__(self, model, masks):
        self.model, self.masks = model, masks

    def ctx(self, rnd):
        return RoundContext(rnd=rnd, total_rounds=ROUNDS, weights=dict(self.model.state_dict()), masks=self.masks,
                            model=self.model, server_batches=server_batches)

    @torch.no_grad()
    def apply(self, upd):
        self.masks = upd.masks
        state = self.model.state_dict()
        for n, pos in upd.reset.items():
            state[n][pos] = 0.0
        if upd.keep:
            from fedasr.model.compact import CompactionPlan

            plan = CompactionPlan(self.model, upd.keep)
            self.model = plan.build()
            self.masks = {n: m for n, m in plan.apply(self.masks).items() if not bool(m.all())}

    def copy(self):
        return Server(copy.deepcopy(self.model), {n: m.clone() for n, m in self.masks.items()})


def down(server, instructions, masks):
    """What a client receives: the weights (x masks) and the instructions."""
    t = {f"w/{k}": v for k, v in server.model.state_dict().items()}
    t.update({f"i/{k}": v for k, v in instructions.tensors.items()})
    tensors, got_masks, meta = wire(t, {f"w/{k}": m for k, m in masks.items()}, {"instructions": instructions.meta})
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
    instr = Instructions({k[2:]: v for k, v in tensors.items() if k.startswith("i/")}, meta["instructions"])
    return weights, {k[2:]: m for k, m in got_masks.items()}, instr


def up(report):
    assert isinstance(report, Report)
    tensors, _, meta = wire(report.tensors, {}, {"report": report.meta})
    return Report(tensors, meta["report"])


def one_round(method, server, rnd, cfg, trace):
    """Round ``rnd`` in the engines' order; every message and update goes into ``trace``."""
    phases = method.phases(rnd)
    assert isinstance(phases, list) and all(isinstance(p, str) for p in phases)
    for phase in phases:
        ctx = server.ctx(rnd)
        instructions, masks = method.phase_instructions(phase, ctx)
        assert isinstance(instructions, Instructions), phase
        if masks is not None:
            check_masks(masks, method, server.model, f"phase {phase} masks")
        agg = method.phase_aggregator(phase, ctx)
        for client, weight in CLIENTS.items():
            weights, got, instr = down(server, instructions, server.masks if masks is None else masks)
            model = copy.deepcopy(server.model)
            batches = client_batches(client)
            report = up(method.client_phase(phase, model, weights, got, lambda: iter(batches), instr))
            trace.append((phase, client, report.tensors, report.meta))
            agg.add(report, weight)
        upd = method.end_phase(phase, server.ctx(rnd), agg)
        check_update(upd, method, server.model, f"end_phase {phase}")
        trace.append((phase, upd.masks, upd.reset, upd.keep, upd.metrics))
        server.apply(upd)

    ctx = server.ctx(rnd)
    instructions = method.configure(ctx)
    assert isinstance(instructions, Instructions)
    agg = method.report_aggregator(ctx)
    deltas = {}
    for client, weight in CLIENTS.items():
        weights, masks, instr = down(server, instructions, server.masks)
        model = copy.deepcopy(server.model)
        model.load_state_dict(weights)
        hooks = method.client_hooks(masks, instr)
        assert isinstance(hooks, ClientHooks)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
        for i, batch in enumerate(client_batches(client)):
            train_step(model, opt, batch, cfg.train, i, after_backward=hooks.after_backward,
                       after_step=hooks.after_step)
            params = dict(model.named_parameters())
            for n, m in masks.items():
                assert torch.count_nonzero(params[n].detach()[~m]) == 0, f"{n}: a pruned weight moved"
        with torch.no_grad():  # after_step itself zeroes pruned weights, whatever moved them
            for n, m in masks.items():
                params[n].add_(1.0)
            before = {n: p.detach().clone() for n, p in params.items()}
        hooks.after_step(model)
        for n, p in params.items():
            m = masks.get(n)
            if m is None:
                assert torch.equal(p.detach(), before[n]), f"{n}: after_step changed an unmasked tensor"
            else:
                assert torch.count_nonzero(p.detach()[~m]) == 0 and torch.equal(p.detach()[m], before[n][m]), n
        report = up(hooks.report())
        trace.append(("train", client, report.tensors, report.meta))
        agg.add(report, weight)
        sent = hooks.upload_masks()  # the client's update travels under these masks
        check_masks(sent, method, model, "upload masks")
        deltas[client] = {k: v.detach() - weights[k] for k, v in model.state_dict().items() if v.is_floating_point()}
        deltas[client] = {k: d * sent[k] if k in sent else d for k, d in deltas[client].items()}
    with torch.no_grad():  # FedAvg of the clients' updates; pruned positions keep their master values
        total = sum(CLIENTS.values())
        mean = {k: sum(deltas[c][k].double() * w for c, w in CLIENTS.items()) / total for k in deltas["a"]}
        mean = method.aggregate_update(server.ctx(rnd), agg, mean)
        trace.append(("aggregate", mean))
        for k, v in server.model.state_dict().items():
            if v.is_floating_point():
                m = server.masks.get(k)
                new = (v + mean[k]).to(v.dtype)
                v.copy_(new if m is None else torch.where(m, new, v))
    upd = method.update(server.ctx(rnd), agg)
    check_update(upd, method, server.model, f"update of round {rnd}")
    trace.append(("update", upd.masks, upd.reset, upd.keep, upd.metrics))
    server.apply(upd)


def restored(method, cfg, model):
    """A fresh method with ``method``'s state, saved and loaded as checkpoints are."""
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = make_method(cfg.pruning, model, ROUNDS, cfg.seed)
    other.load_state_dict(torch.load(buf, weights_only=True))
    return other


def same(a, b, where="trace"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_registered_method_honours_the_hook_contract(name):
    cfg = run_config(name)
    model = tiny_model()
    method = make_method(cfg.pruning, model, ROUNDS, cfg.seed)
    assert isinstance(method, PruningMethod) and method.name == name
    assert isinstance(type(method).whole_unit_masks(method_config(cfg.pruning)), (str, type(None)))
    params = dict(model.named_parameters())
    assert method.names and set(method.names) <= set(params)
    masks = method.init(Server(model, {}).ctx(1))
    check_masks(masks, method, model, "init")
    if name != "none":
        assert cfg.pruning.target_sparsity > 0  # (a method that prunes at all does so within ROUNDS)
    server = Server(model, masks)
    acted = []
    for rnd in range(1, ROUNDS + 1):
        twin, twin_method = server.copy(), restored(method, cfg, copy.deepcopy(server.model))
        trace, twin_trace = [], []
        one_round(method, server, rnd, cfg, trace)
        one_round(twin_method, twin, rnd, cfg, twin_trace)  # restored at the round's start: the same round
        same(trace, twin_trace, f"round {rnd}")
        same(server.masks, twin.masks, f"round {rnd} masks")
        acted.append(bool(server.masks) or any(e[0] == "update" and e[3] for e in trace))
    if name != "none":
        assert any(acted), f"{name} never pruned in {ROUNDS} rounds: give it SETTINGS that make it act"
