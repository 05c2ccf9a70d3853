"""Old import path of the dispatch config schema, kept as a re-export of :mod:`layerzero.config_file`.

The schema and its compilation live in :mod:`layerzero.config_file.schema`,
the ``conditions:`` mapping in :mod:`layerzero.config_file.condition_keys`, the
``_match`` regex check in :mod:`layerzero.config_file.regex_check`. New code
imports from there.
"""

from __future__ import annotations

from layerzero.config_file.condition_keys import (
    CONDITION_SUFFIXES,
    MAX_CONDITIONS,
    compile_conditions,
    split_condition_key,
)
from layerzero.config_file.regex_check import REGEX_LIMITS, compile_safe_regex
from layerzero.config_file.schema import (
    CHAIN_BAND,
    CONFIG_SECTIONS,
    MAX_CHAIN,
    RULE_BAND,
    CompiledConfig,
    CompiledRule,
    load_config,
    validate_config,
)

__all__ = ["CompiledConfig", "CompiledRule", "load_config", "validate_config", "compile_safe_regex",
           "CONFIG_SECTIONS", "CONDITION_SUFFIXES", "RULE_BAND", "CHAIN_BAND", "REGEX_LIMITS", "MAX_CHAIN",
           "MAX_CONDITIONS", "compile_conditions", "split_condition_key"]
