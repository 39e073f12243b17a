"""Every monkey-patch fusetune makes, in one ledger: what was replaced, by whom, and how to put it back.

An entry is keyed by (owner, attribute) and tagged by who made it ("kernels": the patch table's forwards and
functions; "trl": TRL's public names pointed at fusetune's classes). The first original is kept, however
often the attribute is replaced again, so ``restore`` always brings back the library's own."""

_entries: dict[tuple[object, str], tuple[str, object]] = {}  # (owner, attribute) -> (tag, original)


def replace(owner, name: str, value, tag: str) -> None:
    """``owner.name = value``, the original recorded under ``tag`` the first time."""
    _entries.setdefault((owner, name), (tag, getattr(owner, name)))
    setattr(owner, name, value)


def original(owner, name: str):
    """What ``owner.name`` was before fusetune replaced it (what it is, where it was never replaced)."""
    entry = _entries.get((owner, name))
    return entry[1] if entry is not None else getattr(owner, name)


def restore(owner, name: str) -> None:
    """The original of ``owner.name`` back, where it was replaced."""
    entry = _entries.pop((owner, name), None)
    if entry is not None:
        setattr(owner, name, entry[1])


def restore_all(tag: str) -> None:
    """Every original recorded under ``tag`` back."""
    for (owner, name), (entry_tag, _) in list(_entries.items()):
        if entry_tag == tag:
            restore(owner, name)


def replaced(tag: str | None = None) -> list[tuple[object, str]]:
    """The (owner, attribute) pairs replaced now, by ``tag`` or by anyone."""
    return [key for key, (entry_tag, _) in _entries.items() if tag is None or entry_tag == tag]
