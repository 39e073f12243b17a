"""Every family op, run once against the model's own code before it is patched.

``verdicts`` builds a small random fp32 model from the config (``families.small_model``), takes
its loss and every gradient with the model's own modules, then again with the backend's ops, and
compares: an op agrees when the loss and each gradient are within ``TOLERANCE`` (norm-wise relative
error). All ops are first replaced at once, as they train; only where that pass disagrees is each op
checked alone, to say which. An op that disagrees, raises, or is never called by the model stays
unpatched, with the reason. So a transformers upgrade that changes a module's maths costs speed,
never correctness. Verdicts are cached in the process and on disk, keyed by the model type, op,
backend, device type, dtype, config, library versions, and the code of all the family's originals
(a fused decoder layer runs its norm's and MLP's code too) and of fusetune's ops, rows and check.

On a GPU, Triton's ops are checked in the half dtype the model trains in, at its real hidden and
head widths (``small_model(widths=True)``): the kernels the check compiles are then the ones training
runs, not extra fp32 ones. There an op agrees when its error against the fp32 answer is within
``HALF_MARGIN`` times that of the model's own code in the half dtype (and at least ``TOLERANCE``).
"""

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import time
from pathlib import Path

import torch

from fusetune_cli.paths import cache_root

from . import families
from .errors import first_line
from .record_files import write_json_atomically

log = logging.getLogger(__name__)
TOLERANCE = {"reference": 1e-4, "triton": 1e-2}  # triton's fp32 matmuls may run in TF32 on a GPU
HALF_MARGIN = 3
NEGLIGIBLE = 1e-3  # a gradient this small beside the largest is measured against this share of the largest
_memory: dict[str, str | None] = {}
_seconds = {"total": 0.0}


def cache_path() -> Path:
    return cache_root() / "self_check.json"


def _code_digest(value) -> str:
    """What the original does: its code object (bytes, constants, names), or the class's forward's."""
    function = inspect.unwrap(getattr(value, "__func__", value))  # under decorators and checkpointing wrappers
    code = getattr(function, "__code__", None)
    if code is None:
        return repr(value)
    parts = [code.co_code.hex(), repr(code.co_consts), repr(code.co_names), function.__qualname__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@functools.cache
def _fusetune_digest() -> str:
    import fusetune_kernels

    from . import forwards, prenorm

    ours = [Path(forwards.__file__), Path(families.__file__), Path(prenorm.__file__), Path(__file__)]
    files = [*ours, *sorted(Path(list(fusetune_kernels.__path__)[0]).glob("*.py"))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def half_precision(backend: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the check runs Triton's ops in where it compiles them for training (None: fp32)."""
    halves = (torch.bfloat16, torch.float16)
    return dtype if backend == "triton" and device.type == "cuda" and dtype in halves else None


def _key(config, op: str, backend: str, device: torch.device, originals: list, dtype=torch.float32) -> str:
    import transformers
    import triton

    parts = [
        config.model_type,
        op,
        backend,
        device.type,
        str(half_precision(backend, device, dtype) or torch.float32),
        families.config_key(config),
        torch.__version__,
        transformers.__version__,
        triton.__version__,
        _fusetune_digest(),
        *sorted(_code_digest(o) for o in originals),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_disk() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_disk(new: dict) -> None:
    try:
        merged = {**_read_disk(), **new}
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(cache_path(), merged)
    except OSError as error:  # a read-only home: the verdicts are kept for this process only
        log.debug("self-check cache not written: %s", error)


@contextlib.contextmanager
def swapped_in(values: dict):
    """``{(owner, attribute): value}`` set for the block, the previous values restored after."""
    previous = {key: getattr(key[0], key[1]) for key in values}
    try:
        for (owner, name), value in values.items():
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), value in previous.items():
            setattr(owner, name, value)


def _counting(owner, name, original, hits: set):
    if inspect.isclass(owner):

        def method(self, *args, **kwargs):
            hits.add((owner, name))
            return original(self, *args, **kwargs)

        return method

    def function(*args, **kwargs):
        hits.add((owner, name))
        return original(*args, **kwargs)

    return function


def _batch(vocab: int, device, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (2, length), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {"input_ids": input_ids.to(device), "labels": labels.to(device)}


def _loss_and_grads(model, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    return [loss.detach(), *(g.detach().clone() for g in grads)]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest norm-wise relative error over ``[loss, *gradients]``. A gradient under ``NEGLIGIBLE`` of the
    largest one is measured against that floor: its own norm is then at the level of fp32 rounding elsewhere
    (Qwen3-Next's delta-rule decay parameters can get 1e-6 of the others' gradient)."""
    norms = [b.double().norm().item() for b in expected]
    floor = max([1e-8, *(NEGLIGIBLE * n for n in norms[1:])])
    worst = 0.0
    for a, b, norm in zip(got, expected, norms, strict=True):
        diff = (a.double() - b.double()).norm().item()
        worst = max(worst, diff / max(norm, floor) if diff else 0.0)
    return worst


def run(config, backend: str, kernels, rows: list, device, dtype=torch.float32) -> dict[str, str | None]:
    """op -> None (agrees) or why not, for ``rows`` = [(op, owner, attribute, make, original)]."""
    half = half_precision(backend, device, dtype)
    model = families.small_model(config, device, widths=half is not None)
    # 32 rows on a GPU: Triton specialises on sizes that divide by 16, as training's do
    batch = _batch(model.get_input_embeddings().num_embeddings, device, 16 if half else 12)
    originals = {(owner, name): original for _, owner, name, _, original in rows}
    hits: set = set()
    counting = {key: _counting(*key, original, hits) for key, original in originals.items()}
    ops = list(dict.fromkeys(row[0] for row in rows))
    try:
        with swapped_in(counting):  # the model's own code, noting which of the originals it calls
            expected = _loss_and_grads(model, batch)
        with swapped_in(originals):
            tolerance = TOLERANCE[backend]
            if half:  # what the model's own code loses to the half dtype, which ours may lose too
                own_error = relative_error(_loss_and_grads(model.to(half), batch), expected)
                tolerance = max(tolerance, HALF_MARGIN * own_error)
    except Exception as failure:  # the model's own code cannot train on this small config here
        return dict.fromkeys(
            ops, f"its small random model does not train on a text batch: {first_line(failure, with_type=True)}"
        )
    called = {
        op: [(owner, name, make, o) for op_, owner, name, make, o in rows if op_ == op and (owner, name) in hits]
        for op in ops
    }
    with swapped_in(originals):
        # Every called op at once first, as they will train: one pass where all agree (the usual case).
        replaced = {(owner, name): make(kernels, o) for calls in called.values() for owner, name, make, o in calls}
        if len([op for op in ops if called[op]]) > 1 and _agrees(model, batch, replaced, expected, tolerance):
            return {op: None if called[op] else _never_called(op, rows) for op in ops}
        return {op: _verdict(model, batch, op, called[op], rows, kernels, expected, tolerance) for op in ops}


def _never_called(op: str, rows: list) -> str:
    return f"the model never calls {_names(op, rows)} on a text batch"


def _names(op: str, rows: list) -> str:
    return ", ".join(sorted({_describe(owner, name) for op_, owner, name, *_ in rows if op_ == op}))


def _agrees(model, batch, replaced: dict, expected, tolerance: float) -> bool:
    try:
        with swapped_in(replaced):
            return relative_error(_loss_and_grads(model, batch), expected) <= tolerance
    except Exception:  # one of them cannot take the call: each is checked alone
        return False


def _verdict(model, batch, op: str, called: list, rows: list, kernels, expected, tolerance: float) -> str | None:
    """None where ``op`` alone agrees with the model's own code, else why not."""
    if not called:
        return _never_called(op, rows)
    try:
        with swapped_in({(owner, name): make(kernels, o) for owner, name, make, o in called}):
            error = relative_error(_loss_and_grads(model, batch), expected)
    except Exception as failure:  # the op cannot take this model's call: it stays unpatched
        return f"fails against the model's own {_names(op, rows)}: {first_line(failure, with_type=True)}"
    return None if error <= tolerance else f"max rel error {error:.1e} against the model's own {_names(op, rows)}"


def _describe(owner, name: str) -> str:
    return f"{owner.__name__}.{name}" if inspect.isclass(owner) else name


def _unknown(keys) -> list[str]:
    """The keys answered neither in this process nor on disk (those on disk are brought into the process)."""
    unknown = [key for key in keys if key not in _memory]
    if unknown:
        disk = _read_disk()
        _memory.update({key: disk[key] for key in unknown if key in disk})
    return [key for key in keys if key not in _memory]


def _remember(answers: dict) -> None:
    _memory.update(answers)
    _write_disk(answers)


def verdicts(config, backend: str, kernels, rows: list, device, dtype=torch.float32) -> dict[str, str | None]:
    """``run``'s answers, from the caches where this exact check has run before (``dtype``: the one the
    model trains in)."""
    started = time.perf_counter()
    device = torch.device(device)
    originals = [row[4] for row in rows]
    ops = dict.fromkeys(row[0] for row in rows)
    keys = {op: _key(config, op, backend, device, originals, dtype) for op in ops}
    unknown = set(_unknown(keys.values()))
    missing = [op for op, key in keys.items() if key in unknown]
    if missing:
        found = run(config, backend, kernels, [row for row in rows if row[0] in missing], device, dtype)
        _remember({keys[op]: found[op] for op in missing})
    _seconds["total"] += time.perf_counter() - started
    return {op: _memory[key] for op, key in keys.items()}


def cached(config, name: str, backend: str, device: torch.device, originals: list, compute):
    """``compute()``'s answer for this check, from the process or disk cache where it ran before."""
    key = _key(config, name, backend, device, originals)
    if _unknown([key]):
        _remember({key: compute()})
    return _memory[key]


def check_seconds() -> float:
    """Seconds this process has spent in self-checks (near zero where every answer was cached)."""
    return _seconds["total"]
