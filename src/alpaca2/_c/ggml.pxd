# Declarations from ggml.h / ggml-backend.h / ggml-cpu.h: C names unchanged, nothing else.
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

cdef extern from "ggml-backend.h" nogil:
    ctypedef struct ggml_backend_reg:
        pass
    ctypedef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t
    ctypedef ggml_backend_device * ggml_backend_dev_t
    ctypedef void * ggml_backend_buffer_type_t
    ctypedef void * ggml_backend_t
    ctypedef void * ggml_backend_sched_eval_callback

    enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL
        GGML_BACKEND_DEVICE_TYPE_META

    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    # the C function shares its name with the enum: renamed in Cython only
    ggml_backend_dev_type ggml_backend_dev_get_type "ggml_backend_dev_type"(ggml_backend_dev_t device)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)

    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    size_t ggml_backend_reg_count()
    ggml_backend_reg_t ggml_backend_reg_get(size_t index)
    ggml_backend_reg_t ggml_backend_reg_by_name(const char * name)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)
    # a backend module's extra entry points (e.g. the RPC backend's), found by name
    void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name)
    ggml_backend_dev_t ggml_backend_dev_by_type(ggml_backend_dev_type type)
    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    ggml_backend_reg_t ggml_backend_load(const char * path)
    void ggml_backend_load_all_from_path(const char * dir_path)
