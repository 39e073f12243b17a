"""Seed 003, "Import": UnslothTrainer and UnslothTrainingArguments, or, equivalently after the import,
TRL's own SFTTrainer and SFTConfig, which now are fusetune's classes.
"""

from fusetune.compat.unsloth import UnslothTrainer, UnslothTrainingArguments  # was: from unsloth import ...

# Or equivalently after import unsloth:
from trl import SFTTrainer, SFTConfig  # Patched by fusetune

assert SFTTrainer is UnslothTrainer and SFTConfig is UnslothTrainingArguments
print(f"trl.SFTTrainer is {SFTTrainer.__module__}.{SFTTrainer.__name__}")
