# alpaca2's own C++ shim over llama.cpp's speculative drafters (src/alpaca2/_spec_shim.h).
from libc.stdint cimport int32_t, uint32_t
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "_spec_shim.h" namespace "alpaca2_spec" nogil:
    enum status:
        STATUS_OK
        STATUS_BAD_INPUT
        STATUS_INTERNAL

    cppclass ngram_config:
        vector[int] types
        int simple_size_n, simple_size_m, simple_min_hits
        int map_k_size_n, map_k_size_m, map_k_min_hits
        int map_k4v_size_n, map_k4v_size_m, map_k4v_min_hits
        int mod_n_match, mod_n_min, mod_n_max
        string lookup_cache_static, lookup_cache_dynamic

    int type_from_name(const string & name) noexcept

    cppclass speculator:
        pass
    speculator * speculator_new(const ngram_config & config, uint32_t n_seq, string & error) noexcept
    void speculator_free(speculator * sp) noexcept
    int32_t speculator_n_max(const speculator * sp) noexcept
    int speculator_begin(speculator * sp, int32_t seq, const int32_t * prompt, size_t n_prompt,
                         string & error) noexcept
    int speculator_draft(speculator * sp, int32_t seq, const int32_t * hist, size_t n_hist, int32_t id_last,
                         int32_t n_max, vector[int32_t] & out, string & error) noexcept
    int speculator_accept(speculator * sp, int32_t seq, int32_t n_accepted, string & error) noexcept
