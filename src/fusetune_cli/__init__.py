"""The ``fusetune`` command: ``fusetune train|report|chat|presets ...``.

This package imports only the standard library (and PyYAML) at start, so ``fusetune --help``, ``fusetune
presets`` and a cached ``fusetune train --help`` answer at once; torch, TRL and the training code load only
for the commands that use them. ``python train.py`` in a checkout runs the same ``train``.
"""

import sys

USAGE = """\
usage: fusetune COMMAND [ARGS ...]

commands:
  train [group=option ...] [key=value ...]   train (Hydra overrides; -m for a sweep; train --help lists every key)
  report SWEEP_DIR                           rebuild a sweep's report.md, report.json and plots
  chat RUN_DIR [--prompt TEXT]               answer with a trained run (interactive without --prompt)
  presets                                    each config group's options, with a line on each
  presets copy GROUP/OPTION [FILE]           copy an option's yaml to edit (use it with train --config-dir)

`fusetune COMMAND --help` describes each command. Runs go to outputs/runs/<time>/ under the current folder.
"""


def train(argv: list[str], config_dir: str | None = None, prog: str = "fusetune train") -> int:
    """Run the Hydra app on ``argv`` (overrides and Hydra's flags); ``config_dir``: the configs (None: the
    packaged ones). ``--help`` prints the keys with their descriptions, from a cache when it has them."""
    from .configs import packaged_config_dir

    config_dir = config_dir or str(packaged_config_dir())
    if "--help" in argv or "-h" in argv:
        from .train_help import print_train_help

        return print_train_help(argv, config_dir, prog)
    from fusetune.app.train import main

    return main(argv, config_dir)


def _report(argv: list[str]) -> int:
    from fusetune.report import main

    return main(argv)


def _chat(argv: list[str]) -> int:
    from fusetune import chat
    from fusetune.noise import quiet_third_party

    quiet_third_party(answers_only=True)
    return chat.main(argv)


def _presets(argv: list[str]) -> int:
    from .presets import main

    return main(argv)


COMMANDS = {"train": train, "report": _report, "chat": _chat, "presets": _presets}


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from difflib import get_close_matches

        near = "".join(f" (did you mean {m}?)" for m in get_close_matches(command, list(COMMANDS), n=1))
        print(f"fusetune: error: no command '{command}'{near}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)
