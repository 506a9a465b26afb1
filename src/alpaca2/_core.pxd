# The cdef classes' fields, so other Cython code can `cimport alpaca2._core` and reach the raw
# llama.cpp handles (Model.ptr, Context.ptr, SamplerChain.ptr).
from libc.stdint cimport int32_t
from alpaca2._c.llama cimport (
    llama_model, llama_context, llama_vocab, llama_sampler, llama_batch, llama_memory_t, llama_token,
    llama_token_data,
)


cdef class Model:
    cdef llama_model * ptr
    cdef const llama_vocab * vocab
    cdef readonly str path
    cdef int32_t _n_vocab
    cdef object _dependents        # weakref.WeakSet of Contexts / samplers closed with the model
    cdef object _progress_error    # exception raised inside the progress callback
    cdef object _progress
    cdef object _rpc               # alpaca2.rpc.Connections when layers live on RPC servers, else None
    cdef object _lock              # RLock: every call that touches ptr/vocab, and close()
    cdef bint _closing             # close() has begun: no new dependents
    cdef readonly bint vocab_only
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef bint _rpc_gone(self)


cdef class Batch:
    cdef llama_batch batch
    cdef readonly int capacity
    cdef readonly int n_seq_max
    cdef bint owner
    cdef object _lock       # held by add/clear and by Context.decode_batch from its checks to the decode


cdef class Context:
    cdef llama_context * ptr
    cdef llama_memory_t mem
    cdef readonly Model model
    cdef Batch _batch
    cdef int _n_vocab
    cdef int _n_ctx
    cdef int _n_batch
    cdef int _n_seq_max
    cdef bint _embeddings
    cdef readonly str type_k          # the KV cache's types, as given ("f16", "q8_0", ...)
    cdef readonly str type_v
    cdef readonly bint kv_unified
    cdef readonly object flash_attn   # True, False or "auto" (as given; llama.cpp decides "auto")
    cdef int _flags                   # _ABORT (abort() was called) | _WATCH_SIGINT; read by the abort callback
    cdef object _lock                 # RLock: every call that touches ptr/mem, and close()
    cdef object _all_logits           # (n, n_vocab) float32 when decode(logits="all") spanned batches
    cdef int _n_outputs               # outputs of the last decode
    cdef bytes _out_flags             # per batch position of the last decode: has logits (None: all)
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef int _check_out(self, int idx) except -1
    cdef void _outputs_after_load(self)
    cdef int _decode_tokens(self, const llama_token * tokens, int n, int seq_id, bint all_logits) except -1


cdef class SeqCheckpoint:
    cdef readonly Context context     # the only context that may restore it
    cdef readonly int seq_id
    cdef readonly int n_pos           # positions the sequence held when it was taken
    cdef bytes _data                  # llama.cpp's state of the sequence, never handed out
    cdef readonly bint full           # the whole sequence (else its partial state: the recurrent part)


cdef class SamplerChain:
    cdef llama_sampler * ptr
    cdef bint owner
    cdef list _names
    cdef object _lock             # RLock: every call that touches ptr, and close()
    cdef list _models             # Models whose vocabulary a stage points into (grammar, logit_bias)
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef int _check_selects(self) except -1


cdef class Sampler(SamplerChain):
    cdef readonly dict params
    cdef object _model            # the Model the chain was built for (vocab-bound samplers)
    cdef llama_sampler * grmr     # the grammar, kept apart from the chain (common_sampler's grmr)
    cdef llama_token_data * _cur  # candidates buffer for sampling with the grammar
    cdef size_t _cur_cap
    cdef int _fast_k              # > 0: the chain may run over its top-k candidates only (_fastpick.h) ...
    cdef int _fast_m              # ... which m more tokens than k + 1 cover (penalty window, biased tokens)
    cdef int _n_pre               # the stages before top_k (logit_bias, penalties)
    cdef llama_token * _extra     # the biased tokens, which may rise from anywhere
    cdef int _n_extra
    cdef readonly unsigned long long _fast_picks   # how many picks took that path (tests)

    cdef llama_token_data * _candidates(self, int n) except NULL
    cdef llama_token _fast_pick(self, const float * logits, int n) except -3
    cdef int _accept_picked(self, llama_token tok) except -1
    cdef llama_token _sample_grammar(self, const float * logits, int n) except? -1
