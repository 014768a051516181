"""nanoseek's one sampler: continuous batching over the latent KV cache (used by ``generate()``, RL rollouts and
``nanoseek serve``), with MTP speculative decoding. See ``engine.py`` for the step, ``request.py`` for a request's
life, ``sampling.py``."""

from nanoseek.engine.detokenize import Detokenizer
from nanoseek.engine.engine import Engine, bytes_per_token, slots_for_budget
from nanoseek.engine.request import Request
from nanoseek.engine.sampling import SamplingParams, log_probs, sample_rows

__all__ = ["Detokenizer", "Engine", "Request", "SamplingParams", "bytes_per_token", "log_probs", "sample_rows",
           "slots_for_budget"]
