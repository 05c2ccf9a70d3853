"""The policy condition grammar, one stage per module.

``lexer`` turns text into tokens, ``parser`` tokens into a syntax tree,
``checker`` type-checks a tree against ``fields`` and compiles it into a
predicate; ``limits`` holds the size bounds and the failure every stage
raises. :mod:`layerzero.policy.conditions` composes them into the public API
(``compile_condition``, ``compile_comparison``, ``Condition``).
"""
