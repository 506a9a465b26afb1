// alpaca2's shim over llama.cpp's speculative drafters: see _spec_shim.h.
#include "_spec_shim.h"

#include "common.h"
#include "speculative.h"

#include "ngram-cache.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <fstream>
#include <new>

namespace alpaca2_spec {

struct speculator {
    common_speculative_ptr spec;
    uint32_t n_seq = 0;
    std::vector<llama_tokens> prompt;   // per sequence: what draft() reads (llama-server's slot.spec_prompt)
    std::vector<llama_tokens> result;   // per sequence: the last draft
    std::vector<size_t> n_last;         // per sequence: the last draft's length (0: accept is a no-op)
    std::vector<size_t> n_floor;        // per sequence: the history since begin() only grows (ngram-map asserts it)
};

namespace {

template <typename F>
int guarded(std::string & error, F && fn) noexcept {
    try {
        return fn();
    } catch (const std::bad_alloc &) {
        error = "out of memory";
    } catch (const std::exception & e) {
        error = e.what();
    } catch (...) {
        error = "unknown C++ exception in llama.cpp's speculative drafters";
    }
    return STATUS_INTERNAL;
}

bool is_ngram(int t) {
    return t == COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE || t == COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K ||
           t == COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V || t == COMMON_SPECULATIVE_TYPE_NGRAM_MOD ||
           t == COMMON_SPECULATIVE_TYPE_NGRAM_CACHE;
}

bool in(int v, int lo, int hi) { return lo <= v && v <= hi; }

int check_seq(const speculator * sp, int32_t seq, std::string & error) {
    if (sp == nullptr || !sp->spec) {
        error = "the speculator is closed";
        return STATUS_BAD_INPUT;
    }
    if (seq < 0 || (uint32_t) seq >= sp->n_seq) {
        error = "sequence id " + std::to_string(seq) + " out of range [0, " + std::to_string(sp->n_seq) + ")";
        return STATUS_BAD_INPUT;
    }
    return STATUS_OK;
}

// What common_ngram_cache_load would GGML_ASSERT, checked first: records of an n-gram
// (LLAMA_NGRAM_MAX tokens), a count n > 0, then n (token, count > 0) pairs, up to the end of the file.
bool check_cache_file(const std::string & path, std::string & error) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        error = "cannot open the lookup cache " + path;
        return false;
    }
    int32_t ngram[LLAMA_NGRAM_MAX];
    int32_t pair[2];
    int32_t n = 0;
    for (size_t rec = 0;; ++rec) {
        if (!f.read(reinterpret_cast<char *>(ngram), sizeof(ngram))) {
            return true;        // the end (a cut-off n-gram at the end is skipped by llama.cpp too)
        }
        if (!f.read(reinterpret_cast<char *>(&n), sizeof(n)) || n <= 0) {
            error = "the lookup cache " + path + " is not an n-gram cache (record " + std::to_string(rec) +
                    ": no token count)";
            return false;
        }
        for (int32_t i = 0; i < n; ++i) {
            if (!f.read(reinterpret_cast<char *>(pair), sizeof(pair)) || pair[1] <= 0) {
                error = "the lookup cache " + path + " is not an n-gram cache (record " + std::to_string(rec) +
                        ": a token count cut off or not positive)";
                return false;
            }
        }
    }
}

}  // namespace

int type_from_name(const std::string & name) noexcept {
    try {
        const int t = common_speculative_type_from_name(name);
        return t == COMMON_SPECULATIVE_TYPE_COUNT ? -1 : t;
    } catch (...) {
        return -1;
    }
}

speculator * speculator_new(const ngram_config & c, uint32_t n_seq, std::string & error) noexcept {
    speculator * out = nullptr;
    guarded(error, [&]() {
        // the ranges llama.cpp's argument parser enforces (common/arg.cpp)
        const bool ok = n_seq >= 1 && n_seq <= 4096 && !c.types.empty() &&
            in(c.simple_size_n, 1, 1024) && in(c.simple_size_m, 1, 1024) && in(c.simple_min_hits, 1, 65535) &&
            in(c.map_k_size_n, 1, 1024) && in(c.map_k_size_m, 1, 1024) && in(c.map_k_min_hits, 1, 65535) &&
            in(c.map_k4v_size_n, 1, 1024) && in(c.map_k4v_size_m, 1, 1024) && in(c.map_k4v_min_hits, 1, 65535) &&
            in(c.mod_n_match, 1, 1024) && in(c.mod_n_min, 0, 1024) && in(c.mod_n_max, 0, 1024);
        if (!ok) {
            error = "speculative n-gram settings out of range";
            return (int) STATUS_BAD_INPUT;
        }
        common_params_speculative p;
        p.types.clear();
        for (int t : c.types) {
            if (!is_ngram(t)) {
                error = "not an n-gram speculative type: " + std::to_string(t);
                return (int) STATUS_BAD_INPUT;
            }
            p.types.push_back((common_speculative_type) t);
        }
        p.ngram_simple  = {(uint16_t) c.simple_size_n, (uint16_t) c.simple_size_m, (uint16_t) c.simple_min_hits};
        p.ngram_map_k   = {(uint16_t) c.map_k_size_n, (uint16_t) c.map_k_size_m, (uint16_t) c.map_k_min_hits};
        p.ngram_map_k4v = {(uint16_t) c.map_k4v_size_n, (uint16_t) c.map_k4v_size_m, (uint16_t) c.map_k4v_min_hits};
        p.ngram_mod.n_match = c.mod_n_match;
        p.ngram_mod.n_min   = c.mod_n_min;
        p.ngram_mod.n_max   = c.mod_n_max;
        const bool has_cache = std::find(c.types.begin(), c.types.end(), (int) COMMON_SPECULATIVE_TYPE_NGRAM_CACHE) !=
                               c.types.end();
        for (const std::string * path : {&c.lookup_cache_static, &c.lookup_cache_dynamic}) {
            if (has_cache && !path->empty() && !check_cache_file(*path, error)) {
                return (int) STATUS_BAD_INPUT;
            }
        }
        p.ngram_cache.lookup_cache_static  = has_cache ? c.lookup_cache_static : "";
        p.ngram_cache.lookup_cache_dynamic = has_cache ? c.lookup_cache_dynamic : "";
        common_speculative * spec = common_speculative_init(p, n_seq);
        if (spec == nullptr) {
            error = "llama.cpp made no speculative drafter of these types";
            return (int) STATUS_BAD_INPUT;
        }
        auto * sp = new speculator();
        sp->spec.reset(spec);
        sp->n_seq = n_seq;
        sp->prompt.resize(n_seq);
        sp->result.resize(n_seq);
        sp->n_last.assign(n_seq, 0);
        sp->n_floor.assign(n_seq, 0);
        out = sp;
        return (int) STATUS_OK;
    });
    return out;
}

void speculator_free(speculator * sp) noexcept {
    delete sp;
}

int32_t speculator_n_max(const speculator * sp) noexcept {
    return sp && sp->spec ? common_speculative_n_max(sp->spec.get()) : 0;
}

int speculator_begin(speculator * sp, int32_t seq, const int32_t * prompt, size_t n_prompt,
                     std::string & error) noexcept {
    return guarded(error, [&]() {
        if (int st = check_seq(sp, seq, error)) {
            return st;
        }
        common_speculative_begin(sp->spec.get(), seq, llama_tokens(prompt, prompt + n_prompt));
        sp->n_last[seq] = 0;
        sp->n_floor[seq] = n_prompt;
        return (int) STATUS_OK;
    });
}

int speculator_draft(speculator * sp, int32_t seq, const int32_t * hist, size_t n_hist, int32_t id_last,
                     int32_t n_max, std::vector<int32_t> & out, std::string & error) noexcept {
    return guarded(error, [&]() {
        if (int st = check_seq(sp, seq, error)) {
            return st;
        }
        out.clear();
        sp->n_last[seq] = 0;
        if (n_hist < sp->n_floor[seq]) {
            error = "the history (" + std::to_string(n_hist) + " tokens) is shorter than at the last begin or "
                    "draft (" + std::to_string(sp->n_floor[seq]) + "): begin a new generation first";
            return (int) STATUS_BAD_INPUT;
        }
        if (n_hist >= (size_t) UINT32_MAX / 2) {
            error = "the history is too long";
            return (int) STATUS_BAD_INPUT;
        }
        if (n_max <= 0) {
            return (int) STATUS_OK;
        }
        // one sequence drafts: the others' flags are off (draft() resets them all when it ends)
        sp->prompt[seq].assign(hist, hist + n_hist);
        sp->result[seq].clear();
        common_speculative_get_draft_params(sp->spec.get(), seq) = {
            /* .drafting = */ true,
            /* .n_max    = */ n_max,
            /* .pos0     = */ (llama_pos) n_hist,
            /* .id_last  = */ id_last,
            /* .prompt   = */ &sp->prompt[seq],
            /* .result   = */ &sp->result[seq],
        };
        common_speculative_draft(sp->spec.get());
        auto & r = sp->result[seq];
        if ((int32_t) r.size() > n_max) {
            r.resize(n_max);
        }
        out.assign(r.begin(), r.end());
        sp->n_last[seq] = r.size();
        sp->n_floor[seq] = n_hist;
        return (int) STATUS_OK;
    });
}

int speculator_accept(speculator * sp, int32_t seq, int32_t n_accepted, std::string & error) noexcept {
    return guarded(error, [&]() {
        if (int st = check_seq(sp, seq, error)) {
            return st;
        }
        const size_t n_last = sp->n_last[seq];
        sp->n_last[seq] = 0;
        if (n_last == 0) {      // no draft from llama.cpp's drafters (its accept would assert)
            return (int) STATUS_OK;
        }
        const int32_t n = std::max<int32_t>(0, std::min<int32_t>(n_accepted, (int32_t) n_last));
        common_speculative_accept(sp->spec.get(), seq, (uint16_t) n);
        return (int) STATUS_OK;
    });
}

}  // namespace alpaca2_spec
