"""One policy interface for RL over a nanoseek ``Transformer`` or any Hugging Face causal LM.

- ``completion_logprobs``: per-token log-probs (and optionally entropies) of the completion tokens only. The
  backbone runs once, over each distinct prompt once (a GRPO group's G rows share it through a cache) and over
  every row's completion; the vocabulary head is applied to the real completion tokens in chunks (each chunk
  under activation checkpointing when gradients are on), so full-vocabulary float32 logits never exist for the
  whole batch at once.
- ``rollout``: sampling through ``nanoseek.generate.generate`` (latent KV cache) for nanoseek models and through
  the model's own ``generate`` for Hugging Face models.

Sequences are laid out right-padded: row i is ``prompt_i + completion_i + pad``. Causal attention never lets a
real token see a pad, so no attention mask is needed for the unshared forward.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NANOSEEK_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass
class Batch:
    """Prompt + completion tokens of a rollout, right-padded.

    input_ids: (B, T) prompt_i + completion_i + pad; prompt_lens: (B,);
    completion_ids: (B, L) and completion_mask: (B, L) (1 on real completion tokens, eos included).
    """

    input_ids: torch.Tensor
    prompt_lens: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
              width: int | None = None) -> Batch:
        """``width`` pads completions to a fixed L (e.g. max_completion_length); default the longest."""
        B = len(prompts)
        L = max(width or 0, max((len(c) for c in completions), default=0), 1)
        T = max(len(p) + len(c) for p, c in zip(prompts, completions))
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        completion_ids = torch.full((B, L), pad_id, dtype=torch.long)
        completion_mask = torch.zeros(B, L)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[i, : len(c)] = 1.0
        return cls(input_ids, torch.tensor([len(p) for p in prompts]), completion_ids, completion_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | slice) -> Batch:
        """The sub-batch of ``rows``, trimmed to its own longest sequence."""
        ids, plen = self.input_ids[rows], self.prompt_lens[rows]
        cids, cmask = self.completion_ids[rows], self.completion_mask[rows]
        T = int((plen + cmask.sum(1).long()).max())
        return Batch(ids[:, :T], plen, cids, cmask)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.prompt_lens, self.completion_ids,
                                                self.completion_mask)))


def _token_logprobs(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    temperature: float, entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h: (N, D), targets: (N,) -> log p(target) (N,) in float32 under logits / temperature, and the entropy
    of that distribution (N,) without gradient when ``entropy`` (else an empty tensor): one head matmul for both."""
    logp = (F.linear(h, weight, bias).float() / temperature).log_softmax(-1)  # (N, V)
    ent = -(logp.detach().exp() * logp.detach()).sum(-1) if entropy else logp.new_empty(0)
    return logp.gather(-1, targets[:, None]).squeeze(-1), ent


def _prompt_groups(batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows with identical prompts -> (first row of each distinct prompt (U,), row -> its prompt's index (B,)),
    or None when every prompt is distinct (nothing to share)."""
    from nanoseek.generate import distinct_prompts

    prompts = [batch.input_ids[i, :n].tolist() for i, n in enumerate(batch.prompt_lens.tolist())]
    first_rows, row_to_prompt = distinct_prompts(prompts)
    if len(first_rows) == len(prompts):
        return None
    device = batch.input_ids.device
    return torch.tensor(first_rows, device=device), torch.tensor(row_to_prompt, device=device)


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token tensors -> left-padded ids (N, T) and attention mask (N, T) (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


class Policy:
    """A causal LM with the two things RL needs from it: completion log-probs and rollouts."""

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int | None, share_prompts: bool = True):
        self.model, self.pad_id, self.eos_id, self.share_prompts = model, pad_id, eos_id, share_prompts
        from nanoseek.model.transformer import Transformer

        self.is_nanoseek = isinstance(model, Transformer)

    @classmethod
    def load(cls, directory: str | Path, pad_id: int, eos_id: int | None, dtype: torch.dtype | None = None) -> Policy:
        """A nanoseek (deepseek_v2/v3) or any Hugging Face causal-LM checkpoint directory."""
        directory = Path(directory)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--model {directory}: no config.json; expected a nanoseek or Hugging Face "
                                    "checkpoint directory")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type in NANOSEEK_TYPES:
            from nanoseek.model.transformer import Transformer

            model = Transformer.from_pretrained(directory, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32,
                                                         local_files_only=True)
        return cls(model, pad_id, eos_id)

    # ------------------------------------------------------------------ pieces of the model
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def head(self) -> nn.Linear:
        return self.model.lm_head if self.is_nanoseek else self.model.get_output_embeddings()

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) right-padded -> final normed hidden states (B, T, D)."""
        if self.is_nanoseek:
            return self.model(input_ids, return_hidden=True)
        return self.model.get_decoder()(input_ids=input_ids).last_hidden_state

    def copy(self) -> Policy:
        """A frozen copy (the reference model)."""
        ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        return Policy(ref, self.pad_id, self.eos_id, self.share_prompts)

    # ------------------------------------------------------------------ log-probs
    def completion_states(self, batch: Batch) -> torch.Tensor:
        """The final hidden state that predicts each completion token: (B, L, D); row i, column t predicts o_t.

        Rows whose prompts are identical (the G completions of one GRPO group) share one forward pass over the
        prompt when ``share_prompts`` is on: the prompt's latent cache is computed once per distinct prompt, copied
        to its rows, and only the completion tokens run per row (gradients flow back through the copies).
        """
        groups = _prompt_groups(batch) if self.share_prompts and self._can_share() else None
        if groups is None:
            h = self.hidden(batch.input_ids)  # (B, T, D)
            L = batch.completion_ids.shape[1]
            pos = (batch.prompt_lens[:, None] - 1 + torch.arange(L, device=h.device)).clamp(max=h.shape[1] - 1)
            return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, D)
        first_rows, row_to_prompt = groups
        shared = self._shared_prompt_nanoseek if self.is_nanoseek else self._shared_prompt_hf
        first, rest = shared(batch, first_rows, row_to_prompt)  # (B, D), (B, L - 1, D) or None when L = 1
        return first[:, None] if rest is None else torch.cat((first[:, None], rest), dim=1)  # (B, L, D)

    def _can_share(self) -> bool:
        """Ours always; a Hugging Face decoder when its forward takes position ids and a cache to continue from."""
        return self.is_nanoseek or self._hf_cache_kwarg() is not None

    def _hf_cache_kwarg(self) -> str | None:
        """The decoder's name for the cache to continue from ("cache" since transformers 5.2x, else
        "past_key_values"), or None when its forward cannot continue a cache at given positions."""
        params = inspect.signature(self.model.get_decoder().forward).parameters
        if "position_ids" not in params:
            return None
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    def _shared_prompt_nanoseek(self, batch: Batch, first_rows: torch.Tensor, row_to_prompt: torch.Tensor):
        """Prompts (right-padded) once into a latent cache, copied per row; then the completions through it."""
        plen, L = batch.prompt_lens, batch.completion_ids.shape[1]
        width = int(plen[first_rows].max())
        cache = self.model.new_cache(len(first_rows), width + L)
        h_prompt = self.model(batch.input_ids[first_rows, :width], cache, input_lengths=plen[first_rows],
                              return_hidden=True)  # (U, width, D)
        first = h_prompt[row_to_prompt, plen - 1]  # (B, D): the last prompt token's state predicts o_1
        if L == 1:
            return first, None
        cache.select(row_to_prompt)  # (B, width + L, ·): a copy of its prompt's cache per row
        return first, self.model(batch.completion_ids[:, : L - 1], cache, return_hidden=True)  # (B, L - 1, D)

    def _shared_prompt_hf(self, batch: Batch, first_rows: torch.Tensor, row_to_prompt: torch.Tensor):
        """The same through a Hugging Face model's own cache: prompts left-padded, positions from the mask."""
        plen, L = batch.prompt_lens, batch.completion_ids.shape[1]
        ids, mask = _left_pad([batch.input_ids[i, : plen[i]] for i in first_rows.tolist()], self.pad_id)
        decoder, name = self.model.get_decoder(), self._hf_cache_kwarg()
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                      use_cache=True)
        first = out.last_hidden_state[row_to_prompt, -1]  # (B, D)
        if L == 1:
            return first, None
        cache = getattr(out, name)  # the output field has the argument's name
        cache.reorder_cache(row_to_prompt)
        mask = torch.cat((mask[row_to_prompt], mask.new_ones(len(batch), L - 1)), dim=1)
        pos = plen[:, None] + torch.arange(L - 1, device=plen.device)
        rest = decoder(input_ids=batch.completion_ids[:, : L - 1], attention_mask=mask, position_ids=pos,
                       use_cache=True, **{name: cache}).last_hidden_state  # (B, L - 1, D)
        return first, rest

    def completion_logprobs(self, batch: Batch, *, temperature: float = 1.0, chunk_tokens: int = 1024,
                            entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π(o_t | q, o_<t) for every completion token: (B, L) float32, 0 on padding; entropies (B, L) or None.

        Only the real completion tokens reach the head, ``chunk_tokens`` at a time; entropies carry no gradient.
        """
        h = self.completion_states(batch)  # (B, L, D)
        B, L = batch.completion_ids.shape
        real = batch.completion_mask.bool()
        hs, targets = h[real], batch.completion_ids[real]  # (N, D), (N,)
        head = self.head()
        logps, ents = [], []
        for s in range(0, hs.shape[0], chunk_tokens):
            hc, tc = hs[s : s + chunk_tokens], targets[s : s + chunk_tokens]
            args = (hc, tc, head.weight, head.bias, temperature, entropy)
            if torch.is_grad_enabled() and hc.requires_grad:  # recompute the chunk's logits in backward
                lp, en = checkpoint(_token_logprobs, *args, use_reentrant=False)
            else:
                lp, en = _token_logprobs(*args)
            logps.append(lp)
            ents.append(en)
        out = h.new_zeros(B, L, dtype=torch.float32)
        logp = out.masked_scatter(real, torch.cat(logps)) if logps else out
        ent = out.masked_scatter(real, torch.cat(ents)) if entropy and ents else (out if entropy else None)
        return logp, ent

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int | None = None, seed: int | None = None) -> list[list[int]]:
        """Sample one completion per prompt; each ends with eos if it stopped, else has ``max_new_tokens`` tokens."""
        stop = () if self.eos_id is None else (self.eos_id,)
        if self.is_nanoseek:
            from nanoseek.generate import generate

            outs = generate(self.model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=stop, seed=seed)
        else:
            outs = self._hf_generate(prompts, max_new_tokens, temperature, top_p, top_k, seed)
        return [self._finish(list(o), max_new_tokens) for o in outs]

    def _finish(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Cut after the first eos; a completion that stopped early without showing its eos gets it back."""
        if self.eos_id is None:
            return tokens[:max_new_tokens]
        if self.eos_id in tokens:
            return tokens[: tokens.index(self.eos_id) + 1]
        return tokens + [self.eos_id] if len(tokens) < max_new_tokens else tokens[:max_new_tokens]

    def _hf_generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                     top_k: int | None, seed: int | None) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded for generation
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        sample = temperature > 0
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=(top_k or 0) if sample else None, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )
        self.model.train(was_training)
        return out[:, width:].tolist()
