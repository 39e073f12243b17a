"""Compatibility with code written for other libraries and older releases.

``fusetune.compat.unsloth`` takes Unsloth's names; ``fusetune.compat.renames`` holds the one table of
older TRL and transformers spellings that fusetune's classes still accept.
"""
