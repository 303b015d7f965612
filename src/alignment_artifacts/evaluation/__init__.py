"""Evaluation: yardsticks (metrics), model passes (passes), settings, prompt sets and the two sides
compared (sides), the four groups' comparison (groups), served models (remote), output (report)."""

from .groups import GROUPS, EvaluationResult, evaluate
from .metrics import (
    BROAD_MARKERS,
    REFUSAL_MARKERS,
    KLSummary,
    is_degenerate,
    is_refusal,
    kl_divergence,
    normalise,
    refusal_log_odds,
    refusal_opening_ids,
    summarise_kl,
)
from .passes import answer_perplexity, chat_texts, first_logits, generate_answers, generated_refusals
from .remote import EndpointSettings, evaluate_endpoint
from .report import format_table, plot_evaluation
from .sides import Baseline, EvaluationSettings, GroupSets, load_group_sets

__all__ = [
    "BROAD_MARKERS",
    "GROUPS",
    "REFUSAL_MARKERS",
    "Baseline",
    "EndpointSettings",
    "EvaluationResult",
    "EvaluationSettings",
    "GroupSets",
    "KLSummary",
    "answer_perplexity",
    "chat_texts",
    "evaluate",
    "evaluate_endpoint",
    "first_logits",
    "format_table",
    "generate_answers",
    "generated_refusals",
    "is_degenerate",
    "is_refusal",
    "kl_divergence",
    "load_group_sets",
    "normalise",
    "plot_evaluation",
    "refusal_log_odds",
    "refusal_opening_ids",
    "summarise_kl",
]
