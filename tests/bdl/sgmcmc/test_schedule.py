"""CyclicalSchedule: exact learning rates, phases and cycle ends (Zhang et al. 2020, eq. 1).

All values are closed-form (``lr0 / 2 (cos(pi r) + 1)`` in float64), so the comparisons are to
1e-12 relative; phases, cycle ends and parameter trajectories are compared exactly.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from bdl.sgmcmc import SGHMC, SGLD, CyclicalSchedule

# most tests walk the schedule without optimizer steps, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def make_opt(lr: float = 0.4, **kwargs) -> SGLD:
    return SGLD([nn.Parameter(torch.zeros(3))], lr=lr, num_data=100, **kwargs)


def walk(schedule: CyclicalSchedule, steps: int) -> list[tuple[float, bool, bool, bool]]:
    """(lr, noise flag, is_sampling_step, end_of_cycle) for steps k = 0 .. steps - 1."""
    out = []
    for _ in range(steps):
        group = schedule.optimizer.param_groups[0]
        out.append(
            (group["lr"], group["noise"], schedule.is_sampling_step(), schedule.end_of_cycle())
        )
        schedule.step()
    return out


def test_learning_rates_at_known_steps() -> None:
    # K = 80, M = 4: cycle length c = 20
    schedule = CyclicalSchedule(make_opt(0.4), num_steps=80, num_cycles=4)
    assert schedule.cycle_length == 20
    lrs = [row[0] for row in walk(schedule, 80)]
    half = 0.2
    expected = {
        0: 0.4,
        5: half * (math.cos(math.pi / 4) + 1),
        10: 0.2,
        15: half * (1 - math.cos(math.pi / 4)),
        19: half * (math.cos(19 * math.pi / 20) + 1),
        20: 0.4,
        45: half * (math.cos(math.pi / 4) + 1),
        79: half * (math.cos(19 * math.pi / 20) + 1),
    }
    for k, value in expected.items():
        assert lrs[k] == pytest.approx(value, rel=1e-12), k
    # decreasing within each cycle, reset at each start
    for start in range(0, 80, 20):
        cycle = lrs[start : start + 20]
        assert all(a > b for a, b in zip(cycle, cycle[1:], strict=False))
    assert lrs[19] < 0.01 * 0.4  # ~0 at the end of a cycle: (1 + cos(19 pi / 20)) / 2 = 0.006


def test_phases_and_cycle_ends() -> None:
    schedule = CyclicalSchedule(make_opt(), num_steps=80, num_cycles=4, exploration_fraction=0.75)
    rows = walk(schedule, 80)
    for k, (_, noise, sampling, end) in enumerate(rows):
        r = (k % 20) / 20
        assert sampling == (r >= 0.75) == noise, k  # exploration: no noise
        assert end == (k % 20 == 19), k
    assert [k for k, row in enumerate(rows) if row[3]] == [19, 39, 59, 79]
    assert sum(row[2] for row in rows) == 4 * 5


def test_truncated_last_cycle() -> None:
    # K = 10, M = 3: c = ceil(10 / 3) = 4, cycles [0, 4), [4, 8), [8, 10)
    schedule = CyclicalSchedule(make_opt(), num_steps=10, num_cycles=3, exploration_fraction=0.25)
    ends, left = [], []
    for _k in range(10):
        ends.append(schedule.end_of_cycle())
        left.append(schedule.steps_to_end_of_cycle())
        schedule.step()
    assert [k for k, e in enumerate(ends) if e] == [3, 7, 9]
    assert left == [3, 2, 1, 0, 3, 2, 1, 0, 1, 0]
    assert schedule.cycle == 2 and schedule.step_index == 10


def test_every_group_is_scaled_from_its_own_base_lr() -> None:
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    opt = SGLD([{"params": params[:1]}, {"params": params[1:], "lr": 0.1}], lr=1.0, num_data=10)
    schedule = CyclicalSchedule(opt, num_steps=8, num_cycles=2, exploration_fraction=0.5)  # c = 4
    for _ in range(2):
        schedule.step()  # k = 2: r = 1/2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05], rel=1e-12)
    assert schedule.get_last_lr() == pytest.approx([0.5, 0.05], rel=1e-12)


@pytest.mark.parametrize(("beta", "expected"), [(0.0, True), (1.0, False)])
def test_extreme_exploration_fractions(beta: float, expected: bool) -> None:
    schedule = CyclicalSchedule(make_opt(), num_steps=12, num_cycles=3, exploration_fraction=beta)
    assert {row[1] for row in walk(schedule, 12)} == {expected}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 10, "num_cycles": 0}, "num_cycles"),
        ({"num_steps": 3, "num_cycles": 4}, "num_cycles"),
        ({"num_steps": 10, "exploration_fraction": 1.5}, "exploration_fraction"),
        ({"num_steps": 10, "exploration_fraction": -0.1}, "exploration_fraction"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CyclicalSchedule(make_opt(), **kwargs)


@pytest.mark.parametrize(
    ("num_steps", "num_cycles", "beta"),
    [(80, 4, 0.75), (10, 3, 0.25), (10, 3, 0.5), (8, 2, 0.9), (100, 7, 0.8), (45, 5, 0.8)],
)
def test_sampling_steps_counts_the_noisy_steps_of_each_cycle(
    num_steps: int, num_cycles: int, beta: float
) -> None:
    counts = CyclicalSchedule.sampling_steps(num_steps, num_cycles, beta)
    length = math.ceil(num_steps / num_cycles)
    # brute force: offsets j of each (possibly cut) cycle with j / c >= beta
    expected = [
        sum((k - start) / length >= beta for k in range(start, min(start + length, num_steps)))
        for start in range(0, num_steps, length)
    ]
    assert counts == expected
    if min(counts) > 0:
        schedule = CyclicalSchedule(make_opt(), num_steps, num_cycles, beta)
        rows = walk(schedule, num_steps)
        assert sum(row[2] for row in rows) == sum(counts)


@pytest.mark.parametrize(
    ("num_steps", "num_cycles", "beta"),
    # c = 4 < 1 / (1 - 0.9) and c = 4 < 1 / (1 - 0.8): no cycle samples; c = 15 (first
    # sampling offset 12) with a cut last cycle of 10 steps; c = 4 with a last cycle of 2
    [(8, 2, 0.9), (12, 3, 0.8), (100, 7, 0.8), (10, 3, 0.5)],
)
def test_cycles_without_a_sampling_step_are_refused(
    num_steps: int, num_cycles: int, beta: float
) -> None:
    assert min(CyclicalSchedule.sampling_steps(num_steps, num_cycles, beta)) == 0
    with pytest.raises(ValueError, match="without a sampling step"):
        CyclicalSchedule(make_opt(), num_steps, num_cycles, beta)


def test_state_dict_round_trip() -> None:
    opt = make_opt()
    schedule = CyclicalSchedule(opt, num_steps=40, num_cycles=2)
    for _ in range(13):
        schedule.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "schedule": schedule.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2 = make_opt()
    schedule2 = CyclicalSchedule(opt2, num_steps=40, num_cycles=2)
    opt2.load_state_dict(saved["opt"])
    schedule2.load_state_dict(saved["schedule"])
    assert walk(schedule2, 30) == walk(schedule, 30)


def test_exploration_is_deterministic_and_sampling_is_not() -> None:
    """Two SGHMC chains with different noise seeds under one schedule agree exactly until the
    first sampling step and differ afterwards."""
    nets = []
    for seed in (0, 1):
        torch.manual_seed(0)
        net = nn.Linear(4, 2)
        opt = SGHMC(
            net.parameters(), lr=0.1, num_data=50, generator=torch.Generator().manual_seed(seed)
        )
        schedule = CyclicalSchedule(opt, num_steps=20, num_cycles=2, exploration_fraction=0.5)
        nets.append((net, opt, schedule))
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(5)), torch.randn(16, 2)
    for k in range(20):
        for net, opt, schedule in nets:
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            schedule.step()
        a, b = (torch.cat([p.detach().flatten() for p in n.parameters()]) for n, _, _ in nets)
        assert torch.equal(a, b) == (k < 5), k  # steps 0-4 explore, step 5 samples
