"""The throughput model behind the adaptive lookahead (``aurora_rl.engine.adaptive``), as pure functions:
expected tokens per verify step from per-depth acceptance, acceptance rates from discounted counts,
step times for every k from the measured ones, and the k with the most expected tokens per second."""

from __future__ import annotations


def expected_tokens(alphas: list[float], k: int) -> float:
    """Expected tokens one verify step emits with lookahead k: 1 + sum_{j<=k} prod_{l<=j} alpha_l."""
    if not 0 <= k <= len(alphas):
        raise ValueError(f"lookahead k={k} must be in [0, {len(alphas)}] (the depths with an acceptance rate)")
    total, reach = 1.0, 1.0
    for a in alphas[:k]:
        reach *= a
        total += reach
    return total


def best_lookahead(alphas: list[float], costs: list[float], min_gain: float = 0.0) -> int:
    """The k in 0..len(costs)-1 with most expected tokens per second, ``costs[k]`` the step time at k.

    The batch size multiplies every k's throughput alike, so it drops out. The smallest k within a
    factor ``1 + min_gain`` of the best wins.
    """
    if not costs or min(costs) <= 0:
        raise ValueError(f"costs must be a non-empty list of positive step times, got {costs}")
    thr = [expected_tokens(alphas, k) / c for k, c in enumerate(costs)]
    best = max(thr)
    return next(k for k, t in enumerate(thr) if t * (1.0 + min_gain) >= best)


def acceptance_rates(proposed: list[float], accepted: list[float], prior: float, prior_weight: float) -> list[float]:
    """Conditional acceptance per depth from (discounted) per-depth counts, shrunk toward a prior.

    ``accepted[j]`` counts depth-(j+1) proposals accepted (all shallower ones were too), so
    ``accepted[j] / proposed[j]`` is the rate of reaching depth j+1; alpha is its ratio to the previous
    depth's rate. Depths without data get the previous depth's alpha.
    """
    alphas, reach, pi = [], 1.0, prior
    for p, a in zip(proposed, accepted):
        alpha = min(max((a + prior_weight * pi) / (p * reach + prior_weight), 0.0), 1.0)
        alphas.append(alpha)
        reach = a / p if p > 0 else reach * alpha
        pi = alpha
    return alphas


def predict_costs(cells: dict[int, tuple[float, float]], max_lookahead: int, prior_slope: float) -> list[float]:
    """Step time for k = 0..K from measured cells {k: (mean seconds, weight)}; unmeasured ks extrapolated."""
    if not cells:
        return [1.0 + prior_slope * k for k in range(max_lookahead + 1)]
    ks = sorted(cells)
    if len(ks) == 1:
        slope = prior_slope * cells[ks[0]][0] / (1.0 + prior_slope * ks[0])
    else:
        w = sum(cells[k][1] for k in ks)
        km = sum(k * cells[k][1] for k in ks) / w
        tm = sum(cells[k][0] * cells[k][1] for k in ks) / w
        var = sum(cells[k][1] * (k - km) ** 2 for k in ks)
        slope = max(0.0, sum(cells[k][1] * (k - km) * (cells[k][0] - tm) for k in ks) / var)
    floor = 0.5 * min(t for t, _ in cells.values())
    out = []
    for k in range(max_lookahead + 1):
        if k in cells:
            out.append(cells[k][0])
            continue
        near = min(ks, key=lambda m: (abs(m - k), m))
        out.append(max(cells[near][0] + slope * (k - near), floor))
    return out


STALL_CAP = 2.0
"""An observed step time counts as at most this many times its cell's mean (``capped_step_time``)."""


def capped_step_time(mean: float, count: float, seconds: float) -> float:
    """What one observed step adds to a cell of mean ``mean`` over ``count`` steps: ``seconds``, or
    ``STALL_CAP`` x the mean if it is longer. A step is only ever slowed by what is not its work (the
    VM stalling, a collection, another process), and one such step is not the budget's cost: a budget-0
    step of 323 ms among 20 ms ones put the tree controller's plain cell at 80 ms, a batch of trees at
    70 ms then looked cheaper than plain decoding, and since budget 0 was no longer chosen its cell was
    never corrected (67 steps at 3-4x the plain step's cost, at batch 8). A real rise (longer contexts,
    more rows in the bucket) is followed within a few steps; falls are taken whole."""
    return min(seconds, STALL_CAP * mean) if count > 0 else seconds


def nearest_bucket(table: dict[int, dict[int, list[float]]], batch: int) -> int | None:
    """The batch's bucket if ``table`` has it, else the nearest one it has (None: an empty table)."""
    b = bucket(batch)
    if b not in table:
        return min(table, key=lambda m: (abs(m - b), m)) if table else None
    return b


def nearest_cells(table: dict[int, dict[int, list[float]]], batch: int) -> dict[int, tuple[float, float]]:
    """{k: (mean seconds, count)} of the batch's bucket, or of the nearest measured one."""
    b = nearest_bucket(table, batch)
    return {k: (m, n) for k, (m, n) in table.get(b, {}).items()} if b is not None else {}


def bucket(batch: int) -> int:
    """Power-of-two batch bucket: 1, 2-3, 4-7, ..."""
    return max(batch, 1).bit_length() - 1
