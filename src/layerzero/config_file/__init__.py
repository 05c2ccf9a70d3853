"""Config and policy files: reading them, their schemas and their validation.

Modules, in the order data flows through them:

- ``load``: a path, YAML/JSON text or a mapping into plain data (``yaml.safe_load`` only), within size bounds.
- ``problems``: errors and warnings with their paths, raised together.
- ``validate``: field validators both schemas share (names, numbers, kernel ids, version, sections).
- ``rules``: policy-style rule entries (lock, allow / deny, boost) into policy rules.
- ``regex_check``: the restricted regular expressions of ``_match`` conditions.
- ``condition_keys``: a dispatch rule's ``conditions:`` mapping (``batch_size_gte: 8``) into a condition.
- ``schema``: the dispatch config file (``dispatch_rules``, ``kernel_locks``, ..., ``fallback_chains``).
- ``policy_document``: the policy document (``locks``, ``allows``, ``denies``, ``boosts``) of ``lz.configure``.

Both schemas compile into :class:`layerzero.policy.model.Policy` and type-check
conditions with :mod:`layerzero.policy.conditions`; nothing in the policy
package imports this one except ``lz.configure`` (and the old import paths
``layerzero.policy.document`` / ``layerzero.policy.config_schema``, kept as
re-exports).
"""
