"""Scenarios of kind ``fixed`` (S1-S3, S6-S10, long1b, long8b): batch x seq rows, one job each."""

from .rows import worker_spec


def run(runner, scenario, variant, sc, folder, source, gpu, args) -> dict:
    spec = worker_spec(scenario, variant, sc, folder, source, gpu, args)
    return runner.call("worker", spec, f"{scenario}-{variant}", variant)
