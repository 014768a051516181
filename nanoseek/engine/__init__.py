"""nanoseek's one sampler (``generate()``, RL rollouts, ``nanoseek serve``): continuous batching, MTP drafts."""

from nanoseek.engine.engine import Engine, bytes_per_token, slots_for_budget
from nanoseek.engine.request import Detokenizer, Request
from nanoseek.engine.sampling import SamplingParams, log_probs, sample_rows

__all__ = ["Detokenizer", "Engine", "Request", "SamplingParams", "bytes_per_token", "log_probs", "sample_rows",
           "slots_for_budget"]
