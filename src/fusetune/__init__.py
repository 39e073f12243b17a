"""fusetune: fast, correct supervised fine-tuning on TRL.

Import it first: ``import fusetune`` makes ``trl.SFTTrainer`` and ``trl.SFTConfig`` fusetune's
FastSFTTrainer and FastSFTConfig, so plain TRL code gets the kernels and defaults too. FastDPOTrainer and
FastDPOConfig (TRL's DPO classes with the kernels and the fused preference loss) are imported by name:
``trl.DPOTrainer`` stays TRL's, whose fuller per-token metrics (entropy, logits/*) plain TRL code may read.
FastORPOTrainer, FastSimPOTrainer, FastCPOTrainer and FastKTOTrainer (and their configs) are TRL's own trainers
on fusetune's kernels (``fusetune.training.preference_variants``), imported when first named.
"""

__version__ = "0.1.0"

from .noise import drop_known_noise  # noqa: E402

drop_known_noise()  # before anything imports bitsandbytes

from .offline import hub_offline  # noqa: E402

hub_offline()  # decided once, before anything asks the hub (bitsandbytes fetches a CPU kernel at import)

from .compat.trl import point_trl_at  # noqa: E402
from .fast_model import FastModel  # noqa: E402
from .training.preference_trainer import FastDPOConfig, FastDPOTrainer  # noqa: E402
from .training.trainer import FastSFTConfig, FastSFTTrainer  # noqa: E402

FastLanguageModel = FastModel  # Unsloth's name; fusetune.compat.unsloth has the others
point_trl_at(FastSFTTrainer, FastSFTConfig)

PREFERENCE_VARIANTS = (
    "FastCPOConfig", "FastCPOTrainer", "FastKTOConfig", "FastKTOTrainer", "FastORPOConfig", "FastORPOTrainer",
    "FastSimPOConfig", "FastSimPOTrainer",
)  # fmt: skip


def __getattr__(name: str):
    if name in PREFERENCE_VARIANTS:  # TRL's experimental trainers are imported only when asked for
        from .training import preference_variants

        return getattr(preference_variants, name)
    raise AttributeError(f"module 'fusetune' has no attribute '{name}'")


__all__ = [
    "FastDPOConfig",
    "FastDPOTrainer",
    "FastLanguageModel",
    "FastModel",
    "FastSFTConfig",
    "FastSFTTrainer",
    "__version__",
    *PREFERENCE_VARIANTS,
]
