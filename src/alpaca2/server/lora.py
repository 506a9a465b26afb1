"""LoRA adapters in the server, as llama-server has them: ``--lora FNAME`` / ``--lora-scaled
FNAME:SCALE`` load adapters at start-up (scale 1, or the given one; 0 with
``--lora-init-without-apply``), ``GET /lora-adapters`` lists them, ``POST /lora-adapters`` sets the
global scales, and a request's own ``"lora": [{"id": i, "scale": s}]`` overrides them for that
request (adapters it does not list get scale 0).

One context decodes every slot and llama.cpp applies one set of adapters to a whole decode, so, as
llama-server's ``can_batch_with``, a step batches only the slots whose scales are those of the
oldest running request; the others wait for a later step (requests with different scales are
serialized, requests with the same scales are batched).  A slot's KV cache was computed with its
request's scales: a request with other scales does not reuse it.  (Speculative decoding runs with
-np 1 only: its rounds follow the prompt's decode, which set the request's scales.)
"""
from __future__ import annotations

import math

from alpaca2._core import LoraAdapter
from alpaca2.server.validation import bad


class LoraSet:
    """The server's adapters, their global scales, and what the decode thread has applied.

    Read by the event loop (listing, parsing, POST) and by the decode thread (``launch``,
    ``batchable``); ``scales`` is replaced as a whole tuple, never changed in place."""

    def __init__(self, model=None, specs=(), apply=True):
        self.adapters: list[LoraAdapter] = []
        try:
            for path, _ in specs:
                self.adapters.append(LoraAdapter(model, path))
        except BaseException:
            for a in self.adapters:
                a.close()
            raise
        self.scales = tuple(float(s) if apply else 0.0 for _, s in specs)   # the global scales
        self._kv: dict[int, tuple] = {}     # seq_id -> the scales its KV cache was computed with
        self._applied = (None, ())          # (context, scales) the context has on

    def __len__(self):
        return len(self.adapters)

    def listing(self) -> list:
        """GET /lora-adapters: id, path, global scale, and the adapter's task name and prompt prefix."""
        out = []
        for i, (a, scale) in enumerate(zip(self.adapters, self.scales)):
            md = a.metadata
            out.append({"id": i, "path": a.path, "scale": scale,
                        "task_name": md.get("adapter.lora.task_name", ""),
                        "prompt_prefix": md.get("adapter.lora.prompt_prefix", "")})
        return out

    def parse(self, entries, field="lora") -> dict | None:
        """{id: scale} from a list of {"id": i, "scale": s} (None when absent or empty: the global
        scales).  An id that is no loaded adapter, or a scale that is no finite number, is a 400."""
        if entries is None:
            return None
        if not isinstance(entries, list):
            raise bad(f"'{field}' must be an array of objects with 'id' and 'scale' fields", field)
        out = {}
        for e in entries:
            if not isinstance(e, dict):
                raise bad(f"'{field}' must be an array of objects with 'id' and 'scale' fields", field)
            i, scale = e.get("id"), e.get("scale", 0.0)
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.adapters):
                have = f"ids 0 to {len(self.adapters) - 1}" if self.adapters else "none (start with --lora)"
                raise bad(f"'{field}': no LoRA adapter with id {i!r}; loaded: {have}", field)
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
                raise bad(f"'{field}': the scale of adapter {i} must be a finite number, not {scale!r}", field)
            out[i] = float(scale)
        return out or None

    def set_global(self, entries):
        """POST /lora-adapters: the listed adapters get their scales, the others 0 (llama-server's)."""
        if not isinstance(entries, list):
            raise bad("Request body must be an array of objects with 'id' and 'scale' fields")
        chosen = self.parse(entries, "body") or {}
        self.scales = tuple(chosen.get(i, 0.0) for i in range(len(self.adapters)))

    def scales_for(self, request: dict | None) -> tuple:
        """A request's scales: its own (unlisted adapters 0), else the global ones."""
        if not request:
            return self.scales
        return tuple(request.get(i, 0.0) for i in range(len(self.adapters)))

    # -- the decode thread ----------------------------------------------------------------------
    def kv_key(self, slot) -> tuple:
        """The scales slot's KV cache was computed with (the prompt cache keys its states by them)."""
        return self._kv.get(slot.seq_id, self.scales) if self.adapters else ()

    def launch(self, slot, job):
        """A job takes a slot: its scales are fixed now (llama-server's launch_slot_with_task), and a
        KV cache computed with other scales is not reused."""
        if not self.adapters:
            return
        job.lora_scales = self.scales_for(getattr(job, "lora", None))
        if self._kv.get(slot.seq_id, job.lora_scales) != job.lora_scales:
            slot.tokens = []            # the engine's _start then drops the whole sequence
        self._kv[slot.seq_id] = job.lora_scales

    def batchable(self, ctx, busy: list) -> list:
        """The busy slots that go into this step's batch: those with the oldest request's scales,
        which the context gets (llama-server applies one slot's adapters per batch)."""
        if not self.adapters or not busy:
            return busy
        lead = min(busy, key=lambda s: s.job.t_submit).job.lora_scales
        if self._applied[0] is not ctx or self._applied[1] != lead:   # (after sleep: a new context)
            for adapter, scale in zip(self.adapters, lead):
                if scale != 0.0:        # llama.cpp leaves out zero-scale adapters anyway
                    adapter.apply(ctx, scale)
                else:
                    adapter.remove(ctx)
            self._applied = (ctx, lead)
        return [s for s in busy if s.job.lora_scales == lead]

    def request_fields(self, job) -> list:
        """The job's own "lora" as llama-server's generation_settings shows it."""
        return [{"id": i, "scale": s} for i, s in sorted((getattr(job, "lora", None) or {}).items())]
