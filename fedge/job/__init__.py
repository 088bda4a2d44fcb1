"""Jobs: one description of a federated job (model, data, process, rounds, fleet, broker, outputs).

`load_job("job.toml")` reads a job file (docs/job.md), or build the dataclasses of
fedge.job.spec in Python; fedge.job.build turns a job into its artifact, process, executor
and server, which is what `fedge simulate` and `fedge serve` do.
"""

from fedge.job.load import JobError, load_job, parse_job, parse_override
from fedge.job.spec import (AggregatorSpec, BrokerSpec, ClientOptimizerSpec, FleetSpec, Job, ModelSpec, OutputSpec,
                            ProcessSpec, RoundsSpec, ServerOptimizerSpec)
from fedge.simulation.data_spec import DataSpec

__all__ = ["AggregatorSpec", "BrokerSpec", "ClientOptimizerSpec", "DataSpec", "FleetSpec", "Job", "JobError",
           "ModelSpec", "OutputSpec", "ProcessSpec", "RoundsSpec", "ServerOptimizerSpec", "load_job", "parse_job",
           "parse_override"]
