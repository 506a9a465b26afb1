"""Context checkpoints for recurrent and hybrid models (llama-server's --ctx-checkpoints).

A recurrent state cannot drop its last positions, so a slot whose next prompt shares only a prefix
with what it holds would decode it all again.  As llama-server does, a slot is checkpointed 4 +
n_ubatch and 4 tokens before each prompt's end (Context.checkpoint_seq: the recurrent part of its
state), and such a prompt starts from the latest checkpoint within the shared prefix.  The engine
(alpaca2.server.engine) calls these on its decode thread, for recurrent models only."""
from __future__ import annotations

from alpaca2.errors import Alpaca2Error


def cannot_drop_last(ctx) -> bool:
    """llama-server's check: can the cache drop its last positions?  A recurrent state cannot: its
    slots go back through checkpoints (a prompt that shares only a prefix, rejected drafts)."""
    ctx.decode([0, 0], seq_id=0)
    try:
        ctx.seq_rm(0, 1, -1)
        return False
    except ValueError:
        return True
    finally:
        ctx.seq_rm(0, 0, -1)


class Checkpoints:
    """The policy: where prompts are cut, what is kept (the slots hold their own checkpoints:
    (n_pos, SeqCheckpoint, the tokens before it, LoRA scales) in slot.checkpoints)."""

    def __init__(self, n_max: int, n_ubatch: int):
        self.n_max = n_max              # per slot; 0: none
        self.n_ubatch = n_ubatch

    def _places(self, slot):
        end = len(slot.job.tokens)
        return (end - 4 - self.n_ubatch, end - 4)

    def cut(self, slot, n: int) -> int:
        """How many of the slot's next n prompt tokens go into this batch: the chunk ends at a
        checkpoint's place."""
        if self.n_max > 0:
            for b in self._places(slot):
                if slot.prompt_pos < b < slot.prompt_pos + n:
                    return b - slot.prompt_pos
        return n

    def after(self, ctx, slot):
        """After a prompt chunk: checkpoint the slot if the chunk ended at a checkpoint's place."""
        if self.n_max <= 0 or not (0 < slot.prompt_pos < len(slot.job.tokens)) \
                or slot.prompt_pos not in self._places(slot):
            return
        n, tokens, lora = slot.prompt_pos, slot.tokens[:slot.prompt_pos], getattr(slot.job, "lora_scales", None)
        slot.checkpoints = [c for c in slot.checkpoints if not (c[0] == n and c[2] == tokens and c[3] == lora)]
        slot.checkpoints.append((n, ctx.checkpoint_seq(slot.seq_id), tokens, lora))
        del slot.checkpoints[:-self.n_max]

    @staticmethod
    def restore(ctx, slot, job, common: int) -> int:
        """The slot's state from its latest checkpoint within the prefix that job's prompt shares with
        what the slot holds (common tokens; same LoRA scales, this context): a checkpoint is the
        recurrent part only, a hybrid model's attention cells before it must be the slot's own.
        Returns the tokens the slot then holds, 0 when none fits (the sequence is emptied)."""
        lora = getattr(job, "lora_scales", None)
        for n, ck, tokens, ck_lora in sorted(slot.checkpoints, key=lambda c: -c[0]):
            if (n <= common and ck_lora == lora and ck.context is ctx and job.tokens[:n] == tokens
                    and slot.tokens[:n] == tokens):
                try:
                    ctx.restore_seq(ck, slot.seq_id)     # (it may come from another slot: the prompt cache)
                except (Alpaca2Error, ValueError):
                    break
                slot.tokens = list(tokens)
                return n
        ctx.seq_rm(slot.seq_id, 0, -1)
        return 0
