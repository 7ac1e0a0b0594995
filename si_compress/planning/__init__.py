"""Pure planning: filter rankings (SI, L1, random) and the SI planner -> CompressionPlan."""
from .importance import METHODS, Ranking, rank_filters
from .planner import PlannerConfig, block_si, plan_compression, plan_uniform, plan_with_widths, size_head

__all__ = ["METHODS", "Ranking", "rank_filters", "PlannerConfig", "block_si", "plan_compression",
           "plan_uniform", "plan_with_widths", "size_head"]
