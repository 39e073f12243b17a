"""``python scripts/bench.py`` (or ``python -m bench`` with scripts/ on the path).

A job subprocess (``--worker``, ``--prepare``, ``--gpu-info`` and a spec, as the runner starts it) goes
straight to bench.worker, before the command line's modules are imported: those import fusetune, which an
unsloth job must not see before Unsloth, nor a peer's job at all."""

import sys

JOBS = ("--worker", "--prepare", "--gpu-info")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and argv[0] in JOBS:
        from bench.worker import run_job

        return run_job(argv[0].removeprefix("--"), argv[1])
    from bench.cli import main as command_line

    return command_line(argv)


if __name__ == "__main__":
    main()
