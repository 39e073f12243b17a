"""The trip a run's config takes: which of fusetune's files its nodes pass through, in order.

Runs the embedded default (or the overrides given) for two steps in this process, with a profiler that
notes every call of a fusetune function that receives the composed config or one of its nodes (an
omegaconf DictConfig/ListConfig argument). Consecutive calls in one file are one stay. A call that goes
back into a file the config passed through higher up the same call chain (A -> B -> A) is a return:
the value went down and came back up. Prints the stays, then one JSON line of the counts.

    python scripts/config_trip.py [hydra overrides...]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "fusetune"


def trip(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the fusetune files, in call order, of every function that received a config node; the calls that went
    back into a file higher up their own chain of such calls, as "caller -> callee")."""
    from fusetune.app.config import register_configs
    from fusetune.app.run import run

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.max_steps=2", *overrides])
    cfg.output_dir = tempfile.mkdtemp(prefix="config-trip-")
    files: list[str] = []
    returns: list[str] = []
    chain: list[tuple[object, str]] = []  # (frame, file) of the config-receiving calls now running

    def profile(frame, event, _arg):
        if event == "return" and chain and chain[-1][0] is frame:
            chain.pop()
        if event != "call" or not frame.f_code.co_filename.startswith(str(SOURCE)):
            return
        code = frame.f_code
        arguments = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(isinstance(frame.f_locals.get(name), (DictConfig, ListConfig)) for name in arguments):
            file = str(Path(code.co_filename).relative_to(SOURCE))
            if chain and chain[-1][1] != file and file in [f for _, f in chain]:
                returns.append(f"{chain[-1][1]} -> {file}")
            files.append(file)
            chain.append((frame, file))

    sys.setprofile(profile)
    try:
        run(cfg)
    finally:
        sys.setprofile(None)
    return files, returns


def stays(files: list[str]) -> list[str]:
    return [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the run traced (default: the embedded default)"
    )
    files, returns = trip(parser.parse_args().overrides)
    path = stays(files)
    print(" -> ".join(path))
    print(json.dumps({"files": len(set(path)), "stays": len(path), "returns": len(returns), "returned": returns}))


if __name__ == "__main__":
    main()
