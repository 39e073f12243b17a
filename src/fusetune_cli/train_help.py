"""``fusetune train --help`` at once: the text is composed once per install and config (torch, TRL and the
schemas load, about 10 s) and kept in the cache, keyed by what it is made of: the arguments, the config files,
fusetune's source files and the versions of the libraries whose fields it lists."""

import hashlib
import os
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from .configs import groups
from .paths import cache_root

HELP_FLAGS = ("-h", "--help")
LIBRARIES = ("trl", "transformers", "hydra-core", "omegaconf")


def cache_dir() -> Path:
    return cache_root() / "help"


def user_config_dirs(argv: list[str]) -> list[str]:
    """The folders of ``--config-dir DIR`` / ``--config-dir=DIR`` / ``-cd DIR`` in ``argv``."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            found.append(arg.partition("=")[2])
    return found


def _files(folder: Path, pattern: str) -> list[str]:
    return [f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in sorted(folder.rglob(pattern))]


def cache_key(argv: list[str], config_dir: str, prog: str) -> str:
    """What the help text is made of, hashed; a change of any part (a file edited, a library upgraded) misses."""
    package = Path(find_spec("fusetune").submodule_search_locations[0]).resolve()
    parts = [prog, *argv, *_files(package, "*.py")]
    for folder in [config_dir, *user_config_dirs(argv)]:
        parts += [folder, *(_files(Path(folder), "*.yaml") if Path(folder).is_dir() else [])]
    for name in LIBRARIES:
        try:
            parts.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} absent")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def print_train_help(argv: list[str], config_dir: str, prog: str) -> int:
    """Print the help for ``argv`` (its other overrides and --config-dir shape the config it lists)."""
    argv = [arg for arg in argv if arg not in HELP_FLAGS]
    cached = cache_dir() / f"{cache_key(argv, config_dir, prog)}.txt"
    try:
        text = cached.read_text()
    except OSError:
        if sys.stderr.isatty():  # a person waiting: say why this once is slow
            print(f"{prog}: composing the help once for this install and config (torch and TRL load: seconds); "
                  "later --help answers at once", file=sys.stderr, flush=True)  # fmt: skip
        from fusetune.app.help import help_text_or_exit

        folders = [config_dir, *user_config_dirs(argv)]
        options = {group: set(found) for group, found in groups(*filter(os.path.isdir, folders)).items()}
        text = help_text_or_exit(argv, config_dir, folders[1:], prog, options)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(text)
            partial.replace(cached)
        except OSError:
            pass  # a read-only cache: the help is printed all the same, composed again next time
    sys.stdout.write(text)
    return 0
