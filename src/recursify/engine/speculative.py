"""Lossless self-speculative decoding at batch 1: loop 1 drafts, the full depth verifies.

A token's residual stream at the end of loop 1 depends only on loop-1 keys/values of earlier
tokens (each unrolled position attends to its own position's cache). So the draft, which runs
the prelude and loop 1 for k tokens one at a time and predicts each next token from the loop-1
exit head, computes exactly the loop-1 states the full model would, and the verifier resumes
from those saved states: it runs loops 2..B (and the coda) over the k drafted inputs in ONE
pass and compares its greedy tokens with the drafts. The first mismatch is replaced by the full
model's token and the rest of the round is dropped, so the output is the full-depth greedy
output, token for token (as in LayerSkip / Draft & Verify, but with the recursive model's own
loop as the draft). Keys/values written for rejected drafts sit past the accepted length and are
overwritten by the next round.

`k=0` decodes one token at a time at full depth through the same code: the baseline to compare
with, free of any engine overhead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class SpeculativeStats:
    rounds: int = 0  # draft + verify rounds
    drafted: int = 0  # tokens proposed by loop 1
    accepted: int = 0  # drafts the full depth agreed with
    emitted: int = 0  # tokens produced (prefill's first token included)
    seconds: float = 0.0
    first_token_seconds: float = 0.0  # the prompt's full-depth pass
    per_round: list[int] = field(default_factory=list)  # tokens each round emitted

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SelfSpeculativeDecoder:
    """Greedy generation for one sequence; `k` drafted tokens per round (0: plain full depth)."""

    def __init__(self, model, k: int = 4):
        layout = model.layout
        if not layout.loopable or layout.num_loops < 2:
            raise ValueError("self-speculative decoding needs a recursive model with at least 2 loops (a cycle strategy)")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k (drafted tokens per round) must be a non-negative integer, got {k!r}")
        self.model = model.eval()
        self.k = k
        # The layout's own schedule: loop 1 (prelude included) drafts, the rest (coda included) verifies.
        self.draft_steps = layout.loop_steps(0)
        self.verify_steps = tuple(st for b in range(1, layout.num_loops) for st in layout.loop_steps(b))
        L = layout.num_layers
        self.device = model.embed_tokens.weight.device
        a = model.arch
        self._shape = (L, a.num_kv_heads, a.head_dim)

    def _run(self, h: torch.Tensor, start: int, steps) -> torch.Tensor:
        """The schedule's `steps` over tokens [start, start+T) of h [1, T, d], caching their k/v."""
        T = h.shape[1]
        model, k_cache, v_cache = self.model, self.k_cache, self.v_cache
        rope = model.rope(h, torch.arange(start, start + T, device=self.device).view(1, T))
        masks = model.build_masks(None, 1, T, start, self.device)

        def attend(q, k, v, position, is_sliding):
            k_cache[position, :, start : start + T] = k[0]
            v_cache[position, :, start : start + T] = v[0]
            keys = k_cache[position, :, : start + T].unsqueeze(0)
            values = v_cache[position, :, : start + T].unsqueeze(0)
            return model.attention_scores(q, keys, values, masks[is_sliding])

        for st in steps:
            h = model.layer_forward(st.slot, st.position, h, rope, attend)
        return h

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], SpeculativeStats]:
        """Greedy continuation of `prompt` (token ids), identical to full-depth greedy decoding."""
        if not prompt or max_new_tokens < 1:
            raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
        t0 = time.perf_counter()
        model, stats = self.model, SpeculativeStats()
        n_max = len(prompt) + max_new_tokens + self.k
        L, H, D = self._shape
        dtype = model.embed_tokens.weight.dtype
        self.k_cache = torch.zeros(L, H, n_max, D, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(L, H, n_max, D, dtype=dtype, device=self.device)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        h = self._run(self._run(model.embed(ids), 0, self.draft_steps), 0, self.verify_steps)
        out = [int(model.exit_logits(h[:, -1]).argmax(-1))]
        stats.first_token_seconds = time.perf_counter() - t0
        done = len(prompt)  # tokens whose k/v are cached at every position
        while len(out) < max_new_tokens:
            if self.k == 0:
                x = torch.tensor([[out[-1]]], dtype=torch.long, device=self.device)
                h = self._run(self._run(model.embed(x), done, self.draft_steps), done, self.verify_steps)
                out.append(int(model.exit_logits(h[:, -1]).argmax(-1)))
                done += 1
                continue
            # Draft: loop 1 over one token at a time; keep each input's loop-1 state.
            k = min(self.k, max_new_tokens - len(out))
            inputs, states = [out[-1]], []
            for i in range(k):
                x = torch.tensor([[inputs[-1]]], dtype=torch.long, device=self.device)
                s = self._run(model.embed(x), done + i, self.draft_steps)
                states.append(s)
                if i + 1 < k:
                    inputs.append(int(model.exit_logits(s[:, -1]).argmax(-1)))
            drafts = inputs[1:] + [int(model.exit_logits(states[-1][:, -1]).argmax(-1))]
            # Verify: the rest of the depth over all k inputs at once, from their loop-1 states.
            h = self._run(torch.cat(states, dim=1), done, self.verify_steps)
            full = model.exit_logits(h[0]).argmax(-1).tolist()
            j = 0
            while j < k and full[j] == drafts[j]:
                j += 1
            new = drafts[:j] + ([full[j]] if j < k else [])
            out.extend(new)
            done += len(new)
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += j
            stats.per_round.append(len(new))
        out = out[:max_new_tokens]
        stats.emitted = len(out)
        stats.seconds = time.perf_counter() - t0
        return out, stats
