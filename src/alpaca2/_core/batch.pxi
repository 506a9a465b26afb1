# Batch: a llama_batch for decode_batch(). Included by _core.pyx.


@cython.final
cdef class Batch:
    """A llama_batch: tokens with positions, sequence ids and output flags, for decode_batch()."""

    def __cinit__(self, int capacity=512, int n_seq_max=1):
        self.owner = False
        if capacity <= 0 or n_seq_max <= 0:
            raise ValueError("capacity and n_seq_max must be positive")
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
        self.batch.n_tokens = 0

    def add(self, int token, int pos, seq_ids=(0,), bint logits=False):
        """Append one token at position pos for the given sequence ids."""
        cdef int i = self.batch.n_tokens
        cdef int j
        if i >= self.capacity:
            raise IndexError(f"batch is full ({self.capacity} tokens)")
        if isinstance(seq_ids, int):
            seq_ids = (seq_ids,)
        if not 0 < len(seq_ids) <= self.n_seq_max:
            raise ValueError(f"between 1 and {self.n_seq_max} sequence ids per token")
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
        return [self.batch.token[i] for i in range(self.batch.n_tokens)]
