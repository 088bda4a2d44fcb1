"""DP-FedAvg (GaussianFixedDP): clipping bounds each client, the noise has std z*S/K, epsilon is dp-accounting's.

Then a small DP run on the digits still learns, and `fedge serve` with the DP flags writes the
epsilon spent into every line of its metrics log (real mosquitto, in-thread device agents).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

import fedge.learning as fl
from device_artifacts import artifact_path
from fedge.learning.evaluation import FederatedEvaluation
from device_runtime.protocol import ClientWork
from fedge.job import JobError
from fedge.learning.process import LearningProcess
from fedge.server.metrics_log import read_metrics_log
from fedge.simulation.datasets import digits
from test_robust_aggregation import inline, process_parts, serve_aggregator  # noqa: F401 (fixtures)
from test_server import broker_url, start_agents, toy_data  # noqa: F401 (fixtures)

SHAPES = [(50, 40), (40,)]


def _noisy(aggregator: fl.GaussianFixedDP, deltas: Sequence[Sequence[np.ndarray]], round_num: int = 0
           ) -> list[np.ndarray]:
    """One round of `aggregator` over `deltas` (each client weight 1)."""
    aggregation = aggregator.start(round_num)
    for delta in deltas:
        aggregation.add(delta, 1.0)
    result = aggregation.result()
    assert result is not None
    return result


def _zeros() -> list[np.ndarray]:
    return [np.zeros(shape, np.float32) for shape in SHAPES]


def _random(seed: int, scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=shape)).astype(np.float32) for shape in SHAPES]


def _norm(delta: Sequence[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(d, np.float64)))) for d in delta))


def test_one_client_moves_the_aggregate_by_its_clipped_delta_over_the_fixed_denominator():
    clip, clients_per_round = 0.7, 10
    dp = fl.GaussianFixedDP(0.5, clients_per_round, clip, seed=3)
    others = [_random(seed, 0.005) for seed in range(3)]  # norm about 0.23: never clipped
    for extra in (_random(9, 5.0), _random(10, 0.01)):  # one far above the clip, one under it
        with_client = _noisy(dp, others + [extra])
        without = _noisy(dp, others + [_zeros()])  # same seed and round: the same noise
        clipped = [d * min(1.0, clip / _norm(extra)) for d in extra]
        for got_with, got_without, c in zip(with_client, without, clipped):
            np.testing.assert_allclose(got_with - got_without, c / clients_per_round, atol=1e-6)
        moved = _norm([a - b for a, b in zip(with_client, without)])
        assert moved <= clip / clients_per_round * (1 + 1e-5)
    # the denominator is K, not the 4 clients that reported: the noise-free part is sum / K
    noise = _noisy(dp, [_zeros()])
    for got, noise_part, *parts in zip(_noisy(dp, others), noise, *others):
        np.testing.assert_allclose(got - noise_part, np.sum(parts, axis=0) / clients_per_round, atol=1e-6)


@pytest.mark.parametrize("noise_multiplier, clip, clients_per_round", [(1.0, 0.5, 10), (0.3, 2.0, 4)])
def test_the_noise_on_the_mean_has_std_z_times_s_over_the_denominator(noise_multiplier, clip, clients_per_round):
    dp = fl.GaussianFixedDP(noise_multiplier, clients_per_round, clip, seed=11)
    samples = np.concatenate([np.concatenate([t.ravel() for t in _noisy(dp, [_zeros()], round_num)])
                              for round_num in range(5)])  # 5 rounds x 2040 coordinates
    expected = noise_multiplier * clip / clients_per_round
    assert samples.std() == pytest.approx(expected, rel=0.03)
    assert abs(samples.mean()) < 4 * expected / math.sqrt(samples.size)
    assert scipy.stats.normaltest(samples).pvalue > 1e-4  # Gaussian
    # seeded: reproducible per (seed, round); rounds differ; unseeded: fresh noise each time
    np.testing.assert_array_equal(_noisy(dp, [_zeros()], 7)[0], _noisy(dp, [_zeros()], 7)[0])
    assert not np.array_equal(_noisy(dp, [_zeros()], 7)[0], _noisy(dp, [_zeros()], 8)[0])
    unseeded = fl.GaussianFixedDP(noise_multiplier, clients_per_round, clip)
    assert not np.array_equal(_noisy(unseeded, [_zeros()])[0], _noisy(unseeded, [_zeros()])[0])


def _library_epsilon(noise_multiplier: float, rounds: int, delta: float, q: float) -> float:
    """The epsilon dp-accounting's RDP accountant gives at its default orders (its integer ones when subsampled)."""
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if q == 1:
        accountant = RdpAccountant()
    else:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant = RdpAccountant([order for order in DEFAULT_RDP_ORDERS if order == int(order)])
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def _pld_epsilon(noise_multiplier: float, rounds: int, delta: float, q: float) -> float:
    """The (tighter) epsilon of dp-accounting's privacy-loss-distribution accountant, an independent method."""
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    accountant = PLDAccountant()
    accountant.compose(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event), rounds)
    return accountant.get_epsilon(delta)


def _exact_gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Exact epsilon of `rounds` Gaussian mechanisms (Balle & Wang 2018: one Gaussian with mu = sqrt(rounds) / z)."""
    mu = math.sqrt(rounds) / noise_multiplier
    norm = scipy.stats.norm

    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return scipy.optimize.brentq(excess, 0.0, 500.0)


@pytest.mark.parametrize("noise_multiplier, rounds, delta, q", [
    (1.0, 10, 1e-5, 1.0), (2.0, 100, 1e-6, 1.0), (1.1, 1000, 1e-5, 0.01), (0.8, 50, 1e-5, 0.1)])
def test_epsilon_is_dp_accountings_rdp_epsilon(noise_multiplier, rounds, delta, q):
    epsilon = fl.dp_epsilon(noise_multiplier, rounds, delta, q)
    assert epsilon == pytest.approx(_library_epsilon(noise_multiplier, rounds, delta, q), rel=1e-9)
    # RDP is an upper bound on the exact epsilon, and not a loose one
    tight = _exact_gaussian_epsilon(noise_multiplier, rounds, delta) if q == 1 else \
        _pld_epsilon(noise_multiplier, rounds, delta, q)
    assert tight < epsilon < 1.3 * tight


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_sampling_and_delta():
    by_rounds = [fl.dp_epsilon(1.0, rounds, 1e-5, 0.1) for rounds in (1, 2, 10, 100, 1000)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 5
    assert fl.dp_epsilon(2.0, 100, 1e-5) < fl.dp_epsilon(1.0, 100, 1e-5)
    assert fl.dp_epsilon(1.0, 100, 1e-5, 0.05) < fl.dp_epsilon(1.0, 100, 1e-5, 0.5) < fl.dp_epsilon(1.0, 100, 1e-5)
    assert fl.dp_epsilon(1.0, 100, 1e-3) < fl.dp_epsilon(1.0, 100, 1e-7)


def test_each_round_reports_the_epsilon_spent_so_far():
    dp = fl.GaussianFixedDP(1.2, 5, 1.0, target_delta=1e-6, sampling_probability=0.25, seed=0)
    for round_num in (0, 4, 19):
        aggregation = dp.start(round_num)
        aggregation.add(_random(1, 3.0), 1.0)
        aggregation.add(_random(2, 0.01), 1.0)
        measurements = aggregation.measurements()
        assert measurements == {"dp_epsilon": _library_epsilon(1.2, round_num + 1, 1e-6, 0.25), "dp_delta": 1e-6,
                                "dp_noise_multiplier": 1.2, "clipping_norm": 1.0, "clipped_clients": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0"),
    ({"noise_multiplier": float("inf")}, "noise_multiplier must be a finite number > 0"),
    ({"clients_per_round": 0}, "clients_per_round must be an integer >= 1"),
    ({"clients_per_round": 2.5}, "clients_per_round must be an integer >= 1"),
    ({"clipping_norm": -1.0}, "clipping_norm must be a finite number > 0"),
    ({"target_delta": 1.0}, "target_delta must be a number in (0, 1)"),
    ({"sampling_probability": 0.0}, "sampling_probability must be a number in (0, 1]"),
    ({"seed": -1}, "seed must be an integer >= 0 or None"),
])
def test_bad_dp_arguments_are_refused_with_their_name(kwargs, message):
    arguments = {"noise_multiplier": 1.0, "clients_per_round": 10, "clipping_norm": 1.0, **kwargs}
    with pytest.raises(ValueError) as error:
        fl.GaussianFixedDP(arguments.pop("noise_multiplier"), arguments.pop("clients_per_round"),
                           arguments.pop("clipping_norm"), **arguments)
    assert message in str(error.value)


def test_fedge_serve_dp_flags():
    dp = serve_aggregator("--clip-norm", "0.5", "--dp-noise-multiplier", "1.1", "--dp-delta", "1e-6",
                          "--dp-population", "100")
    assert isinstance(dp, fl.GaussianFixedDP) and dp.seed is None  # production noise is never seeded
    assert (dp.noise_multiplier, dp.clients_per_round, dp.clipping_norm, dp.target_delta, dp.sampling_probability) \
        == (1.1, 4, 0.5, 1e-6, 0.04)
    assert serve_aggregator("--clip-norm", "1", "--dp-noise-multiplier", "1").sampling_probability == 1
    for flags, message in [
        (["--dp-noise-multiplier", "1"], "needs clip_norm, the bound on each update's norm"),
        (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--aggregator", "median"],
         "cannot be combined with name = 'median'"),
        (["--dp-delta", "1e-6"], "set dp_noise_multiplier too"),
        (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--dp-population", "3"],
         "dp_population (3) cannot be below rounds.clients_per_round (4)"),
    ]:
        with pytest.raises(JobError) as error:
            serve_aggregator(*flags)
        assert message in str(error.value)


def test_a_small_dp_run_on_the_digits_still_learns_and_reports_its_epsilon(process_parts):  # noqa: F811
    artifact, executor = process_parts
    train, test = digits.load_data(num_clients=10, partition="iid", seed=0)
    clients = [train.create_dataset_for_client(c) for c in train.client_ids]
    evaluation = FederatedEvaluation(artifact, executor)
    rounds, accuracy, metrics = 10, {}, {}
    for noise_multiplier in (0.5, 50.0):
        dp = fl.GaussianFixedDP(noise_multiplier, len(clients), 0.5, target_delta=1e-5, seed=0)
        process = LearningProcess(artifact, ClientWork(), fl.ClientWeighting.UNIFORM,
                                  fl.optimizers.SGD(1.0), executor, dp)
        state = process.initialize()
        for _ in range(rounds):
            state, metrics[noise_multiplier] = process.next(state, clients)
        accuracy[noise_multiplier] = evaluation(process.get_model_weights(state), [test])["eval"]["accuracy"]
    epsilon = metrics[0.5]["aggregator"]["dp_epsilon"]
    print(f"\nDP-FedAvg, 10 clients, S 0.5, {rounds} rounds: z 0.5 -> accuracy {accuracy[0.5]:.3f}, "
          f"epsilon {epsilon:.1f} at delta 1e-5; z 50 -> accuracy {accuracy[50.0]:.3f}")
    assert accuracy[0.5] > 0.85  # learns with small noise
    assert accuracy[50.0] < accuracy[0.5] - 0.3  # the noise is really there
    assert epsilon == pytest.approx(_library_epsilon(0.5, rounds, 1e-5, 1.0), rel=1e-9)
    assert metrics[50.0]["aggregator"]["dp_epsilon"] < epsilon / 100


def test_fedge_serve_with_dp_writes_the_epsilon_of_every_round_to_the_metrics_log(
        broker_url, fleet, start_agents, tmp_path):  # noqa: F811 (fixtures)
    from fedge.cli import main

    model = artifact_path("mlp", tmp_path)
    start_agents({f"dev-{i}": toy_data(16, seed=40 + i) for i in range(3)})
    log = tmp_path / "metrics.jsonl"
    code = main(["serve", str(model), "--broker", broker_url, "--fleet", fleet, "--rounds", "3",
                 "--clients-per-round", "2", "--min-reports", "2", "--deadline", "30", "--checkin-timeout", "10",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-log", str(log), "--clip-norm", "0.5",
                 "--dp-noise-multiplier", "1.0", "--dp-population", "3", "--log-level", "WARNING"])
    assert code == 0
    lines = read_metrics_log(log)
    assert [line["round"] for line in lines] == [0, 1, 2]
    epsilons = [line["dp_epsilon"] for line in lines]
    assert epsilons == pytest.approx([_library_epsilon(1.0, r, 1e-5, 2 / 3) for r in (1, 2, 3)], rel=1e-9)
    assert all(line["dp_delta"] == 1e-5 and line["clipping_norm"] == 0.5 for line in lines)
    assert all(line["update_norm"] > 0 for line in lines)
