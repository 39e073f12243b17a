"""The names of a multirun's job folders: one safe path component each, the swept overrides first.

``${fusetune.job_dir:NUM,OVERRIDES,EXCLUDE_KEYS}`` in conf/train.yaml (hydra.sweep.subdir) resolves through
``job_dirname``; ``register_resolvers`` is called by ``config.register_configs`` before Hydra composes anything,
so ``--cfg hydra --resolve`` works too.
"""

import hashlib
import os
import re

from omegaconf import DictConfig, OmegaConf

MAX_OVERRIDES_CHARS = 150  # folder names stay well under the 255 bytes of a path component
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%~-]+")  # path separators, spaces, quotes, brackets, globs, non-ASCII
# The keys this multirun sweeps, named first; set by AblationReport.on_multirun_start. An environment variable,
# so that the launcher's worker processes (joblib), which name their own job folders, inherit them.
SWEPT_ENV = "FUSETUNE_SWEPT_KEYS"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def set_swept(keys: list[str]) -> None:
    os.environ[SWEPT_ENV] = ",".join(keys)


def _swept() -> list[str]:
    return [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]


def job_dirname(num, overrides, exclude_keys=()) -> str:
    """`3_trainer=packing,seed=1,data.path=_tmp_a_train.jsonl`: the job number, then its overrides (the swept ones
    first, then the others in command-line order, leaving out exclude_keys), each run of unsafe characters made
    one `_`. Past MAX_OVERRIDES_CHARS it keeps the whole overrides that fit, then `~` and a hash of them all.
    The number makes it unique within the sweep; the report orders jobs by it."""
    items = [str(o) for o in overrides or () if _key(str(o)) not in set(exclude_keys or ())]
    swept = _swept()
    items.sort(key=lambda o: swept.index(_key(o)) if _key(o) in swept else len(swept))  # stable: the rest keep order
    safe = ",".join(filter(None, (UNSAFE.sub("_", o).strip("_") for o in items)))
    if len(safe) > MAX_OVERRIDES_CHARS:
        digest = hashlib.sha1(",".join(items).encode()).hexdigest()[:8]
        kept = safe[: MAX_OVERRIDES_CHARS - 9]
        kept = kept[: kept.rfind(",")] if "," in kept else kept  # whole overrides only, where there is one
        safe = f"{kept}~{digest}"
    return f"{num}_{safe}" if safe else str(num)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps: hydra.sweeper.params (experiment files) and sweep overrides (`seed=0,1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params") or {})]
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:  # Hydra has parsed them already; this only orders folder names
        parsed = []
    keys += [o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group not in keys]
    return keys


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fusetune.job_dir"):
        OmegaConf.register_new_resolver("fusetune.job_dir", job_dirname)
