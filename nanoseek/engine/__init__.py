"""nanoseek's one sampler: continuous batching over the latent KV cache (used by ``generate()``, RL rollouts and
``nanoseek serve``), with MTP speculative decoding."""

from nanoseek.engine.engine import Engine, bytes_per_token, slots_for_budget
from nanoseek.engine.request import Detokenizer, Request
from nanoseek.engine.sampling import SamplingParams, log_probs, sample_rows

__all__ = ["Detokenizer", "Engine", "Request", "SamplingParams", "bytes_per_token", "log_probs", "sample_rows",
           "slots_for_budget"]
