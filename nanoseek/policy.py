"""RL's view of a causal LM (a nanoseek ``Transformer`` or any Hugging Face one): rollouts with their sampler
log-probs, and completion log-probs for the loss (EOS and truncation decided once, in ``Policy.sample``). Rows of a
``Batch`` that share a prompt (``prompt_index``) run it once into a cache copied to each row (gradients flow back
through the copies), then their completion tokens; the head sees only the real completion tokens, in chunks.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import MODEL_TYPES
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.transformer import Transformer


@dataclass(frozen=True)
class Batch:
    """N rows of prompt + completion tokens, grouped by prompt: prompt_ids (U, Tp) the distinct prompts, right-padded;
    prompt_lens (U,); prompt_index (N,) each row's prompt; completion_ids (N, L) right-padded; completion_mask (N, L)
    1 on real completion tokens (eos included). A GRPO group is the G rows that share a prompt index."""

    prompt_ids: torch.Tensor
    prompt_lens: torch.Tensor
    prompt_index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def build(cls, prompts: list[list[int]], prompt_index: list[int], completions: list[list[int]],
              pad_id: int) -> Batch:
        """``prompts``: the U distinct prompts; row i continues ``prompts[prompt_index[i]]`` with ``completions[i]``."""
        if len(prompt_index) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(prompt_index)} prompt indices")
        return cls(_right_pad(prompts, pad_id), torch.tensor([len(p) for p in prompts], dtype=torch.long),
                   torch.tensor(prompt_index, dtype=torch.long), _right_pad(completions, pad_id),
                   _right_pad([[1.0] * len(c) for c in completions], 0.0, torch.float32))

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_lens(self) -> torch.Tensor:
        return self.completion_mask.sum(1).long()

    def select(self, rows: torch.Tensor) -> Batch:
        """The sub-batch of ``rows`` and the prompts they use, trimmed to its own longest prompt and completion."""
        used, index = self.prompt_index[rows].unique(return_inverse=True)
        lens = self.prompt_lens[used]
        width = max(int(self.completion_mask[rows].sum(1).max()), 1) if len(rows) else 1
        return Batch(self.prompt_ids[used, : int(lens.max())], lens, index, self.completion_ids[rows, :width],
                     self.completion_mask[rows, :width])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def sequences(self, pad_id: int) -> torch.Tensor:
        """(N, T) right-padded prompt_i + completion_i: what a forward without prompt sharing runs."""
        plen = self.prompt_lens[self.prompt_index]
        T = int((plen + self.completion_lens).max())
        out = self.completion_ids.new_full((len(self), T), pad_id)
        for i, (p, n) in enumerate(zip(self.prompt_index.tolist(), self.completion_lens.tolist())):
            k = int(self.prompt_lens[p])
            out[i, :k] = self.prompt_ids[p, :k]
            out[i, k : k + n] = self.completion_ids[i, :n]
        return out

    def token_counts(self, shared: bool) -> tuple[int, int]:
        """(tokens a forward over this batch processes, real tokens among them), with or without prompt sharing."""
        comp = int(self.completion_mask.sum())
        if shared:
            return self.prompt_ids.numel() + self.completion_ids.numel(), int(self.prompt_lens.sum()) + comp
        plen = self.prompt_lens[self.prompt_index]
        return len(self) * int((plen + self.completion_lens).max()), int(plen.sum()) + comp


def _right_pad(rows: list[list], pad, dtype: torch.dtype = torch.long) -> torch.Tensor:
    out = torch.full((len(rows), max((len(r) for r in rows), default=1) or 1), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


@dataclass(frozen=True)
class Samples:
    """What a rollout sampled: completions (eos included when it stopped), truncated (hit ``max_tokens``
    without eos), and each token's log-prob under the sampling distribution."""

    completions: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]


def _left_pad(right_padded: torch.Tensor, lens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) right-padded rows of ``lens`` tokens -> left-padded ids and attention mask (N, T) (1 on real tokens)."""
    T = right_padded.shape[1]
    start = T - lens[:, None].to(right_padded.device)  # (N, 1) first real column after left-padding
    cols = torch.arange(T, device=right_padded.device)
    mask = cols >= start
    ids = right_padded.gather(1, (cols - start).clamp(min=0)).masked_fill(~mask, pad_id)
    return ids, mask.long()


def _token_logprobs(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    temperature: float, entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h: (N, D), targets: (N,) -> log p(target) (N,) in float32 under logits / temperature, and the entropy
    of that distribution (N,) without gradient when ``entropy`` (else an empty tensor): one head matmul for both."""
    logp = (F.linear(h, weight, bias).float() / temperature).log_softmax(-1)  # (N, V)
    ent = -(logp.detach().exp() * logp.detach()).sum(-1) if entropy else logp.new_empty(0)
    return logp.gather(-1, targets[:, None]).squeeze(-1), ent


class Policy:
    """Rollouts and completion log-probs of a nanoseek ``Transformer`` (its latent KV cache, ``nanoseek.generate``) or
    a Hugging Face causal LM (decoder, cache with left-padded prompts, ``generate``); ``self.nanoseek`` says which."""

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int | None, share_prompts: bool = True):
        self.model, self.pad_id, self.eos_id, self.share_prompts = model, pad_id, eos_id, share_prompts
        self.nanoseek = isinstance(model, Transformer)
        # a Hugging Face decoder's name for the cache to continue from ("cache" since transformers 5.2x, else
        # "past_key_values"); None when its forward cannot continue a cache at given positions
        params = {} if self.nanoseek else inspect.signature(model.get_decoder().forward).parameters
        self.cache_kwarg = None if "position_ids" not in params else next(
            (name for name in ("cache", "past_key_values") if name in params), None)

    @classmethod
    def load(cls, directory: str | Path, pad_id: int, eos_id: int | None, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> Policy:
        """A nanoseek (deepseek_v2/v3) or any Hugging Face causal-LM checkpoint directory."""
        config_file = Path(directory) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--model {directory}: no config.json; expected a nanoseek or Hugging Face "
                                    "checkpoint directory")
        if json.loads(config_file.read_text()).get("model_type") in MODEL_TYPES:
            model = Transformer.from_pretrained(directory, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, local_files_only=True)
        return cls(model.to(device), pad_id, eos_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def copy(self) -> Policy:
        """A frozen copy (the reference model)."""
        ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        return Policy(ref, self.pad_id, self.eos_id, self.share_prompts)

    def hidden_copy(self) -> nn.Module:
        """A copy of the model without its vocabulary head (nor MTP modules): a critic's backbone."""
        model = copy.deepcopy(self.model)
        if self.nanoseek:
            model.lm_head, model.mtp = nn.Identity(), nn.ModuleList()
        elif model.get_output_embeddings() is not model.get_input_embeddings():  # untied: the head is not needed
            model.set_output_embeddings(nn.Identity())
        return model

    def shares(self, batch: Batch) -> bool:
        """Whether ``completion_states`` runs each distinct prompt once for this batch."""
        can_share = self.nanoseek or self.cache_kwarg is not None
        return self.share_prompts and can_share and batch.prompt_index.unique().numel() < len(batch)

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None) -> Samples:
        """One completion per prompt (repeat a prompt for several), cut after its first eos; ``params``' stop fields
        are the policy's eos, and ``seed`` seeds the whole batch."""
        tokens, logps = self._generate(prompts, params, seed)
        n, eos = params.max_tokens, self.eos_id
        ends = [t.index(eos) + 1 if eos is not None and eos in t[:n] else min(len(t), n) for t in tokens]
        truncated = [not (eos is not None and eos in t[:n]) and len(t) >= n for t in tokens]
        return Samples([t[:e] for t, e in zip(tokens, ends)], [lp[:e] for lp, e in zip(logps, ends)], truncated)

    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  seed: int | None) -> tuple[list[list[int]], list[list[float]]]:
        """Raw sampled tokens (possibly past eos) and each one's log-prob under the distribution it was drawn from."""
        if self.nanoseek:
            from nanoseek.generate import generate  # looked up per call (tests script it)

            return generate(self.model, prompts, params.max_tokens, temperature=params.temperature,
                            top_k=params.top_k, top_p=params.top_p, seed=seed, return_logprobs=True,
                            stop_token_ids=() if self.eos_id is None else (self.eos_id,))
        ids, attn = _left_pad(_right_pad(prompts, self.pad_id), torch.tensor([len(p) for p in prompts]), self.pad_id)
        if seed is not None:
            torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        sample = params.temperature > 0
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), max_new_tokens=params.max_tokens,
            do_sample=sample, temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None, top_k=(params.top_k or 0) if sample else None,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, output_scores=True, return_dict_in_generate=True,
        )
        self.model.train(was_training)
        tokens = out.sequences[:, ids.shape[1] :]  # (B, steps)
        # scores are the processed logits each token was drawn from (temperature, top-k/p applied)
        logp = [s.float().log_softmax(-1).gather(-1, tokens[:, t, None])[:, 0] for t, s in enumerate(out.scores)]
        return tokens.tolist(), torch.stack(logp, 1).tolist()

    # ------------------------------------------------------------------ log-probs
    def completion_states(self, batch: Batch) -> torch.Tensor:
        """The final hidden state that predicts each completion token: (N, L, D); row i, column t predicts o_t."""
        if self.shares(batch):
            return self._shared_states(batch)
        ids = batch.sequences(self.pad_id)
        h = (self.model(ids, return_hidden=True) if self.nanoseek
             else self.model.get_decoder()(input_ids=ids).last_hidden_state)  # (N, T, D)
        L = batch.completion_ids.shape[1]
        plen = batch.prompt_lens[batch.prompt_index]
        pos = (plen[:, None] - 1 + torch.arange(L, device=h.device)).clamp(max=h.shape[1] - 1)
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # (N, L, D)

    def _shared_states(self, batch: Batch) -> torch.Tensor:
        """``completion_states``: each distinct prompt once into a cache copied to its rows, then the completions."""
        plen, L, rows = batch.prompt_lens, batch.completion_ids.shape[1], batch.prompt_index
        completions = batch.completion_ids[:, : L - 1]
        if self.nanoseek:
            cache = self.model.new_cache(len(plen), batch.prompt_ids.shape[1] + L)
            h = self.model(batch.prompt_ids, cache, input_lengths=plen, return_hidden=True)  # (U, Tp, D)
            first = h[rows, plen[rows] - 1]  # (N, D): the last prompt token predicts o_1
            if L == 1:
                return first[:, None]
            cache.select(rows)  # (N, ·): a copy of its prompt's cache per row
            rest = self.model(completions, cache, return_hidden=True)  # (N, L - 1, D)
        else:
            ids, mask = _left_pad(batch.prompt_ids, plen, self.pad_id)
            decoder = self.model.get_decoder()
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                          use_cache=True)
            first = out.last_hidden_state[rows, -1]  # (N, D)
            if L == 1:
                return first[:, None]
            cache = getattr(out, self.cache_kwarg)  # the output field has the argument's name
            cache.reorder_cache(rows)
            mask = torch.cat((mask[rows], mask.new_ones(len(rows), L - 1)), dim=1)
            pos = plen[rows][:, None] + torch.arange(L - 1, device=plen.device)
            rest = decoder(input_ids=completions, attention_mask=mask, position_ids=pos, use_cache=True,
                           **{self.cache_kwarg: cache}).last_hidden_state  # (N, L - 1, D)
        return torch.cat((first[:, None], rest), dim=1)

    def completion_logprobs(self, batch: Batch, *, temperature: float = 1.0, chunk_tokens: int = 1024,
                            entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π(o_t | q, o_<t) of every completion token (N, L) float32, 0 on padding, and entropies (N, L) without
        gradient or None. Only real tokens reach the head, ``chunk_tokens`` at a time (recomputed in backward)."""
        h = self.completion_states(batch)  # (N, L, D)
        real = batch.completion_mask.bool()
        hs, targets = h[real], batch.completion_ids[real]  # (M, D), (M,)
        head = self.model.lm_head if self.nanoseek else self.model.get_output_embeddings()
        fn = partial(checkpoint, _token_logprobs, use_reentrant=False) if hs.requires_grad else _token_logprobs
        parts = [fn(hs[s : s + chunk_tokens], targets[s : s + chunk_tokens], head.weight, head.bias, temperature,
                    entropy) for s in range(0, hs.shape[0], chunk_tokens)]
        out = h.new_zeros(real.shape, dtype=torch.float32)
        logp = out.masked_scatter(real, torch.cat([lp for lp, _ in parts])) if parts else out
        ent = (out.masked_scatter(real, torch.cat([en for _, en in parts])) if parts else out) if entropy else None
        return logp, ent
