"""Scenarios of kind ``dpo`` (D1, D8): preference pairs through each variant's DPO trainer, one job each (the
job's side is bench.preference)."""

from .rows import worker_spec


def run(runner, scenario, variant, sc, folder, source, gpu, args) -> dict:
    spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, mode="dpo")
    return runner.call("worker", spec, f"{scenario}-{variant}", variant)
