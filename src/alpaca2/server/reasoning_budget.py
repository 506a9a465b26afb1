"""llama-server's thinking budget (--reasoning-budget N, --reasoning-budget-message, a request's
reasoning_budget_tokens / thinking_budget_tokens / reasoning_budget_message, Anthropic's
thinking.budget_tokens).

llama.cpp does it with a sampler of its common library (common/reasoning-budget.cpp) that
alpaca2's compiled extension does not expose, so here is the same state machine in Python,
around the job's sampler:

    IDLE --start tag--> COUNTING --N tokens--> (WAITING_UTF8) --> FORCING --> DONE --start tag--> COUNTING

- IDLE: watching the tokens for the template's start tag (``<think>``); the generation prompt is
  fed first, so a template that opens the thinking block itself starts in COUNTING.
- COUNTING: each thinking token spends one of the budget; an end tag (``</think>``) ends the block
  naturally (DONE).  Budget 0 forces the end at once.
- WAITING_UTF8: the budget is spent but the last token ended inside a UTF-8 character: wait for a
  token that completes one.
- FORCING: the message's tokens, then the first end tag's, are emitted one per step (llama.cpp
  sets every other logit to -inf; here the sampler is skipped and the token only enters its
  history, so a sampling chain's random draws differ from llama-server's after a forced end; greedy
  answers are the same).
- DONE: passthrough; a new start tag re-arms the budget (some models think more than once).

Reasoning control (a request's ``reasoning_control: true``): the budget is armed even without a
limit (budget -1 counts nothing), so ``POST /v1/chat/completions/control`` with
``{"id": <the completion's id>, "action": "reasoning_end"}`` can end a thinking block mid-way: a
counting budget goes to FORCING at the next token (llama.cpp's common_reasoning_budget_force).

One deliberate difference: with budget 0 and a template whose generation prompt opens the block
and goes on after the tag (``<think>\n``), llama.cpp feeds the tokens after the tag to the sampler
already in FORCING, and each of them skips one forced token: the end is never forced without a
message, and a message loses its first tokens (seen with llama-server at the vendored commit).
Here the prompt's tokens do not use up the forced ones: budget 0 ends the thinking at once.

Tags are matched as token sequences, as llama.cpp tokenizes them (special tokens parsed).
"""
from __future__ import annotations

IDLE, COUNTING, FORCING, WAITING_UTF8, DONE = "idle", "counting", "forcing", "waiting_utf8", "done"
MAX_BUDGET = (1 << 31) - 1


class TokenMatcher:
    """Which of some token sequences ends at the latest token (the longest), forgetting what was
    seen after each match (llama.cpp's Aho-Corasick token_matcher)."""

    def __init__(self, seqs):
        self.seqs = []
        for seq in seqs:
            seq = list(seq)
            if seq and seq not in self.seqs:
                self.seqs.append(seq)
        self.longest = max((len(s) for s in self.seqs), default=0)
        self.seen: list[int] = []

    def advance(self, token: int) -> int:
        """The index of the longest sequence that ends here, or -1."""
        self.seen.append(token)
        if len(self.seen) > self.longest:
            del self.seen[:len(self.seen) - self.longest]
        best = -1
        for i, seq in enumerate(self.seqs):
            if self.seen[-len(seq):] == seq and (best < 0 or len(seq) > len(self.seqs[best])):
                best = i
        if best >= 0:
            self.seen.clear()
        return best

    def reset(self):
        self.seen.clear()


def utf8_is_complete(piece: bytes) -> bool:
    """Whether the bytes end on a whole UTF-8 character (llama.cpp's common_utf8_is_complete)."""
    if not piece:
        return True
    for i in range(1, min(4, len(piece)) + 1):
        c = piece[-i]
        if c & 0xC0 != 0x80:
            expected = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2 if c >= 0xC0 else 1
            return i >= expected
    return False


class ReasoningBudget:
    """The job's sampler with a thinking budget: ``sample`` and ``accept`` as the sampler's.

    ``start`` and ``ends`` are token sequences of the template's thinking tags; ``forced`` is what
    ends a block whose budget is spent (the message's tokens, then the first end tag's)."""

    def __init__(self, sampler, start, ends, forced, budget: int, piece=None, prefill=()):
        self.sampler = sampler
        self.start = TokenMatcher([start])
        self.end = TokenMatcher(ends)
        self.forced = list(forced)
        self.budget = budget
        self.remaining = budget
        self.piece = piece              # token -> bytes, for the UTF-8 check (None: always complete)
        self.state = IDLE
        self.force_pos = 0
        self.forced_total = 0           # tokens this budget forced (for tests and logs)
        self.force_requested = False    # set by force() on the event loop, taken by the decode thread
        for tok in prefill:             # the generation prompt, as common_sampler_init feeds it
            if self.state != FORCING:   # (llama.cpp lets it use up the forced tokens: see below)
                self._advance(tok)

    def __getattr__(self, name):        # anything else the engine asks of the sampler
        return getattr(self.sampler, name)

    def force(self) -> bool:
        """End the thinking block now (reasoning control): only a block being counted can be; the
        decode thread switches at its next token."""
        if self.state != COUNTING:
            return False
        self.force_requested = True
        return True

    def sample(self, ctx, idx=-1) -> int:
        if self.force_requested:
            self.force_requested = False
            if self.state == COUNTING:
                self.state, self.force_pos = FORCING, 0
                self.end.reset()
        if self.state == FORCING and self.force_pos < len(self.forced):
            tok = self.forced[self.force_pos]
            self.sampler.accept(tok)    # the chain's history (penalties, grammar) sees it as sampled
            self.forced_total += 1
        else:
            tok = self.sampler.sample(ctx, idx)
        self._advance(tok)
        return tok

    def accept(self, token, *args, **kwargs):
        """A prompt token: the sampler's history only (llama.cpp feeds the budget generated tokens)."""
        return self.sampler.accept(token, *args, **kwargs)

    def _open(self):
        self.state, self.remaining = COUNTING, self.budget
        if self.remaining == 0:
            self.state, self.force_pos = FORCING, 0

    def _advance(self, tok: int):
        state = self.state
        if state in (IDLE, DONE):
            if self.start.advance(tok) >= 0:
                self.end.reset()
                self._open()
        elif state in (COUNTING, WAITING_UTF8):
            if self.end.advance(tok) >= 0:
                self.state = DONE
                return
            complete = self.piece is None or utf8_is_complete(self.piece(tok))
            if state == WAITING_UTF8:
                if complete:
                    self.state, self.force_pos = FORCING, 0
                    self.end.reset()
            elif self.budget >= 0:          # (-1: no limit, armed for reasoning control only)
                self.remaining -= 1
                if self.remaining <= 0:
                    self.state = FORCING if complete else WAITING_UTF8
                    self.force_pos = 0
                    self.end.reset()
        elif state == FORCING:
            self.end.advance(tok)
            self.force_pos += 1
            if self.force_pos >= len(self.forced):
                self.state = DONE


def budget_fields(body, default_budget: int, default_message: str) -> tuple[int, str]:
    """(budget, message) of a request: reasoning_budget_tokens (or thinking_budget_tokens), -1 for
    the server's --reasoning-budget; reasoning_budget_message, else --reasoning-budget-message."""
    from alpaca2.server.validation import bad
    key = "reasoning_budget_tokens" if body.get("reasoning_budget_tokens") is not None else "thinking_budget_tokens"
    budget = body.get(key)
    if budget is None:
        budget = -1
    if isinstance(budget, bool) or not isinstance(budget, int) or not -1 <= budget <= MAX_BUDGET:
        raise bad(f"'{key}' must be an integer from -1 (no budget) to {MAX_BUDGET}", key)
    if budget == -1:
        budget = default_budget
    message = body.get("reasoning_budget_message")
    if message is None:
        message = default_message
    if not isinstance(message, str):
        raise bad("'reasoning_budget_message' must be a string", "reasoning_budget_message")
    return budget, message


def control_of(body) -> bool:
    """A request's reasoning_control (llama-server's): arm the budget so the thinking can be ended."""
    from alpaca2.server.validation import bad
    control = body.get("reasoning_control", False)
    if not isinstance(control, bool):
        raise bad("'reasoning_control' must be true or false", "reasoning_control")
    return control


def with_budget(model, sampler, rendered: dict, budget: int, message: str, control: bool = False):
    """The sampler under a thinking budget, when there is one (or reasoning control asks for one)
    and the template has thinking tags (the formatter's thinking_start_tag / thinking_end_tags);
    else the sampler itself."""
    start_tag = rendered.get("thinking_start_tag") or ""
    end_tags = [t for t in rendered.get("thinking_end_tags") or () if t]
    if (budget < 0 and not control) or not start_tag or not end_tags:
        return sampler

    def tokens(text):
        return model.tokenize(text, add_bos=False, special=True)
    ends = [tokens(t) for t in end_tags]
    forced = (tokens(message) if message else []) + ends[0]
    prefill = []
    generation_prompt = rendered.get("generation_prompt") or ""
    if generation_prompt:
        prefill = tokens(generation_prompt)
        # as llama.cpp: a tokenizer's space before the first special token is not the prompt's
        if prefill and model.token_to_piece(prefill[0], special=True)[:1].isspace() \
                and not generation_prompt[:1].isspace():
            prefill = prefill[1:]
    return ReasoningBudget(sampler, tokens(start_tag), ends, forced, budget,
                           piece=lambda t: model.token_to_piece(t, special=False), prefill=prefill)
