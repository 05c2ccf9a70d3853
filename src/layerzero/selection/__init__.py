"""Selection: contexts, the pure selection engine, plans and plan caches."""

from __future__ import annotations

from layerzero.context import SelectionContext, bucket_pow2
from layerzero.selection.cache import MVCCPlanCache, PlanCache
from layerzero.selection.engine import CandidateDecision, Measurement, Selection, SelectionEngine
from layerzero.selection.plan import ExecutionPlan

__all__ = ["SelectionContext", "SelectionEngine", "Selection", "CandidateDecision", "Measurement", "ExecutionPlan",
           "PlanCache", "MVCCPlanCache", "bucket_pow2"]
