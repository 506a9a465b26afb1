# Declarations from ggml-rpc.h: C names unchanged, nothing else.
#
# With GGML_BACKEND_DL the RPC backend is a module loaded at run time (libggml-rpc.so), so
# nothing links against these functions: alpaca2 reaches ggml_backend_rpc_add_server and
# ggml_backend_rpc_start_server through ggml_backend_reg_get_proc_address(reg "RPC", name).
from libc.stdint cimport uint32_t
from alpaca2._c.ggml cimport c_bool
from alpaca2._c.ggml_backend cimport (
    ggml_backend_t, ggml_backend_reg_t, ggml_backend_dev_t, ggml_backend_buffer_type_t,
)

cdef extern from "ggml-rpc.h" nogil:
    enum:
        RPC_PROTO_MAJOR_VERSION
        RPC_PROTO_MINOR_VERSION
        RPC_PROTO_PATCH_VERSION
        GGML_RPC_MAX_SERVERS

    ggml_backend_t ggml_backend_rpc_init(const char * endpoint, uint32_t device)
    c_bool ggml_backend_is_rpc(ggml_backend_t backend)
    ggml_backend_buffer_type_t ggml_backend_rpc_buffer_type(const char * endpoint, uint32_t device)
    void ggml_backend_rpc_get_device_memory(const char * endpoint, uint32_t device, size_t * free, size_t * total)
    void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
                                       size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices)
    ggml_backend_reg_t ggml_backend_rpc_reg()
    ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)
