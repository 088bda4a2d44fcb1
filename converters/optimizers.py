"""SGD (momentum, Nesterov) and Adam as variable updates, matching Keras 3's update rules."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from converters.errors import ConversionError

_UNSUPPORTED_OPTIONS = ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                        "loss_scale_factor", "gradient_accumulation_steps")


def _float(value: Any) -> float:
    """A hyper-parameter as the float32 Keras computes with, written as its shortest decimal."""
    return float(str(np.float32(keras.ops.convert_to_numpy(value))))


def optimizer_config(optimizer: Any) -> dict[str, Any]:
    """The manifest entry for a keras SGD/Adam instance or the names 'sgd'/'adam'."""
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    if type(optimizer) not in (keras.optimizers.SGD, keras.optimizers.Adam):
        raise ConversionError(f"optimizer {type(optimizer).__name__} is not supported; use SGD or Adam")
    name = type(optimizer).__name__
    config = optimizer.get_config()
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option) not in (None, False, 0, 0.0):
            raise ConversionError(f"optimizer {name}: {option}={config[option]} is not supported")
    if not isinstance(config["learning_rate"], (int, float)):
        raise ConversionError(f"optimizer {name}: a learning-rate schedule is not supported; give a "
                              "float and change it between rounds with set_learning_rate")
    if name == "SGD":
        return {"name": "sgd", "learning_rate": _float(config["learning_rate"]),
                "momentum": _float(config["momentum"]), "nesterov": bool(config["nesterov"])}
    if config.get("amsgrad"):
        raise ConversionError("optimizer Adam: amsgrad=True is not supported")
    return {"name": "adam", "learning_rate": _float(config["learning_rate"]),
            "beta_1": _float(config["beta_1"]), "beta_2": _float(config["beta_2"]),
            "epsilon": _float(config["epsilon"])}


class OptimizerState(tf.Module):
    """The optimizer's variables (learning rate, step count, slots) and its update rule."""

    def __init__(self, config: dict[str, Any], trainable_shapes: list[tuple[int, ...]]):
        super().__init__(name="optimizer")
        self.config = config
        self.learning_rate = tf.Variable(config["learning_rate"], dtype=tf.float32, name="learning_rate")
        self.iterations = tf.Variable(0.0, dtype=tf.float32, name="iterations")
        slot_names = {"sgd": ["momentum"] if config.get("momentum") else [], "adam": ["m", "v"]}
        self.slots = [[tf.Variable(tf.zeros(shape), name=f"{slot}_{i:03d}") for slot in slot_names[config["name"]]]
                      for i, shape in enumerate(trainable_shapes)]

    def reset(self) -> None:
        """Zero the slots and the step count, as a freshly built Keras optimizer has them."""
        self.iterations.assign(0.0)
        for slots in self.slots:
            for slot in slots:
                slot.assign(tf.zeros_like(slot))

    def apply(self, variables: list[tf.Variable], values: list[tf.Tensor], grads: list[tf.Tensor]) -> None:
        """One update of `variables` (the trainable ones, in slot order) by `grads`; `values`
        are the variables as already read for this step, so they are not read (copied) again."""
        lr = self.learning_rate.read_value()
        if self.config["name"] == "adam":
            beta_1, beta_2 = self.config["beta_1"], self.config["beta_2"]
            step = self.iterations + 1.0
            alpha = lr * tf.sqrt(1.0 - tf.pow(beta_2, step)) / (1.0 - tf.pow(beta_1, step))
            for variable, value, grad, (m, v) in zip(variables, values, grads, self.slots):
                m_new = m + (grad - m) * (1.0 - beta_1)
                v_new = v + (grad * grad - v) * (1.0 - beta_2)
                m.assign(m_new)
                v.assign(v_new)
                variable.assign(value - m_new * alpha / (tf.sqrt(v_new) + self.config["epsilon"]))
        elif self.config.get("momentum"):
            momentum = self.config["momentum"]
            for variable, value, grad, (m,) in zip(variables, values, grads, self.slots):
                m_new = m * momentum - grad * lr
                m.assign(m_new)
                step = m_new * momentum - grad * lr if self.config["nesterov"] else m_new
                variable.assign(value + step)
        else:
            for variable, value, grad in zip(variables, values, grads):
                variable.assign(value - grad * lr)
        self.iterations.assign_add(1.0)
