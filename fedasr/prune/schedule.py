"""Sparsity schedules: the target sparsity of the masks used in round r.

- ``constant``: the target from ``start_round`` on (0 before).
- ``step``: from ``start_round``, raised by ``step_size`` every ``step_every`` rounds
  until the target.
- ``cubic``: Zhu & Gupta (2017) over the n = r_1 − r_0 + 1 rounds from ``start_round`` r_0
  to ``end_round`` r_1 (default: 3/4 of the rounds), each a mask step:
  s(r) = s_f + (s_0 − s_f)(1 − (r − r_0 + 1)/n)^p, s_f after; p = ``power`` (3: cubic, 1:
  linear). ``start_round`` is the first round trained with masks (as for the other
  schedules), and the first step is the fraction 1 − (1 − 1/n)^p of the way from s_0 to s_f
  (p = 3: 27% at n = 10, 14% at n = 20; p = 1: 1/n): a gradual schedule needs rounds.

``cfg`` is any object with ``schedule``, ``start_round``, ``end_round``,
``initial_sparsity``, ``step_size``, ``step_every`` and (cubic) ``power`` (a method's config
block).
"""

from __future__ import annotations


def sparsity_at(cfg, target: float, rnd: int, total_rounds: int) -> float:
    s_f = target
    r0 = cfg.start_round
    if rnd < r0:
        return 0.0
    if cfg.schedule == "constant":
        return s_f
    if cfg.schedule == "step":
        return min(s_f, cfg.step_size * (1 + (rnd - r0) // cfg.step_every))
    r1 = cfg.end_round if cfg.end_round is not None else max(r0, (3 * total_rounds) // 4)
    if rnd >= r1:
        return s_f
    frac = (rnd - r0 + 1) / (r1 - r0 + 1)
    return s_f + (cfg.initial_sparsity - s_f) * (1 - frac) ** cfg.power
