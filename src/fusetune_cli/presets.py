"""``fusetune presets``: each config group's options with their one-line descriptions; ``presets copy``."""

import argparse
import shutil
import sys
from difflib import get_close_matches
from pathlib import Path

from .configs import defaults, description, groups, packaged_config_dir

WIDTH = 118


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every fusetune mistake
        print(f"fusetune: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fusetune presets",
        description="List each config group's options (group=option on the train command line), or copy one.",
        epilog="A copy placed at DIR/GROUP/NAME.yaml is the option NAME of `fusetune train --config-dir DIR`.",
    )
    parser.add_argument("--config-dir", type=Path, help="also list your own config folder's options")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    copy = commands.add_parser("copy", help="copy one option's yaml to edit", description="Copy one option's yaml.")
    copy.add_argument("preset", metavar="GROUP/OPTION", help="such as model/llama3_1b")
    copy.add_argument("file", metavar="FILE", nargs="?", type=Path, help="where (default: ./OPTION.yaml)")
    return parser


def listing(config_dirs: list[Path]) -> str:
    """One block per group: its default, then each option and its description."""
    found = groups(*config_dirs)
    chosen = defaults(config_dirs[0])
    lines = []
    for group, options in sorted(found.items()):
        default = chosen.get(group)
        lines.append(f"{group}" + (f" (default: {default})" if default else ""))
        width = max(map(len, options))
        for name, path in sorted(options.items()):
            line = f"  {name:<{width}}  {description(path)}".rstrip()
            lines.append(line if len(line) <= WIDTH else line[: WIDTH - 1] + "…")
    return "\n".join(lines) + "\n"


def copy(preset: str, target: Path | None, config_dir: Path) -> str:
    """Copy ``group/option``'s yaml to ``target`` (a new file, or into a folder); returns what it did."""
    group, _, option = preset.strip("/").rpartition("/")
    options = groups(config_dir).get(group, {})
    if option not in options:
        every = [f"{g}/{o}" for g, opts in groups(config_dir).items() for o in opts]
        near = "".join(f" (did you mean {m}?)" for m in get_close_matches(preset, every, n=1))
        raise ValueError(f"no preset {preset}{near}; `fusetune presets` lists them")
    target = target or Path(f"{option}.yaml")
    if target.is_dir():
        target = target / f"{option}.yaml"
    if target.exists():
        raise ValueError(f"{target} exists: give another FILE, or remove it first")
    shutil.copyfile(options[option], target)
    return f"copied {group}/{option} to {target}; as DIR/{group}/NAME.yaml it is {group}=NAME of train --config-dir DIR"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    config_dir = packaged_config_dir()
    if args.command == "copy":
        try:
            print(copy(args.preset, args.file, config_dir))
        except (ValueError, OSError) as error:
            print(f"fusetune: error: {error}", file=sys.stderr)
            return 2
        return 0
    extra = [args.config_dir] if args.config_dir else []
    for folder in extra:
        if not folder.is_dir():
            print(f"fusetune: error: --config-dir {folder}: no such folder", file=sys.stderr)
            return 2
    print(listing([config_dir, *extra]), end="")
    return 0
