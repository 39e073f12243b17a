"""One home for each rule: the names below are defined (at module level: def, class or assignment) in one module of
src/, scripts/ and kernels/ at most, and the others import them. A second definition is how copies start to
disagree (issue 26: the metrics reader that raised on a line cut short, where its twin skipped it)."""

import ast
import collections
import functools
from pathlib import Path

from fusetune.fast_model import CHECKPOINTING
from fusetune.modules import PROJECTIONS

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "scripts", "kernels")

# name -> its home, for the message
RULES = {
    # the LoRA target list
    "PROJECTIONS": "fusetune.modules",
    # run-record I/O
    **dict.fromkeys(
        (
            "SUMMARY",
            "STATUS",
            "METRICS",
            "STATUSES",
            "read_jsonl",
            "read_metrics",
            "last_step",
            "last_step_of",
            "fsync_folder",
            "write_atomically",
            "write_json_atomically",
            "write_status",
        ),
        "fusetune.record_files",
    ),
    # a first line, or one line, of an error or a text
    **dict.fromkeys(("one_line", "first_line", "_first_line"), "fusetune.errors"),
    # installed versions
    **dict.fromkeys(
        ("installed", "versions", "run_versions", "RUN_RECORD", "DATA_CACHE_KEY", "VERSIONED"), "fusetune.versions"
    ),
    # checkpointing modes
    **dict.fromkeys(("CHECKPOINTING", "OFFLOADED"), "fusetune.fast_model"),
    **dict.fromkeys(("CHECKPOINTING_WORDS", "checkpointing_mode"), "fusetune.app.config"),
    # weight files
    **dict.fromkeys(("WEIGHT_FILES", "PICKLED_WEIGHTS", "WEIGHTS"), "fusetune.loading"),
    # third-party quieting
    **dict.fromkeys(("quiet_third_party", "quiet", "muted"), "fusetune.noise"),
    # a model's compute dtype, and the dtype a product runs in
    **dict.fromkeys(("model_compute_dtype", "compute_dtype"), "fusetune.precision"),
    "matmul_dtype": "fusetune_kernels.lora",
}

# Copies kept on purpose, in scripts where importing the home would load fusetune or torch too early; each must
# hold its home's value (in any order).
KEPT_COPIES = {
    ("scripts/step_profiler/__init__.py", "CHECKPOINTING"): CHECKPOINTING,  # arguments checked before torch loads
}


def _assigned(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in _assigned(element)]
    return []  # an attribute or a subscript defines no module-level name


def _statements(body: list[ast.stmt]):
    """The module-level statements, those inside a module-level if, try or with included."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _statements(handler.body)


def definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Each name the module defines (def, class, assignment), with the statement that defines it."""
    found = {}
    for node in _statements(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            found.update(dict.fromkeys((n for t in node.targets for n in _assigned(t)), node))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            found.update(dict.fromkeys(_assigned(node.target), node))
    return found


def second_homes(trees: dict[str, ast.Module], names, kept=frozenset()) -> list[str]:
    """One line for each name of ``names`` defined in more than one module (the (path, name) pairs in ``kept`` aside):
    where it is defined."""
    where: dict[str, list[str]] = {}
    for path, tree in trees.items():
        for name, node in definitions(tree).items():
            if name in names and (path, name) not in kept:
                where.setdefault(name, []).append(f"{path}:{node.lineno}")
    return [
        f"{name} is defined in {len(found)} modules: {', '.join(found)}"
        for name, found in where.items()
        if len(found) > 1
    ]


def copies_of(trees: dict[str, ast.Module], value: tuple, home: str) -> dict[str, str]:
    """{path: name} of each module-level constant outside ``home`` whose literal value is ``value``."""
    found = {}
    for path, tree in trees.items():
        if path == home:
            continue
        for name, node in definitions(tree).items():
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Tuple | ast.List):
                try:
                    literal = tuple(ast.literal_eval(node.value))
                except ValueError:
                    continue
                if literal == value:
                    found[path] = name
    return found


@functools.cache
def _trees() -> dict[str, ast.Module]:
    files = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in files}


def test_each_rule_has_one_home():
    trees = _trees()
    assert "src/fusetune/record_files.py" in trees and len(trees) > 50  # the folders were read
    problems = second_homes(trees, RULES, set(KEPT_COPIES))
    assert not problems, "one home for each rule (import it from there):\n" + "\n".join(
        f"{line} (its home: {RULES[line.split()[0]]})" for line in problems
    )


def test_the_lora_targets_are_not_copied_under_another_name():
    copies = copies_of(_trees(), tuple(PROJECTIONS), "src/fusetune/modules.py")
    assert set(copies.items()) <= set(KEPT_COPIES), f"import fusetune.modules.PROJECTIONS instead of {copies}"


def test_a_copy_kept_on_purpose_holds_its_homes_value():
    trees = _trees()
    for (path, name), value in KEPT_COPIES.items():
        node = definitions(trees[path])[name]
        assert collections.Counter(ast.literal_eval(node.value)) == collections.Counter(value), f"{path}: {name}"


def test_the_test_seams_live_in_fusetune_testing_alone():
    """The switches and resets only tests use are fusetune.testing's; the production modules keep only the state."""
    trees = _trees()
    seams = {
        name
        for name, node in definitions(trees["src/fusetune/testing.py"]).items()
        if isinstance(node, ast.FunctionDef)
    }
    assert {"set_poison", "set_cpu_simulation", "reset_offload_stats", "reset_attention_calls"} <= seams
    elsewhere = [
        f"{name} ({path}:{node.lineno})"
        for path, tree in trees.items()
        if path != "src/fusetune/testing.py"
        for name, node in definitions(tree).items()
        if name in seams | {"reset_stats", "reset_calls"}
    ]
    assert elsewhere == [], "a test seam belongs in fusetune.testing"


def test_a_second_definition_is_reported_with_both_places():
    sources = {
        "a.py": "import os\nfrom b import one_line\n\nSTATUS = 'status.json'\n\ndef one_line(text):\n    return text\n",
        "b.py": "try:\n    import x\nexcept ImportError:\n    def one_line(text):\n        return str(text)\n",
        "c.py": "SUMMARY, (METRICS, other) = 'summary.json', ('metrics.jsonl', 1)\nclass read_jsonl: ...\n",
        "d.py": "METRICS: str = 'm.jsonl'\nfrom a import STATUS\nobj.SUMMARY = 1\ndef f():\n    read_jsonl = 1\n",
    }
    trees = {path: ast.parse(text) for path, text in sources.items()}
    assert second_homes(trees, RULES, {("c.py", "METRICS"), ("a.py", "one_line")}) == []
    assert sorted(second_homes(trees, RULES)) == [
        "METRICS is defined in 2 modules: c.py:1, d.py:1",
        "one_line is defined in 2 modules: a.py:6, b.py:4",
    ]  # an import, an attribute and a function's local are no definitions; SUMMARY and read_jsonl have one home
    projections = "A = 1\nB = " + repr(list(PROJECTIONS)) + "\nC = " + repr(tuple(reversed(PROJECTIONS))) + "\n"
    assert copies_of({"x.py": ast.parse(projections)}, tuple(PROJECTIONS), "home.py") == {"x.py": "B"}
