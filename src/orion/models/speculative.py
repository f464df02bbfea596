"""Exact speculative decoding: a small draft model proposes tokens, the target checks them all in one pass.

A decode program computes a bucket of 16 or 32 columns for one token; the drafted tokens fill the idle columns, so
checking K of them costs about one target step (reference section 5; the cost model's ``speculative_tok_s``). Each
round the draft proposes ``d1..dK`` from its distributions ``q``; the target's one pass over ``[t, d1..dK]`` gives
its distributions ``p`` at every position; ``d(i+1)`` is kept with probability ``min(1, p(d)/q(d))``, and at the first
refusal the next token is drawn from ``norm(max(0, p - q))`` instead (after K acceptances, from ``p`` at the last
position). Every token is then distributed exactly as the target alone would draw it (Leviathan et al., 2023; Chen
et al., 2023); under greedy decoding ``p`` and ``q`` are one-hot and the rule keeps a drafted token exactly when it
is the target's argmax. The target's keys and values are kept for the accepted positions only; the draft's cache is
rolled back to the same point.

The verify pass gives the logits one-token passes give, bit for bit (every column attends over the cache slots in
position order, the drafted keys placed into theirs: :meth:`orion.ir.builder.GraphBuilder.cached_attention`), so
greedy output is the target's token for token, near ties included.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from orion.errors import BindingError
from orion.models.lm import GenerationStats, TextGenerator

DEFAULT_DRAFT_TOKENS = 4


def accept_or_resample(p_rows, q_rows, drafted, sampler) -> tuple[int, int]:
    """The rejection rule over one round: ``p_rows`` ``[K+1, V]`` the target's distributions at each drafted
    position and the one after, ``q_rows`` ``[K, V]`` the draft's, ``drafted`` the K tokens drawn from them.
    Returns ``(a, token)``: the first ``a`` drafted tokens are kept and ``token`` follows them."""
    for i, token in enumerate(drafted):
        p, q = p_rows[i], q_rows[i]
        if sampler.uniform() * q[token] < p[token]:  # kept with probability min(1, p/q)
            continue
        residual = np.maximum(p - q, 0.0)
        return i, sampler.draw(residual if residual.sum() > 0 else p)  # p == q: never refused but for rounding
    return len(drafted), sampler.draw(p_rows[len(drafted)])


def speculative_ids(target: TextGenerator, draft: TextGenerator, ids, max_tokens: int = 64, sampler=None,
                    stop_ids=(), draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Iterator[int]:
    """Yield the target's new tokens, drafted ``draft_tokens`` at a time by ``draft`` (same vocabulary); the
    figures, with the drafted and accepted counts, end up in ``target.stats``."""
    import time

    from orion.models.sampling import Sampler
    from orion.runtime.program import backends_that_ran

    sampler = sampler or Sampler(temperature=0.0)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise BindingError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    if max_tokens < 0:
        raise BindingError(f"max_tokens must be >= 0, got {max_tokens}")
    if draft is target:
        raise BindingError("the draft must be another model object: a model's sessions share its programs' cache "
                           "(load the same weights twice to draft with the target itself)")
    history = [int(t) for t in np.asarray(ids).reshape(-1)]
    stats = GenerationStats(prompt_tokens=len(history))
    target.stats = stats
    if max_tokens == 0:
        return
    before = [target.built(), draft.built()]
    t0 = time.perf_counter()
    session, logits = target.start(history, max_tokens)
    drafting, draft_logits = draft.start(history, max_tokens)
    if draft_logits.shape != logits.shape:
        raise BindingError(f"the draft's vocabulary ({draft_logits.shape[-1]} tokens) is not the target's "
                           f"({logits.shape[-1]}): a draft must share the target's tokenizer")
    token = sampler.sample(logits)
    stats.prefill_seconds = time.perf_counter() - t0
    stats.dispatches_per_token = session.dispatches
    t1 = time.perf_counter()
    try:
        produced = [token]
        while produced:
            for token in produced:  # the round's tokens: each is the target's, in order
                history.append(token)
                stats.new_tokens += 1
                yield token
                if token in stop_ids or stats.new_tokens == max_tokens:
                    return
            pos = session.length  # where ``token`` goes
            if pos >= session.end:
                return
            k = min(draft_tokens, session.columns - 1, session.end - pos - 1, max_tokens - stats.new_tokens - 1,
                    drafting.end - pos)
            drafted, q_rows = [], []
            if k > 0:
                while drafting.length < pos:  # tokens the draft has not seen (the last round's final one)
                    drafting.step(history[drafting.length])
                t = token
                for _ in range(k):
                    q = sampler.probabilities(drafting.step(t))
                    t = sampler.draw(q)
                    drafted.append(t)
                    q_rows.append(q)
            p_rows = [sampler.probabilities(row) for row in session.feed([token, *drafted])]
            accepted, following = accept_or_resample(p_rows, q_rows, drafted, sampler)
            session.commit(accepted + 1)
            if k > 0:
                drafting.rollback(min(pos + accepted + 1, drafting.length))
            stats.decode_steps += 1
            stats.drafted += k
            stats.accepted += accepted
            produced = drafted[:accepted] + [following]
    finally:
        stats.decode_seconds = time.perf_counter() - t1
        stats.backend = backends_that_ran(session.programs + drafting.programs)
        after = [target.built(), draft.built()]  # the draft's programs are this generation's too
        stats.compiles = sum(a[0] - b[0] for a, b in zip(after, before))
        stats.cache_hits = sum(a[1] - b[1] for a, b in zip(after, before))
