"""Traffic sources for the serving engine: prompts drawn from real chat datasets (ShareGPT V3)."""

from aurora_rl.data.sharegpt import (
    DOMAINS,
    VALID_DOMAINS,
    Prompt,
    classify_domain,
    domain_counts,
    load_conversations,
    sample_prompts,
)

__all__ = [
    "DOMAINS",
    "VALID_DOMAINS",
    "Prompt",
    "classify_domain",
    "domain_counts",
    "load_conversations",
    "sample_prompts",
]
