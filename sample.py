"""
tinyseek/sample.py -- generate text from a checkpoint with MLA's compressed KV cache.
"""

import torch

from model import Transformer, sample_next


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_k: "int | None" = None, top_p: "float | None" = None, eos_id: "int | None" = None,
                   generator: "torch.Generator | None" = None,
                   attn_impl: "str | None" = None) -> tuple[list[list[int]], list[bool]]:
    """Sample continuations for prompts of different lengths in one batch, with the KV cache.

    Shorter prompts are left-padded and their padding slots masked out of attention (cache.key_mask);
    RoPE only sees relative positions, so a padded prompt computes exactly what it would alone.
    Returns (completions, finished): each completion's new tokens, ending with eos_id if it was produced
    (nothing after it), and whether it ended with eos_id before max_new_tokens ran out.
    """
    B, L = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token (start empty prompts with BOS)")
    device = model.embed.weight.device
    pad = eos_id if eos_id is not None else 0
    idx = torch.full((B, L), pad, dtype=torch.long, device=device)
    cache = model.new_cache(B, L + max_new_tokens, attn_impl)
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        cache.key_mask[b, :L - len(p)] = False                         # padding is never attended to
    logits = model(idx, cache=cache)[0][:, -1]                          # (B, V) prefill
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt == eos_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache)[0][:, -1]
    completions, finished = [], []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            completions.append(row[:row.index(eos_id) + 1])
            finished.append(True)
        else:
            completions.append(row)
            finished.append(False)
    return completions, finished
