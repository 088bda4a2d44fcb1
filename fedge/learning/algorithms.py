"""TFF's current builder names (`tff.learning.algorithms`): FedAvg, FedProx and federated evaluation.

`build_weighted_fed_avg` and `build_weighted_fed_prox` return a LearningProcess whose clients
run the lowered `.tflite` (fedge.learning.process); `build_fed_eval` returns an evaluation
process (fedge.learning.evaluation). The older `build_federated_averaging_process` and
`build_federated_evaluation` remain in fedge.learning.
"""

from fedge.learning.evaluation import EvaluationProcess, build_fed_eval
from fedge.learning.process import build_weighted_fed_avg, build_weighted_fed_prox

__all__ = ["EvaluationProcess", "build_fed_eval", "build_weighted_fed_avg", "build_weighted_fed_prox"]
