"""The load-adaptive policy (ats_deploy/serving/policy.py) on a simulated clock: arrivals and a latency model in,
keep out. No server, no wall clock: every figure below follows from the latency model the test gives."""

from __future__ import annotations

import numpy as np
import pytest

from ats_deploy.serving.policy import LatencyModel, RateMeter, Rung, Settings, SlackFit, pareto_ladder, uniform_ladder

# A CPU-like device: batch b at keep k takes (2 ms + 10 ms * b) * k (in seconds below).
KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
SLO_S = 0.1
MAX_BATCH = 8


def device(keeps=KEEPS) -> LatencyModel:
    return LatencyModel([{b: (0.002 + 0.010 * b) * k for b in (1, 2, 4, 8)} for k in keeps])


def policy(keeps=KEEPS) -> SlackFit:
    return SlackFit([Rung((k,) * 3) for k in keeps], device(keeps), Settings(SLO_S, MAX_BATCH))


def capacity(keep: float) -> float:
    """Requests per second at the largest batch: 8 / ((2 + 80) ms * keep)."""
    return MAX_BATCH / ((0.002 + 0.010 * MAX_BATCH) * keep)


def simulate(slack: SlackFit, arrivals: np.ndarray, after: float = 0.0) -> dict[str, np.ndarray]:
    """Serve ``arrivals`` with one model instance whose batches take exactly what the latency model says.

    ``after``: seconds from a batch's end until its answers reach the clients (sending them, the hops back), time
    the scheduler spends before its next batch too; the simulated front reports it as the overhead it observed.
    Returns per request its latency (NaN: refused or dropped) and the rung it ran at (-1: not run), and the
    rung and start time of every batch.
    """
    latency = np.full(len(arrivals), np.nan)
    rungs = np.full(len(arrivals), -1)
    meter = RateMeter()
    waiting: list[int] = []
    batches: list[tuple[float, int]] = []
    clock, busy_until, next_arrival = 0.0, 0.0, 0

    def arrive(until: float) -> None:
        nonlocal next_arrival
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= until:
            when = arrivals[next_arrival]
            meter.add(when)
            if slack.admit(when, len(waiting), busy_until):
                waiting.append(next_arrival)
            next_arrival += 1

    while next_arrival < len(arrivals) or waiting:
        if not waiting:
            clock = max(clock, arrivals[next_arrival])
        arrive(clock)
        if not waiting:
            continue
        decision = slack.decide(clock, [arrivals[i] for i in waiting], meter.rate(clock))
        del waiting[:decision.expired]
        batch, waiting[:] = waiting[:decision.batch], waiting[decision.batch:]
        if not batch:
            continue
        took = slack.latency.measured(decision.rung, len(batch))
        busy_until = clock + took
        arrive(busy_until + after - 1e-12)
        batches.append((clock, decision.rung))
        clock = busy_until + after
        slack.latency.observe(decision.rung, len(batch), took)
        slack.observe_overhead(after)
        latency[batch] = clock - arrivals[batch]
        rungs[batch] = decision.rung
    starts, levels = (np.array(v) for v in zip(*batches, strict=True)) if batches else (np.array([]),) * 2
    return {"latency": latency, "rung": rungs, "starts": starts, "levels": levels}


def steady(rate: float, seconds: float, start: float = 0.0) -> np.ndarray:
    """Arrivals evenly spaced at ``rate`` per second: a constant load."""
    return start + np.arange(int(rate * seconds)) / rate


def poisson(rate: float, seconds: float, start: float = 0.0, seed: int = 0) -> np.ndarray:
    gaps = np.random.default_rng(seed).exponential(1 / rate, int(rate * seconds * 2) + 10)
    times = np.cumsum(gaps)
    return start + times[times < seconds]


def test_light_load_runs_at_full_keep_and_meets_the_slo():
    result = simulate(policy(), poisson(0.5 * capacity(1.0), 20))
    assert (result["rung"] == 0).all()
    assert np.nanmax(result["latency"]) <= SLO_S


def test_overload_of_full_keep_is_absorbed_by_lower_keep_within_the_slo():
    rate = 1.3 * capacity(1.0)  # above what keep 1.0 serves, below what keep 0.5 serves
    assert rate < capacity(0.5)
    result = simulate(policy(), poisson(rate, 20))
    assert not np.isnan(result["latency"]).any()  # nothing refused or dropped
    assert result["latency"].max() <= SLO_S
    assert 0 < result["rung"].mean() < len(KEEPS) - 1  # lower than full, not all the way down


def test_fixed_full_keep_misses_the_slo_under_the_same_overload():
    """The control: the same trace on a one-rung ladder (keep 1.0 only) cannot meet the SLO."""
    result = simulate(policy(keeps=(1.0,)), poisson(1.3 * capacity(1.0), 20))
    met = np.nan_to_num(result["latency"], nan=np.inf) <= SLO_S
    assert met.mean() < 0.9


def test_never_below_the_floor_and_sheds_beyond_it_at_once():
    keeps = (1.0, 0.9, 0.8)  # floor 0.8
    slack = policy(keeps)
    result = simulate(slack, poisson(2.0 * capacity(0.8), 10))
    assert result["rung"].max() <= len(keeps) - 1
    refused = np.isnan(result["latency"])
    assert refused.any()  # over what the floor serves: some are refused
    assert np.nanmax(result["latency"]) <= SLO_S  # and those served still meet the SLO


def test_admission_refuses_only_what_cannot_finish_at_the_floor():
    slack = policy()
    alone = slack.latency.seconds(slack.floor, 1)
    assert slack.admit(0.0, 0, busy_until=0.0)
    assert slack.admit(0.0, 0, busy_until=SLO_S - alone)  # just fits behind the running batch
    assert not slack.admit(0.0, 0, busy_until=SLO_S - alone + 1e-3)
    assert not slack.admit(0.0, 1000, busy_until=0.0)


def test_answers_leave_room_for_the_time_spent_after_the_model():
    """Each batch's answers reach their clients 8 ms after the model ends. Overloaded at the floor, a policy that
    planned the model's end to the full SLO would answer its oldest requests up to 8 ms late; planned to the SLO
    less the overhead it observed, none is late and most are still served."""
    after = 0.008
    result = simulate(policy(), poisson(capacity(0.5), 10), after=after)  # with the 8 ms, beyond the floor's capacity
    served = ~np.isnan(result["latency"])
    assert result["latency"][served].max() <= SLO_S
    assert served.mean() > 0.5
    assert (result["rung"][served] == len(KEEPS) - 1).mean() > 0.9  # overloaded: at the floor


def test_admission_and_drops_leave_room_for_the_observed_overhead():
    slack = policy()
    alone = slack.latency.seconds(slack.floor, 1)
    for _ in range(100):
        slack.observe_overhead(0.01)
    assert slack.overhead_s == pytest.approx(0.01)
    assert slack.admit(0.0, 0, busy_until=SLO_S - 0.01 - alone)  # can still make it: admitted, not shed
    assert not slack.admit(0.0, 0, busy_until=SLO_S - 0.01 - alone + 1e-3)  # fits the SLO, not its answer's way
    decision = slack.decide(1.0, [1.0 - SLO_S + 0.01 + alone - 1e-3, 1.0], rate=2.0)
    assert decision.expired == 1 and decision.batch == 1  # could end its model run in time, not its answer


def test_the_time_between_model_runs_counts_against_the_rate_kept_up_with():
    """With 10 ms outside the model per batch, keep 1.0 no longer keeps up with 0.9x its capacity: a cheaper rung."""
    rate = 0.9 * capacity(1.0)
    plain, observed = policy(), policy()
    for _ in range(10):
        observed.observe_overhead(0.01)
    assert plain.decide(0.0, [0.0], rate).rung == 0
    assert observed.decide(0.0, [0.0], rate).rung > 0


def test_one_stall_after_the_model_does_not_make_the_policy_shed_everything():
    slack = policy()
    for _ in range(20):
        slack.observe_overhead(0.002)
    slack.observe_overhead(10.0)  # a 10 s stall of the machine while answering
    assert slack.overhead_s <= 0.1 * SLO_S
    assert slack.admit(0.0, 3, busy_until=0.02)


def test_constant_load_settles_without_oscillation():
    result = simulate(policy(), steady(1.2 * capacity(1.0), 30))
    later = result["levels"][result["starts"] > 10]  # after the first seconds: one level, never changing
    assert len(later) > 100 and len(set(later.tolist())) == 1, sorted(set(later.tolist()))
    assert later[0] > 0


def test_keep_follows_a_step_up_and_returns_to_full():
    low, high = 0.5 * capacity(1.0), 1.3 * capacity(1.0)
    trace = np.concatenate([steady(low, 10), steady(high, 10, 10), steady(low, 10, 20)])
    result = simulate(policy(), trace)
    starts, levels = result["starts"], result["levels"]
    assert (levels[starts < 10] == 0).all()
    assert levels[(starts > 12) & (starts < 20)].min() > 0  # lowered under the high load
    assert (levels[starts > 25] == 0).all()  # back to full keep once the load fell
    assert np.nanmax(result["latency"]) <= SLO_S


def test_expired_requests_are_dropped_before_the_batch():
    slack = policy()
    decision = slack.decide(1.0, [0.0, 0.5, 0.99], rate=3.0)  # the first two are past their SLO
    assert decision.expired == 2 and decision.batch == 1


def test_latency_model_interpolates_extrapolates_and_corrects():
    model = LatencyModel([{1: 0.01, 4: 0.04}])
    assert model.seconds(0, 2) == pytest.approx(0.02)
    assert model.seconds(0, 8) == pytest.approx(0.08)
    for _ in range(200):
        model.observe(0, 4, 0.08)  # the device became twice as slow
    assert model.seconds(0, 4) == pytest.approx(0.08, rel=1e-3)
    assert LatencyModel.from_dict(model.to_dict()).measured(0, 2) == pytest.approx(0.02)


def test_rate_meter_counts_the_last_window():
    meter = RateMeter(window_s=1.0)
    for t in np.arange(0, 2, 0.01):
        meter.add(float(t))
    assert meter.rate(1.995) == pytest.approx(100, abs=1)
    assert meter.rate(5.0) == 0


def test_uniform_ladder_runs_from_the_profile_keep_to_the_floor():
    assert [r.keep[0] for r in uniform_ladder([1.0, 1.0], 0.5)] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert [r.label for r in uniform_ladder([0.6], 0.45)] == ["0.6", "0.5", "0.45"]
    assert len(uniform_ladder([0.5], 0.5)) == 1  # the floor is the profile's keep: nothing to move along


def test_pareto_ladder_keeps_the_most_accurate_setting_at_each_cost():
    top = Rung((1.0,), 0.75)
    measured = [(top, 0.020), (Rung((0.9,), 0.74), 0.018), (Rung((0.8,), 0.70), 0.017),
                (Rung((0.85,), 0.73), 0.016), (Rung((0.6,), 0.69), 0.012), (Rung((0.5,), 0.60), 0.010)]
    ladder = pareto_ladder(top, measured, floor_accuracy=None, min_keep=None)
    assert [r.keep[0] for r in ladder] == [1.0, 0.9, 0.85, 0.6, 0.5]  # 0.8: slower and worse than 0.85
    assert [r.keep[0] for r in pareto_ladder(top, measured, 0.65, None)] == [1.0, 0.9, 0.85, 0.6]
    assert [r.keep[0] for r in pareto_ladder(top, measured, None, 0.8)] == [1.0, 0.9, 0.85]


def test_after_a_quiet_spell_the_next_request_runs_at_full_keep():
    slack = policy()
    for t in np.arange(0, 1, 0.001):  # a burst drives the level down
        slack.decide(float(t), [float(t) - 0.05] * 8, rate=1000)
    assert slack.level > 0
    assert slack.decide(10.0, [10.0], rate=1).rung == 0  # seconds later, one request: full keep at once


def test_a_model_that_says_nothing_can_be_served_in_time_still_serves_lone_requests_and_learns():
    """A start-up measurement taken in a stall (10x too slow) must not refuse every request forever."""
    slow = LatencyModel([{b: 10 * (0.002 + 0.010 * b) * k for b in (1, 2, 4, 8)} for k in KEEPS])
    slack = SlackFit([Rung((k,) * 3) for k in KEEPS], slow, Settings(SLO_S, MAX_BATCH))
    assert slack.admit(0.0, 0, busy_until=0.0)
    assert slack.decide(0.0, [0.0], rate=1).batch == 1  # served, not dropped
    for _ in range(100):
        slow.observe(slack.floor, 1, device().measured(slack.floor, 1))  # what it really took
    assert slow.seconds(slack.floor, 1) < SLO_S  # the model learnt: the floor fits again


@pytest.mark.parametrize("row", [[0.5, 0.5], [1.0, 1.0], [3.0, 0.7], [0.0, 0.5], [-0.2, 0.5], [1.5, 0.5],
                                 [float("nan"), 0.5], [float("inf"), 0.5], [1e-6, 1.0], [200.0, 1.0]])
def test_the_front_model_judges_keep_rows_as_the_served_model_does(row):
    """The front model re-states the keep rule (docs/ATS.md section 2) in numpy, since it runs in a Triton container
    without ats-deploy; it must refuse exactly the rows the model behind it refuses (ats_deploy.keep.Keep)."""
    from ats_deploy.serving.front_model import request_problem
    from ats_deploy.serving.python_model import keep_problem

    keep = np.array([row], dtype=np.float32)
    images = np.zeros((1, 3, 8, 8), dtype=np.float32)
    assert (request_problem(images, keep) is None) == (keep_problem(keep, 1) is None), row


def test_an_earlier_arrival_at_the_server_gives_an_earlier_deadline():
    """The guard's stamp puts a request's arrival before the front model saw it: admission counts from there."""
    slack = policy()
    alone = slack.latency.seconds(slack.floor, 1)
    busy_until = 0.1 + SLO_S - alone - 0.005  # seen at 0.1 s: fits if it arrived then, not 10 ms before
    assert slack.admit(0.1, 0, busy_until)
    assert slack.admit(0.1, 0, busy_until, arrival=0.1)
    assert not slack.admit(0.1, 0, busy_until, arrival=0.09)


def test_the_front_model_takes_the_guards_stamp_as_the_arrival_and_its_own_time_without_one():
    import json

    from ats_deploy.serving.front_model import RECEIVED, arrival

    now = 100.0
    assert arrival(json.dumps({RECEIVED: 99_950_000_000}), now, SLO_S) == pytest.approx(99.95)
    for parameters in ("", "{}", json.dumps({"binary_data_output": True}), json.dumps({RECEIVED: "99"}), "[1]"):
        assert arrival(parameters, now, SLO_S) == now  # no stamp (Triton without the guard): when the front got it
    assert arrival(json.dumps({RECEIVED: 200_000_000_000}), now, SLO_S) == now  # never after it was seen
    assert arrival(json.dumps({RECEIVED: 1}), now, SLO_S) == now - SLO_S  # a forged age only expires its own request
