"""The patch ledger: the first original is kept, and each tag's replacements are undone alone."""

from fusetune import ledger


def test_the_first_original_comes_back_and_tags_are_undone_apart():
    a = type("A", (), {"f": "a-original", "g": "g-original"})  # owners are classes and modules: hashable
    b = type("B", (), {"f": "b-original"})
    ledger.replace(a, "f", "first", "kernels")
    ledger.replace(a, "f", "second", "kernels")  # replaced again: the library's own is still the original
    ledger.replace(a, "g", "ours", "trl")
    ledger.replace(b, "f", "ours", "kernels")
    assert ledger.original(a, "f") == "a-original" and a.f == "second"
    assert {(a, "f"), (b, "f")} <= set(ledger.replaced("kernels")) and (a, "g") not in ledger.replaced("kernels")

    ledger.restore_all("kernels")
    assert (a.f, b.f, a.g) == ("a-original", "b-original", "ours")  # the trl entry stays
    assert ledger.original(a, "f") == "a-original" and (a, "f") not in ledger.replaced()

    ledger.restore(a, "g")
    ledger.restore(a, "g")  # nothing recorded: nothing happens
    assert a.g == "g-original" and (a, "g") not in ledger.replaced()
