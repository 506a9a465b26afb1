// alpaca2's shim over llama.cpp's speculative drafters (common/speculative.h): the n-gram types that
// need no draft model (ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache), one
// common_speculative for all of a server's slots, as llama-server holds it.
//
// Every function is noexcept and checks what llama.cpp would GGML_ASSERT (a sequence id out of range,
// an accept without a draft), so bad calls come back as a status and a message, never an abort.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace alpaca2_spec {

enum status {
    STATUS_OK        = 0,
    STATUS_BAD_INPUT = 1,   // ValueError
    STATUS_INTERNAL  = 2,   // RuntimeError
};

// llama.cpp's common_params_speculative, n-gram part (its defaults, its flag names in the comments)
struct ngram_config {
    std::vector<int> types;           // common_speculative_type values, ngram-* only
    int simple_size_n   = 12;         // --spec-ngram-simple-size-n
    int simple_size_m   = 48;         // --spec-ngram-simple-size-m
    int simple_min_hits = 1;          // --spec-ngram-simple-min-hits
    int map_k_size_n    = 12;         // --spec-ngram-map-k-size-n
    int map_k_size_m    = 48;
    int map_k_min_hits  = 1;
    int map_k4v_size_n  = 12;         // --spec-ngram-map-k4v-size-n
    int map_k4v_size_m  = 48;
    int map_k4v_min_hits = 1;
    int mod_n_match     = 24;         // --spec-ngram-mod-n-match
    int mod_n_min       = 48;         // --spec-ngram-mod-n-min
    int mod_n_max       = 64;         // --spec-ngram-mod-n-max
    std::string lookup_cache_static;  // -lcs: an n-gram cache file (llama-lookup-create's), or ""
    std::string lookup_cache_dynamic; // -lcd: the same, read (never written, as in llama-server)
};

// The type names llama.cpp knows ("ngram-simple" ...) to its enum value; -1 when unknown.
int type_from_name(const std::string & name) noexcept;

struct speculator;

speculator * speculator_new(const ngram_config & config, uint32_t n_seq, std::string & error) noexcept;
void speculator_free(speculator * sp) noexcept;

// The most tokens one draft can hold (common_speculative_n_max).
int32_t speculator_n_max(const speculator * sp) noexcept;

// A new generation on sequence seq: prompt is what the cache holds (common_speculative_begin).
int speculator_begin(speculator * sp, int32_t seq, const int32_t * prompt, size_t n_prompt,
                     std::string & error) noexcept;

// Drafts after hist (the cache's tokens) and id_last (the token sampled last, not yet decoded):
// the first implementation that drafts anything wins, in llama.cpp's order; at most n_max tokens.
// Between begin() calls a sequence's history only grows: a shorter one is STATUS_BAD_INPUT.
int speculator_draft(speculator * sp, int32_t seq, const int32_t * hist, size_t n_hist, int32_t id_last,
                     int32_t n_max, std::vector<int32_t> & out, std::string & error) noexcept;

// n_accepted of the last draft were kept (common_speculative_accept); a no-op when that draft was empty.
int speculator_accept(speculator * sp, int32_t seq, int32_t n_accepted, std::string & error) noexcept;

}  // namespace alpaca2_spec
