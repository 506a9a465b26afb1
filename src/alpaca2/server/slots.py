"""llama-server's /slots/{id}?action=save|restore|erase: a slot's KV cache to a file and back.

A file is what llama_state_seq_save_file writes ('ggsq', version, the slot's tokens, its KV cache),
so llama-server's slot files restore here and ours there.  A file is checked before llama.cpp reads
it (alpaca2._state_check: header, sizes, positions, the model it belongs to); the action runs on
the decode thread once the slot is idle, as llama-server defers it while the slot is busy.
"""
from __future__ import annotations

import os
import time

from alpaca2 import _state_check
from alpaca2.errors import Alpaca2Error
from alpaca2.server.validation import APIError, bad

_FORBIDDEN = set(':*?"<>|/\\') | {"\ufeff", "\ufffd", "\uff0e", "\u2215", "\u2216"}


def valid_filename(name) -> bool:
    """llama.cpp's fs_validate_filename without subfolders: a plain name that stays in the folder."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > 255:
        return False
    for c in name:
        o = ord(c)
        if o <= 0x1F or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or c in _FORBIDDEN:
            return False
    return not (name[0] == " " or name[-1] in " ." or ".." in name or name == ".")


def _save(engine, path, filename):
    def run(slot):
        t0 = time.perf_counter()
        blob = engine.ctx.save_seq_state(slot.seq_id)
        try:
            n_bytes = _state_check.write_seq_state_file(path, slot.tokens, blob)
        except OSError as e:
            raise APIError(500, f"Unable to save slot: {e.strerror or e}", type="server_error") from None
        return {"id_slot": slot.seq_id, "filename": filename, "n_saved": len(slot.tokens), "n_written": n_bytes,
                "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}
    return run


def _restore(engine, path, filename):
    def run(slot):
        t0 = time.perf_counter()
        ctx = engine.ctx
        try:
            if not os.path.lexists(path):
                raise APIError(400, f"Unable to restore slot: no file {filename!r} in the slot save path")
            expect = _state_check.expectations(ctx)
            tokens, blob, info = _state_check.read_seq_state_file(path, expect)
            n_cells = info["n_cells"]
            if n_cells and (info["max_pos"] != n_cells - 1 or len(tokens) < n_cells):
                raise APIError(400, "Unable to restore slot: its KV cache does not hold its tokens from "
                               "position 0 on, one each")
            if n_cells > engine.n_ctx_slot:
                raise APIError(400, "Unable to restore slot: Restored prompt does not fit in the slot context")
            ctx.load_seq_state(blob, slot.seq_id)
        except Alpaca2Error as e:
            engine.forget(slot)
            raise APIError(400, f"Unable to restore slot: {e}") from None
        except BaseException:
            engine.forget(slot)
            raise
        slot.tokens = list(tokens[:n_cells])
        return {"id_slot": slot.seq_id, "filename": filename, "n_restored": len(slot.tokens),
                "n_read": os.path.getsize(path), "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}
    return run


def _erase(engine):
    def run(slot):
        n = len(slot.tokens)
        engine.forget(slot)
        return {"id_slot": slot.seq_id, "n_erased": n}
    return run


async def slot_action(server, id_slot: str, action, body) -> dict:
    """The /slots/{id} POST handler's work; raises APIError in llama-server's cases."""
    engine = server.engine
    if not server.slot_save_path:
        raise APIError(501, "This server does not support slots action. Start it with `--slot-save-path`",
                       type="not_supported_error", code="not_supported")
    try:
        seq_id = int(id_slot)
    except ValueError:
        raise bad("Invalid slot ID") from None
    if not 0 <= seq_id < engine.parallel:
        raise bad("Invalid slot ID")
    if action == "erase":
        return await engine.slot_action(seq_id, _erase(engine))
    if action not in ("save", "restore"):
        raise bad("Invalid action", "action")
    filename = body.get("filename") if isinstance(body, dict) else None
    if not valid_filename(filename):
        raise bad("Invalid filename", "filename")
    path = os.path.join(server.slot_save_path, filename)
    run = _save(engine, path, filename) if action == "save" else _restore(engine, path, filename)
    return await engine.slot_action(seq_id, run)
