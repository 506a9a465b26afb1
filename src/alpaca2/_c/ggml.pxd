# Declarations from ggml.h: C names unchanged, nothing else (ggml-backend.h: ggml_backend.pxd).
from libc.stdint cimport int32_t, int64_t, uint32_t

cdef extern from "<stdbool.h>":
    # C's bool, for callback signatures (bint is an int)
    ctypedef bint c_bool "bool"

cdef extern from "ggml.h" nogil:
    enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_Q8_1
        GGML_TYPE_Q2_K
        GGML_TYPE_Q3_K
        GGML_TYPE_Q4_K
        GGML_TYPE_Q5_K
        GGML_TYPE_Q6_K
        GGML_TYPE_Q8_K
        GGML_TYPE_IQ4_NL
        GGML_TYPE_BF16
        GGML_TYPE_COUNT

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data) noexcept
    ctypedef c_bool (*ggml_abort_callback)(void * data) noexcept

    const char * ggml_type_name(ggml_type type)
