"""Old import path of the policy-document schema, kept as a re-export of :mod:`layerzero.config_file`.

Reading files lives in :mod:`layerzero.config_file.load`, the policy document's
schema in :mod:`layerzero.config_file.policy_document`, the shared validators
in :mod:`layerzero.config_file.validate` and :mod:`layerzero.config_file.rules`.
New code imports from there.
"""

from __future__ import annotations

from layerzero.config_file.load import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_NODES,
    parse_text,
    read_document,
    read_file_bounded,
)
from layerzero.config_file.policy_document import POLICY_SECTIONS, load_policy, validate_policy
from layerzero.config_file.problems import ConfigWarning, Problems, raise_problems
from layerzero.config_file.rules import boost_rule, filter_rule, lock_rule
from layerzero.config_file.validate import (
    MAX_NAME,
    MAX_RULES,
    SUPPORTED_VERSIONS,
    check_condition,
    check_kernel,
    check_keys,
    check_name,
    check_name_list,
    check_number,
    check_version,
    could_serve,
    is_glob,
    section_list,
    show,
    type_name,
)

__all__ = ["load_policy", "validate_policy", "read_document", "read_file_bounded", "parse_text", "Problems",
           "ConfigWarning", "MAX_DOCUMENT_BYTES", "SUPPORTED_VERSIONS", "POLICY_SECTIONS", "raise_problems",
           "MAX_NODES", "MAX_DEPTH", "MAX_NAME", "MAX_RULES", "check_condition", "check_kernel", "check_keys",
           "check_name", "check_name_list", "check_number", "check_version", "could_serve", "is_glob",
           "section_list", "show", "type_name", "lock_rule", "filter_rule", "boost_rule"]
