"""TFF's `tff.learning.models` names: `from_keras_model` and the `Model` interface (imported with TensorFlow on
first use, so that `import fedge.learning.models` stays light)."""

import importlib
from typing import Any

__all__ = ["BatchOutput", "Model", "from_keras_model", "unpack_batch"]
_HOMES = {"BatchOutput": "fedge.learning.model", "Model": "fedge.learning.model", "unpack_batch": "fedge.learning.model",
          "from_keras_model": "fedge.learning.keras_model"}


def __getattr__(name: str) -> Any:
    """Import a name that needs TensorFlow when it is first used (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_HOMES[name]), name)
    return value
