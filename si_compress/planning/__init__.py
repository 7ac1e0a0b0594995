"""Pure planning: filter rankings (SI, L1, random), the SI planner -> CompressionPlan, and where to
truncate a plain chain (the SI peak)."""
from .importance import METHODS, Ranking, rank_filters
from .planner import PlannerConfig, block_si, plan_compression, plan_uniform, plan_with_widths, size_head
from .truncate import TruncationDecision, choose_truncation

__all__ = ["METHODS", "Ranking", "rank_filters", "PlannerConfig", "block_si", "plan_compression",
           "plan_uniform", "plan_with_widths", "size_head", "TruncationDecision", "choose_truncation"]
