"""The installed versions of named packages (None for one that is not installed), for records and cache keys."""

import importlib.metadata


def installed(names) -> dict[str, str | None]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
