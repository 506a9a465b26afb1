# Logging, backends and devices, and llama.cpp's RPC backend. Included by _core.pyx.

# ------------------------------------------------------------------------------------------------
# Logging: llama.cpp/ggml messages go to the Python logger "alpaca2.llama".  The level test is
# done in C first, so suppressed messages (the default: below WARNING) never take the GIL.

log = logging.getLogger("alpaca2.llama")


_EXPECTED_MESSAGES = (
    # an aborted decode (abort(), Ctrl+C) becomes an exception; llama.cpp's ERROR lines about it go
    "failed to compute graph, compute status: 1", "failed to decode, ret = 2",
    # Context(swa_full=True) is alpaca2's choice (KV reuse needs it), not a problem to warn about
    "using full-size SWA cache",
)


def _not_an_abort(record):
    """Drop llama.cpp's messages about what alpaca2 did on purpose (see _EXPECTED_MESSAGES)."""
    msg = record.getMessage()
    return not any(m in msg for m in _EXPECTED_MESSAGES)


log.addFilter(_not_an_abort)
cdef int _log_threshold = GGML_LOG_LEVEL_WARN
cdef int _log_last_level = GGML_LOG_LEVEL_INFO
_log_buffer = []
_PY_LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG, GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING, GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


cdef void _emit_log(int level, const char * text) noexcept with gil:
    try:
        _log_buffer.append(text.decode("utf-8", "replace"))
        joined = "".join(_log_buffer)
        if not joined.endswith("\n"):
            return
        _log_buffer.clear()
        for line in joined.rstrip("\n").split("\n"):
            log.log(_PY_LEVELS.get(level, logging.INFO), "%s", line)
    except BaseException:
        pass


cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    global _log_last_level
    cdef int lvl = level
    if lvl == GGML_LOG_LEVEL_CONT:
        lvl = _log_last_level
    else:
        _log_last_level = lvl
    if lvl >= _log_threshold and text != NULL:
        _emit_log(lvl, text)


def set_log_level(level):
    """Set the level of llama.cpp messages passed on to the logger "alpaca2.llama".

    ``level`` is a ``logging`` level (``logging.INFO`` shows load and context details;
    the default ``logging.WARNING`` keeps llama.cpp quiet unless something is wrong).
    """
    global _log_threshold
    level = logging._checkLevel(level)
    if level <= logging.DEBUG:
        _log_threshold = GGML_LOG_LEVEL_DEBUG
    elif level <= logging.INFO:
        _log_threshold = GGML_LOG_LEVEL_INFO
    elif level <= logging.WARNING:
        _log_threshold = GGML_LOG_LEVEL_WARN
    elif level <= logging.ERROR:
        _log_threshold = GGML_LOG_LEVEL_ERROR
    else:
        _log_threshold = GGML_LOG_LEVEL_ERROR + 10


def _enable_verbose():
    """verbose=True: show llama.cpp's INFO messages on stderr (as llama-cli does)."""
    set_log_level(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------
# Backends: built as modules next to this file and loaded once, quietly, at import.


cdef bint _backends_loaded = False


cdef _load_backends():
    global _backends_loaded, _log_threshold
    if _backends_loaded:
        return
    cdef bytes pkg = os.fsencode(_PKG_DIR)
    cdef const char * c_pkg = pkg
    cdef int saved = _log_threshold
    _log_threshold = GGML_LOG_LEVEL_ERROR + 10   # a CUDA module without a driver is not an error
    try:
        with nogil:
            ggml_backend_load_all_from_path(c_pkg)
            llama_backend_init()
    finally:
        _log_threshold = saved
    _backends_loaded = True


llama_log_set(_log_callback, NULL)
_load_backends()


def backends():
    """Names of the ggml backends loaded in this process (e.g. ['CPU'] or ['CUDA', 'CPU'])."""
    cdef size_t i
    return [ggml_backend_reg_name(ggml_backend_reg_get(i)).decode() for i in range(ggml_backend_reg_count())]


def devices():
    """The compute devices llama.cpp can use: a list of dicts (name, description, type, memory)."""
    cdef size_t i, free_mem, total_mem
    cdef ggml_backend_dev_t dev
    types = {GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
             GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
             GGML_BACKEND_DEVICE_TYPE_META: "meta"}
    out = []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        free_mem = total_mem = 0
        ggml_backend_dev_memory(dev, &free_mem, &total_mem)
        out.append({
            "name": ggml_backend_dev_name(dev).decode(),
            "description": ggml_backend_dev_description(dev).decode("utf-8", "replace"),
            "type": types.get(ggml_backend_dev_get_type(dev), "other"),
            "backend": ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)).decode(),
            "memory_free": free_mem,
            "memory_total": total_mem,
        })
    return out


def print_system_info():
    """llama.cpp's own system-info line (CPU features and backends)."""
    return llama_print_system_info().decode("utf-8", "replace")


def supports_gpu_offload():
    """True when a loaded backend can hold model layers on a GPU of this machine."""
    # not llama_supports_gpu_offload(): that is also true whenever the RPC backend is loaded
    return (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) != NULL or
            ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU) != NULL)


def supports_rpc():
    """True when this build has llama.cpp's RPC backend (Model(..., rpc_servers=[...]))."""
    return bool(llama_supports_rpc())


def supports_mmap():
    return bool(llama_supports_mmap())


def llama_cpp_version():
    """The version string llama.cpp reports for itself."""
    cdef const char * v = llama_version()
    return v.decode() if v != NULL else None

# ------------------------------------------------------------------------------------------------
# RPC: llama.cpp's RPC backend is a run-time module, so its entry points are looked up by name.

ctypedef ggml_backend_reg_t (*_rpc_add_server_t)(const char * endpoint) noexcept nogil
ctypedef void (*_rpc_start_server_t)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                     size_t n_devices, ggml_backend_dev_t * devices) noexcept nogil

RPC_PROTOCOL = (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)


cdef void * _rpc_proc(const char * name) except NULL:
    cdef ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC")
    if reg == NULL:
        raise Alpaca2Error("this alpaca2 was built without llama.cpp's RPC backend: rebuild it with "
                           "ALPACA2_RPC=1 pip install . (the default)")
    cdef void * fn = ggml_backend_reg_get_proc_address(reg, name)
    if fn == NULL:
        raise Alpaca2Error(f"the RPC backend has no {name.decode()}: a llama.cpp of another version?")
    return fn


cdef list _rpc_model_devices(list endpoints, double timeout):
    """The devices of each server (checked first: llama.cpp aborts on one it cannot reach), then the
    local ones: the GPUs llama.cpp would use, else the CPU.  Pointers as ints, in tensor_split order."""
    from alpaca2 import rpc
    cdef _rpc_add_server_t add_server = <_rpc_add_server_t>_rpc_proc(b"ggml_backend_rpc_add_server")
    cdef ggml_backend_reg_t reg
    cdef ggml_backend_dev_t dev
    cdef bytes c_endpoint
    cdef const char * c_endpoint_p
    cdef size_t i
    out = []
    for endpoint in endpoints:
        rpc.check_before_load(endpoint, timeout, major=RPC_PROTO_MAJOR_VERSION)
        c_endpoint = endpoint.encode()
        c_endpoint_p = c_endpoint
        with nogil:
            reg = add_server(c_endpoint_p)
        if reg == NULL:
            raise ModelLoadError(f"RPC server {endpoint} has no devices to offer")
        for i in range(ggml_backend_reg_dev_count(reg)):
            out.append(<size_t>ggml_backend_reg_dev_get(reg, i))
    gpus, igpus = [], []
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        if ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU:
            gpus.append(<size_t>dev)
        elif ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_IGPU:
            igpus.append(<size_t>dev)
    # as llama.cpp's default list: integrated GPUs only without a discrete one
    local = gpus or igpus or [<size_t>ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)]
    return out + local


def _rpc_start_server(str endpoint, cache_dir, size_t n_threads, list device_names):
    """ggml_backend_rpc_start_server: serves until the process ends; returns only on failure."""
    cdef _rpc_start_server_t start = <_rpc_start_server_t>_rpc_proc(b"ggml_backend_rpc_start_server")
    cdef ggml_backend_dev_t devs[64]
    cdef size_t i, n = 0
    cdef ggml_backend_dev_t dev
    names = {}
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        names[ggml_backend_dev_name(dev).decode()] = <size_t>dev
    if device_names:
        for name in device_names[:64]:
            if name not in names:
                raise ValueError(f"no device {name!r} here; there are {sorted(names)}")
            devs[n] = <ggml_backend_dev_t><size_t>names[name]
            n += 1
    else:
        # as llama.cpp's rpc-server: the accelerators, else the CPU
        for i in range(ggml_backend_dev_count()):
            dev = ggml_backend_dev_get(i)
            if n < 64 and ggml_backend_dev_get_type(dev) not in (GGML_BACKEND_DEVICE_TYPE_CPU,
                                                                  GGML_BACKEND_DEVICE_TYPE_ACCEL):
                devs[n] = dev
                n += 1
        if n == 0:
            devs[0] = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
            n = 1
    cdef bytes c_endpoint = endpoint.encode()
    cdef const char * c_endpoint_p = c_endpoint
    cdef bytes c_cache = os.fsencode(cache_dir) if cache_dir is not None else None
    cdef const char * c_cache_p = NULL
    if c_cache is not None:
        c_cache_p = c_cache
    with nogil:
        start(c_endpoint_p, c_cache_p, n_threads, n, devs)
    raise OSError(f"the RPC server could not serve on {endpoint} (see the message above: the port in use, "
                  "or an address that is not this host's)")
