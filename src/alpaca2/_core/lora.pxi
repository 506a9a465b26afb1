# LoRA adapters: llama_adapter_lora, loaded for a Model and applied to Contexts with a scale.
# Included by _core.pyx.

# Context -> {LoraAdapter: scale} applied to it; the dict holds the adapters, so one in use by a
# context is never freed under it (llama.cpp keeps raw pointers to them in the context).
_CONTEXT_LORAS = weakref.WeakKeyDictionary()


cdef int _set_context_loras(Context ctx, dict loras) except -1:
    """Make ``loras`` (LoraAdapter -> scale) the context's adapters (llama_set_adapters_lora)."""
    cdef size_t n = len(loras), i = 0
    cdef llama_adapter_lora ** ptrs = <llama_adapter_lora **>malloc(max(n, 1) * sizeof(llama_adapter_lora *))
    cdef float * scales = <float *>malloc(max(n, 1) * sizeof(float))
    cdef LoraAdapter a
    if ptrs == NULL or scales == NULL:
        free(ptrs)
        free(scales)
        raise MemoryError()
    try:
        for adapter, scale in loras.items():
            a = <LoraAdapter>adapter
            a._check()
            ptrs[i] = a.ptr
            scales[i] = <float>scale
            i += 1
        with ctx._lock:
            ctx._check()
            llama_set_adapters_lora(ctx.ptr, ptrs if n else NULL, n, scales if n else NULL)
    finally:
        free(ptrs)
        free(scales)
    if loras:
        _CONTEXT_LORAS[ctx] = loras
    else:
        _CONTEXT_LORAS.pop(ctx, None)
    return 0


@cython.no_gc_clear
cdef class LoraAdapter:
    """A LoRA adapter in llama.cpp's GGUF format (convert_lora_to_gguf.py), loaded for a Model.

        adapter = LoraAdapter(model, "chinese-alpaca-2-lora.gguf")
        adapter.apply(ctx, scale=1.0)      # the context's outputs now use W + scale*alpha/r * B@A
        adapter.remove(ctx)

    An adapter belongs to its model: closing the model closes it, and closing it takes it off
    every context it was applied to.  The KV cache keeps what was computed before a change:
    clear it (ctx.clear()) to recompute a prompt with the new weights.
    """
    cdef llama_adapter_lora * ptr
    cdef readonly Model model
    cdef readonly str path
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self.ptr = NULL

    def __init__(self, Model model not None, path):
        model._check()
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        _check_gguf_file(path)
        cdef bytes c_path = os.fsencode(path)
        cdef const char * c_path_p = c_path
        with nogil:
            self.ptr = llama_adapter_lora_init(model.ptr, c_path_p)
        if self.ptr == NULL:
            raise ModelLoadError(f"{path} is not a LoRA adapter for this model (llama.cpp refused it: "
                                 "general.type must be 'adapter', adapter.type 'lora', the architecture "
                                 "and tensor shapes the model's; Model(..., verbose=True) shows why)")
        self.model = model
        self.path = path
        model._dependents.add(self)

    cdef int _check(self) except -1:
        if self.ptr == NULL:
            _raise_closed("LoraAdapter")
        return 0

    def _contexts(self):
        return [c for c, loras in list(_CONTEXT_LORAS.items()) if self in loras]

    def apply(self, Context ctx not None, double scale=1.0):
        """Apply the adapter to ``ctx`` with ``scale`` (or change its scale there)."""
        self._check()
        ctx._check()
        if ctx.model is not self.model:
            raise ValueError("the adapter was loaded for another model than the context's")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale}")
        loras = dict(_CONTEXT_LORAS.get(ctx, {}))
        loras[self] = scale
        _set_context_loras(ctx, loras)
        return self

    def remove(self, Context ctx not None):
        """Take the adapter off ``ctx`` (nothing happens when it is not applied there)."""
        self._check()
        loras = dict(_CONTEXT_LORAS.get(ctx, {}))
        if loras.pop(self, None) is not None and ctx.ptr != NULL:
            _set_context_loras(ctx, loras)

    def scale_in(self, Context ctx not None):
        """The scale this adapter has in ``ctx``, or None when it is not applied there."""
        return _CONTEXT_LORAS.get(ctx, {}).get(self)

    @property
    def metadata(self):
        """The adapter's GGUF metadata (scalars) as strings."""
        self._check()
        cdef char buf[1024]
        cdef int32_t i, n = llama_adapter_meta_count(self.ptr)
        out = {}
        for i in range(n):
            if llama_adapter_meta_key_by_index(self.ptr, i, buf, sizeof(buf)) < 0:
                continue
            key = buf.decode("utf-8", "replace")
            if llama_adapter_meta_val_str_by_index(self.ptr, i, buf, sizeof(buf)) < 0:
                continue
            out[key] = buf.decode("utf-8", "replace")
        return out

    def close(self):
        """Take the adapter off every context and free it.  Safe to call twice."""
        if self.ptr == NULL:
            return
        for ctx in self._contexts():
            loras = dict(_CONTEXT_LORAS.get(ctx, {}))
            loras.pop(self, None)
            if (<Context>ctx).ptr != NULL:
                _set_context_loras(ctx, loras)
            elif not loras:
                _CONTEXT_LORAS.pop(ctx, None)
            else:
                _CONTEXT_LORAS[ctx] = loras
        if self.model is not None and self.model.ptr != NULL:
            llama_adapter_lora_free(self.ptr)
        self.ptr = NULL                         # else freed with its model by llama.cpp

    def __dealloc__(self):
        # an adapter applied to a context is held by _CONTEXT_LORAS, so here it is in no context
        if self.ptr != NULL and self.model is not None and self.model.ptr != NULL:
            llama_adapter_lora_free(self.ptr)
        self.ptr = NULL

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self.ptr == NULL

    def __repr__(self):
        return f"<alpaca2.LoraAdapter {self.path!r}{' (closed)' if self.ptr == NULL else ''}>"
