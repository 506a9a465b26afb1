# Batch: a llama_batch for decode_batch(). Included by _core.pyx.


# the most tokens a Batch holds (llama.cpp allocates a seq_id array per token)
MAX_BATCH = 1 << 20


@cython.final
cdef class Batch:
    """A llama_batch: tokens with positions, sequence ids and output flags, for decode_batch().

    Thread-safe: add() and clear() take the batch's lock, and Context.decode_batch() holds it from
    its range checks to the end of the decode, so another thread's add() waits instead of changing
    tokens that were already checked."""

    def __cinit__(self, capacity=512, n_seq_max=1):
        self.owner = False
        self._lock = threading.RLock()
        # llama_batch_init neither checks its sizes (capacity + 1 overflows) nor its mallocs
        capacity = _int_arg(capacity, "capacity", 1, MAX_BATCH)
        n_seq_max = _int_arg(n_seq_max, "n_seq_max", 1, <int>llama_max_parallel_sequences())
        self.batch = llama_batch_init(capacity, 0, n_seq_max)
        if self.batch.token == NULL:
            raise MemoryError()
        self.owner = True
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self.batch.n_tokens = 0

    def __dealloc__(self):
        if self.owner:
            llama_batch_free(self.batch)
            self.owner = False

    def __len__(self):
        return self.batch.n_tokens

    def clear(self):
        with self._lock:
            self.batch.n_tokens = 0

    def add(self, token, pos, seq_ids=(0,), bint logits=False):
        """Append one token at position pos for the given sequence ids."""
        cdef int i, j
        token = _int_arg(token, "token", 0, 0x7fffffff)     # against the vocabulary at decode_batch()
        pos = _int_arg(pos, "pos", 0, _POS_MAX)
        if isinstance(seq_ids, (int, np.integer)):
            seq_ids = (seq_ids,)
        seq_ids = [_int_arg(s, "seq_id", 0, <int>llama_max_parallel_sequences() - 1) for s in seq_ids]
        if not 0 < len(seq_ids) <= self.n_seq_max:
            raise ValueError(f"between 1 and {self.n_seq_max} sequence ids per token")
        with self._lock:
            i = self.batch.n_tokens
            if i >= self.capacity:
                raise IndexError(f"batch is full ({self.capacity} tokens)")
            self.batch.token[i] = token
            self.batch.pos[i] = pos
            self.batch.n_seq_id[i] = len(seq_ids)
            for j, s in enumerate(seq_ids):
                self.batch.seq_id[i][j] = s
            self.batch.logits[i] = logits
            self.batch.n_tokens = i + 1
        return i

    @property
    def tokens(self):
        with self._lock:
            return [self.batch.token[i] for i in range(self.batch.n_tokens)]
