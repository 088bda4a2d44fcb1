"""fedge.learning's federated processes: structure, aggregation, server optimizers, FedProx, determinism, state."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import pytest
import tensorflow as tf

import fedge.learning as fl
from device_runtime import TrainableModel, evaluate_locally
from fedge.learning import optimizers
from device_runtime.artifact import Artifact
from device_runtime.protocol import ClientWork, RoundConfig
from fedge.learning.executors import ClientUpdate, Executor, InProcessExecutor
from fedge.learning.metrics import finalize, sum_then_finalize
from fedge.learning.process import LearningProcess
from fedge.simulation.datasets import ClientDataset

BATCH = 4
SPEC = (tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32))


def _model_fn() -> fl.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])
    return fl.from_keras_model(model, loss="sparse_categorical_crossentropy", input_spec=SPEC, metrics=["accuracy"])


def _clients(sizes: Sequence[int] = (9, 14, 6), seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Learnable synthetic clients: the label is which of three fixed centres an example lies near."""
    rng = np.random.default_rng(seed)
    centres = np.array([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], np.float32)
    clients = []
    for size in sizes:
        y = rng.integers(0, 3, size).astype(np.int32)
        clients.append(((centres[y] + rng.normal(scale=0.7, size=(size, 4))).astype(np.float32), y))
    return clients


def _client_optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(0.2)


@pytest.fixture(scope="module")
def inline() -> Iterator[InProcessExecutor]:
    with InProcessExecutor(num_workers=0) as executor:
        yield executor


@pytest.fixture(scope="module")
def fedavg(inline: InProcessExecutor) -> LearningProcess:
    return fl.build_federated_averaging_process(_model_fn, _client_optimizer, batch_size=BATCH, executor=inline)


@pytest.fixture(scope="module")
def fedprox(inline: InProcessExecutor) -> LearningProcess:
    return fl.build_weighted_fed_prox(_model_fn, 0.0, _client_optimizer, batch_size=BATCH, executor=inline)


def _variant(base: LearningProcess, executor: Executor, weighting: fl.ClientWeighting = fl.ClientWeighting.NUM_EXAMPLES,
             server: optimizers.ServerOptimizer | None = None, seed: int | None = 0,
             **client_work: object) -> LearningProcess:
    """Another process on `base`'s artifact (no second conversion): other client work, weighting, optimizer, seed."""
    return LearningProcess(base.artifact, ClientWork(**client_work), weighting, server or optimizers.SGD(1.0),
                           executor, seed=seed)


def _run(process: LearningProcess, rounds: int, clients: list, state: fl.LearningProcessState | None = None
         ) -> tuple[fl.LearningProcessState, dict]:
    state = process.initialize() if state is None else state
    metrics: dict = {}
    for _ in range(rounds):
        state, metrics = process.next(state, clients)
    return state, metrics


def _assert_same_weights(a: fl.ModelWeights, b: fl.ModelWeights) -> None:
    for x, y in zip(a.to_list(), b.to_list(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_initialize_and_next_give_tff_shaped_state_and_metrics(fedavg: LearningProcess):
    manifest = fedavg.artifact.manifest
    state = fedavg.initialize()
    assert state.round_num == 0 and state.server_optimizer_state == {}
    weights = fedavg.get_model_weights(state)
    assert [w.shape for w in weights.to_list()] == [tuple(spec.shape) for spec in manifest.weights]
    assert len(weights.non_trainable) == 2  # batch norm's moving mean and variance

    clients = _clients()
    state, metrics = fedavg.next(state, clients)
    assert state.round_num == 1
    assert set(metrics) == {"distributor", "client_work", "aggregator", "finalizer"}
    train = metrics["client_work"]["train"]
    assert set(train) == {"loss", "accuracy", "num_examples", "num_batches"}
    assert train["num_examples"] == 29 and train["num_batches"] == 3 + 4 + 2
    assert metrics["aggregator"]["num_clients"] == 3
    assert metrics["aggregator"]["mean_weight"] == pytest.approx(29 / 3)
    weight_bytes = 4 * manifest.num_parameters
    assert 3 * weight_bytes < metrics["distributor"]["bytes_down"] < 3 * (weight_bytes + 2048)
    assert 3 * weight_bytes < metrics["aggregator"]["bytes_up"] < 3 * (weight_bytes + 2048)
    assert metrics["finalizer"]["update_norm"] > 0
    moved = fedavg.get_model_weights(state)
    assert all(not np.array_equal(a, b) for a, b in zip(moved.non_trainable, weights.non_trainable))


def test_loss_falls_over_rounds(fedavg: LearningProcess):
    clients = _clients((20, 31, 17))
    state = fedavg.initialize()
    losses = []
    for _ in range(6):
        state, metrics = fedavg.next(state, clients)
        losses.append(metrics["client_work"]["train"]["loss"])
    assert losses[-1] < 0.6 * losses[0]
    assert metrics["client_work"]["train"]["accuracy"] > 0.8


def test_example_and_uniform_weighting_average_single_client_deltas(fedavg: LearningProcess, inline: Executor):
    clients = _clients((5, 23))
    by_examples = _variant(fedavg, inline, seed=None)  # no shuffling: a client trains alike at any index
    uniform = _variant(fedavg, inline, fl.ClientWeighting.UNIFORM, seed=None)
    start = by_examples.initialize()
    base = [w.astype(np.float64) for w in by_examples.get_model_weights(start).to_list()]
    deltas = [[a - b for a, b in zip(by_examples.next(start, [client])[0].global_model_weights.to_list(), base)]
              for client in clients]
    for process, weights in ((by_examples, (5, 23)), (uniform, (1, 1))):
        state, metrics = process.next(start, clients)
        expected = [b + (weights[0] * d0 + weights[1] * d1) / sum(weights) for b, d0, d1 in zip(base, *deltas)]
        for got, want in zip(process.get_model_weights(state).to_list(), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
        assert metrics["aggregator"]["mean_weight"] == pytest.approx(sum(weights) / 2)
    assert not np.allclose(_run(by_examples, 1, clients)[0].global_model_weights.trainable[0],
                           _run(uniform, 1, clients)[0].global_model_weights.trainable[0])


def test_a_client_without_examples_is_counted_and_changes_nothing(fedavg: LearningProcess, inline: Executor):
    clients = _clients()
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32))
    for process in (fedavg, _variant(fedavg, inline, fl.ClientWeighting.UNIFORM)):
        with_empty, metrics = _run(process, 1, [*clients, empty])
        _assert_same_weights(with_empty.global_model_weights, _run(process, 1, clients)[0].global_model_weights)
        assert metrics["aggregator"]["num_clients"] == 4
    only_empty, metrics = _run(fedavg, 1, [empty])
    _assert_same_weights(only_empty.global_model_weights, fedavg.initialize().global_model_weights)
    assert metrics["client_work"]["train"]["num_examples"] == 0 and metrics["finalizer"]["update_norm"] == 0


# ---------------------------------------------------------------------------- server optimizers

W, D1, D2 = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.1], np.float32), np.array([-0.2, 0.3], np.float32)


def _steps(optimizer: optimizers.ServerOptimizer) -> list[np.ndarray]:
    """Weights after two server steps with deltas D1 then D2 from W."""
    state, weights = optimizer.initialize([W]), [W]
    history = []
    for delta in (D1, D2):
        state, weights = optimizer.apply(state, weights, [delta])
        history.append(weights[0])
    return history


def test_sgd_and_momentum_server_steps():
    plain = _steps(optimizers.SGD(0.5))
    np.testing.assert_allclose(plain, [W + 0.5 * D1, W + 0.5 * D1 + 0.5 * D2], rtol=1e-6)
    momentum = _steps(optimizers.SGD(0.5, momentum=0.9))
    np.testing.assert_allclose(momentum, [W + 0.5 * D1, W + 0.5 * D1 + 0.5 * (0.9 * D1 + D2)], rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_adaptive_server_steps_follow_reddi_et_al(name: str):
    lr, b1, b2, tau, v0 = 0.1, 0.9, 0.99, 1e-3, 0.01
    optimizer = {"adam": optimizers.Adam(lr, b1, b2, tau, v0), "yogi": optimizers.Yogi(lr, b1, b2, tau, v0),
                 "adagrad": optimizers.Adagrad(lr, b1, tau, v0)}[name]
    m, v, w = np.zeros(2), np.full(2, v0), W.astype(np.float64)
    for delta, got in zip((D1, D2), _steps(optimizer)):
        d2 = delta.astype(np.float64) ** 2
        m = b1 * m + (1 - b1) * delta
        v = {"adam": b2 * v + (1 - b2) * d2, "yogi": v - (1 - b2) * d2 * np.sign(v - d2), "adagrad": v + d2}[name]
        w = w + lr * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(got, w, rtol=1e-5)


def test_server_optimizers_refuse_bad_hyper_parameters():
    with pytest.raises(ValueError, match="momentum"):
        optimizers.SGD(1.0, momentum=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.Adam(0.0)
    with pytest.raises(ValueError, match="epsilon"):
        optimizers.Yogi(0.1, epsilon=0.0)


def test_server_optimizer_in_a_process(fedavg: LearningProcess, inline: Executor):
    clients = _clients()
    start = fedavg.initialize()
    one, _ = fedavg.next(start, clients)
    initial, after = fedavg.get_model_weights(start), fedavg.get_model_weights(one)
    mean_delta = [a - b for a, b in zip(after.trainable, initial.trainable)]
    adam = optimizers.Adam(0.05)
    _, expected = adam.apply(adam.initialize(initial.trainable), initial.trainable, mean_delta)
    fedadam = _variant(fedavg, inline, server=adam)
    with pytest.raises(ValueError, match=r"server optimizer state has slots \[\]; Adam needs \['m', 'v'\]"):
        fedadam.next(start, clients)
    state, _ = fedadam.next(fedadam.initialize(), clients)
    for got, want in zip(state.global_model_weights.trainable, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    _assert_same_weights(fl.ModelWeights([], state.global_model_weights.non_trainable),
                         fl.ModelWeights([], after.non_trainable))  # moving statistics are averaged, not stepped
    assert set(state.server_optimizer_state) == {"m", "v"}

    fedavgm = _variant(fedavg, inline, server=optimizers.SGD(1.0, momentum=0.9))
    first, second = _run(fedavgm, 1, clients)[0], _run(fedavgm, 2, clients)[0]
    _assert_same_weights(first.global_model_weights, one.global_model_weights)  # momentum starts at 0
    assert not np.allclose(second.global_model_weights.trainable[0],
                           _run(fedavg, 2, clients)[0].global_model_weights.trainable[0])


# ---------------------------------------------------------------------------- FedProx


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model(
        fedavg: LearningProcess, fedprox: LearningProcess, inline: Executor):
    assert fedprox.artifact.manifest.proximal and not fedavg.artifact.manifest.proximal
    clients = _clients((30, 25))
    plain, _ = _run(fedavg, 2, clients)
    zero, _ = _run(fedprox, 2, clients)
    _assert_same_weights(zero.global_model_weights, plain.global_model_weights)
    _, fedavg_metrics = _run(fedavg, 1, clients)
    _, strong_metrics = _run(_variant(fedprox, inline, proximal_mu=2.0, seed=0), 1, clients)
    assert strong_metrics["finalizer"]["update_norm"] < 0.9 * fedavg_metrics["finalizer"]["update_norm"]


# ---------------------------------------------------------------------------- execution


def test_results_do_not_depend_on_worker_processes(fedavg: LearningProcess, inline: Executor):
    clients = _clients((9, 14, 6, 11, 3))
    variant = dict(seed=7, epochs=2, max_steps=6)
    inline_state, inline_metrics = _run(_variant(fedavg, inline, **variant), 2, clients)
    with InProcessExecutor(num_workers=2) as workers:
        parallel_state, parallel_metrics = _run(_variant(fedavg, workers, **variant), 2, clients)
    _assert_same_weights(parallel_state.global_model_weights, inline_state.global_model_weights)
    assert parallel_metrics == inline_metrics
    unshuffled, _ = _run(_variant(fedavg, inline, seed=None, epochs=2, max_steps=6), 2, clients)
    assert not np.array_equal(unshuffled.global_model_weights.trainable[0],
                              inline_state.global_model_weights.trainable[0])


def test_shuffle_seeds_follow_client_ids_not_positions(fedavg: LearningProcess, inline: Executor):
    (x0, y0), (x1, y1) = _clients((9, 14))
    process = _variant(fedavg, inline, seed=3, epochs=2)
    start = process.initialize()
    named = [ClientDataset(x0, y0, client_id="a"), ClientDataset(x1, y1, client_id="b")]
    forward, _ = process.next(start, named)
    backward, _ = process.next(start, named[::-1])  # each client shuffles alike in either position
    _assert_same_weights(forward.global_model_weights, backward.global_model_weights)
    plain, _ = process.next(start, [(x0, y0), (x1, y1)])  # unnamed clients are named by position: "0", "1"
    by_position, _ = process.next(start, [ClientDataset(x0, y0, client_id="0"), ClientDataset(x1, y1, client_id="1")])
    _assert_same_weights(plain.global_model_weights, by_position.global_model_weights)
    assert not np.array_equal(plain.global_model_weights.trainable[0], forward.global_model_weights.trainable[0])


def test_worker_module_does_not_import_tensorflow():
    code = "import sys, fedge._client_worker; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).returncode == 0


def test_the_default_executor_can_be_replaced(fedavg: LearningProcess, inline: Executor):
    default = fl.executors.get_default_executor()
    assert isinstance(default, InProcessExecutor) and default is fl.executors.get_default_executor()
    fl.executors.set_default_executor(inline)
    try:
        assert fl.executors.get_default_executor() is inline
        process = LearningProcess(fedavg.artifact, ClientWork(), fl.ClientWeighting.NUM_EXAMPLES, optimizers.SGD(1.0),
                                  executor=None)
        _assert_same_weights(_run(process, 1, _clients())[0].global_model_weights,
                             _run(fedavg, 1, _clients())[0].global_model_weights)
    finally:
        fl.executors.set_default_executor(None)


class _Spy(Executor):
    """An executor that records whether any client was asked to train."""

    def __init__(self) -> None:
        self.trained = False

    def train(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence, config: RoundConfig
              ) -> Iterator[ClientUpdate]:
        self.trained = True
        return iter(())

    def evaluate(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence) -> Iterator[dict]:
        self.trained = True
        return iter(())


@pytest.mark.parametrize(("bad", "message"), [
    ((np.zeros((5, 3), np.float32), np.zeros(5, np.int32)), r"federated_data\[2\].*expected shape \(N, 4\).*\(5, 3\)"),
    ((np.zeros((5, 4), np.float32), np.full(5, 0.5)), r"federated_data\[2\].*y: expected dtype int32, got float64"),
    ((np.array([["a"] * 4] * 5), np.zeros(5, np.int32)), r"federated_data\[2\].*x: expected dtype float32"),
    ((np.zeros((5, 4), np.float32), np.zeros(4, np.int32)), r"federated_data\[2\].*same number of examples"),
    ("not data", r"federated_data\[2\].*\(x, y\) pair"),
])
def test_bad_federated_data_fails_before_any_training_naming_the_client(fedavg: LearningProcess, bad: object,
                                                                        message: str):
    spy = _Spy()
    process = _variant(fedavg, spy)
    clients: list = [*_clients((5, 6)), bad]
    with pytest.raises((ValueError, TypeError), match=message):
        process.next(process.initialize(), clients)
    evaluation = fl.FederatedEvaluation(fedavg.artifact, spy)
    with pytest.raises((ValueError, TypeError), match=message):
        evaluation(process.get_model_weights(process.initialize()), clients)
    assert not spy.trained


def test_tf_data_client_dataset_and_dict_clients_train_like_numpy(fedavg: LearningProcess):
    clients = _clients()
    expected, _ = _run(fedavg, 1, clients)
    (x0, y0), (x1, y1), (x2, y2) = clients
    mixed = [tf.data.Dataset.from_tensor_slices((x0, y0)).batch(3),
             tf.data.Dataset.from_tensor_slices({"x": x1, "y": y1}),
             ClientDataset(x2, y2.astype(np.int64))]
    _assert_same_weights(_run(fedavg, 1, mixed)[0].global_model_weights, expected.global_model_weights)
    as_dicts = [{"x": x, "y": y[:, None]} for x, y in clients]  # labels shaped (N, 1) are accepted too
    _assert_same_weights(_run(fedavg, 1, as_dicts)[0].global_model_weights, expected.global_model_weights)


def test_federated_evaluation_equals_evaluation_over_the_union(fedavg: LearningProcess):
    evaluation = fl.build_federated_evaluation(_model_fn, batch_size=3, executor=InProcessExecutor(num_workers=0))
    state, _ = _run(fedavg, 2, _clients())
    held_out = _clients((7, 12, 5), seed=9)
    metrics = evaluation(fedavg.get_model_weights(state), held_out)
    assert metrics["num_clients"] == 3
    model = TrainableModel(evaluation.artifact.tflite_bytes)
    model.set_weights(fedavg.get_model_weights(state).to_list())
    union = (np.concatenate([x for x, _ in held_out]), np.concatenate([y for _, y in held_out]))
    expected = model.finalized_metrics(evaluate_locally(model, union))
    assert metrics["eval"].keys() == expected.keys()
    for name in ("loss", "accuracy", "num_examples"):
        assert metrics["eval"][name] == pytest.approx(expected[name], rel=1e-5)
    assert metrics["eval"]["num_examples"] == 24
    assert metrics["eval"]["num_batches"] == 3 + 4 + 2  # each client's last batch is partial


def test_sum_then_finalize_sums_before_dividing():
    finalizers = {"loss": ["divide", "loss_sum", "num_examples"], "num_examples": ["identity", "num_examples"]}
    aggregator = sum_then_finalize(finalizers)
    assert aggregator.result() == {"loss": 0.0, "num_examples": 0.0}
    aggregator.add({"loss_sum": 2.0, "num_examples": 1.0})
    aggregator.add({"loss_sum": 3.0, "num_examples": 9.0})
    assert aggregator.result() == finalize(finalizers, {"loss_sum": 5.0, "num_examples": 10.0})
    assert aggregator.result() == {"loss": 0.5, "num_examples": 10.0}


# ---------------------------------------------------------------------------- state


def test_resuming_from_a_saved_state_equals_not_stopping(fedavg: LearningProcess, inline: Executor, tmp_path):
    process = _variant(fedavg, inline, server=optimizers.Yogi(0.02), seed=5)
    clients = _clients()
    uninterrupted, _ = _run(process, 3, clients)
    first, _ = _run(process, 1, clients)
    path = fl.save_state(tmp_path / "state.npz", first)
    assert os.listdir(tmp_path) == ["state.npz"]  # no temporary file left behind
    loaded = fl.load_state(path)
    assert loaded.round_num == 1 and loaded.global_model_weights.trainable_mask == first.global_model_weights.trainable_mask
    resumed, _ = _run(process, 2, clients, state=loaded)
    assert resumed.round_num == 3
    _assert_same_weights(resumed.global_model_weights, uninterrupted.global_model_weights)
    for name, slots in uninterrupted.server_optimizer_state.items():
        for a, b in zip(resumed.server_optimizer_state[name], slots, strict=True):
            np.testing.assert_array_equal(a, b)
    fl.save_state(path, resumed)  # replaces the old file
    assert fl.load_state(path).round_num == 3


def test_set_model_weights_checks_shapes(fedavg: LearningProcess):
    state = fedavg.initialize()
    weights = fedavg.get_model_weights(state)
    shifted = fl.ModelWeights([w + 1 for w in weights.trainable], weights.non_trainable)  # default layout
    new_state = fedavg.set_model_weights(state, shifted)
    np.testing.assert_array_equal(fedavg.get_model_weights(new_state).trainable[0], weights.trainable[0] + 1)
    assert fedavg.get_model_weights(new_state).trainable_mask == weights.trainable_mask
    with pytest.raises(ValueError, match="expected shape"):
        fedavg.set_model_weights(state, fl.ModelWeights([w[..., :1] for w in weights.trainable], weights.non_trainable))


def test_a_batch_size_is_required(inline: Executor):
    with pytest.raises(ValueError, match="batch_size"):
        fl.build_federated_averaging_process(_model_fn, _client_optimizer, executor=inline)
