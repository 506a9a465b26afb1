/* Picking a token without copying the whole vocabulary: greedy's first maximum, and a top-k
 * chain over its few candidates.
 *
 * llama_sampler_sample copies every logit into a candidates array (3 MB on a 262,144-token
 * vocabulary) and a penalties stage then looks every candidate up in a hash map: about 0.25 ms a
 * token for llama.cpp's default chain and 1 ms with a repeat penalty.  When the chain is
 *     [logit_bias] [penalties] top_k(k) ...stages that only see the k survivors... dist
 * and the stages before top_k can only lower a logit (penalties with repeat >= 1, frequency and
 * presence >= 0) or touch the listed tokens (logit_bias), the k survivors are among the
 * k + 1 + m largest raw logits plus the biased tokens, where m bounds the tokens those stages
 * change (the penalty window plus the biased tokens).  So the same stages run on that small
 * array and pick the same token, as long as the order top_k sees is decided: no two equal
 * values among the first k + 1, and the raw value at the cut strictly above the next.  Where
 * that cannot be shown (NaN or infinite logits, ties, a small vocabulary) the caller samples
 * the plain way.  Tests: tests/test_core_sampler.py compares it with llama.cpp's own chain. */
#ifndef ALPACA2_FASTPICK_H
#define ALPACA2_FASTPICK_H
#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>
#include "llama.h"

namespace alpaca2_topk {

typedef float v4f __attribute__((vector_size(16)));
static const int BLK = 64;

static inline v4f load4(const float * p) { v4f v; std::memcpy(&v, p, sizeof v); return v; }
static inline v4f max4(v4f a, v4f b) { return a > b ? a : b; }
static inline bool by_logit_desc(const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; }

/* The `need` largest of lg[0..n), largest first, into out; false where that cannot be decided
 * cheaply (non-finite logits, n too small, more than `cap` values at or above the cut). */
static bool top_logits(const float * lg, int n, int need, llama_token_data * out, size_t cap) {
    thread_local std::vector<float> bm, sel;
    thread_local std::vector<llama_token_data> pool;
    if (need <= 0 || n < need * BLK * 4) {
        return false;
    }
    const int nb = n / BLK;                          // whole blocks; the tail is scanned apart
    bm.resize(nb);
    v4f fin = {0, 0, 0, 0};                          // x - x: 0, or NaN for a NaN or an infinity
    for (int b = 0; b < nb; ++b) {
        const float * p = lg + (size_t) b * BLK;
        v4f m0 = load4(p), m1 = load4(p + 4), m2 = load4(p + 8), m3 = load4(p + 12);
        fin += (m0 - m0) + (m1 - m1) + (m2 - m2) + (m3 - m3);
        for (int i = 16; i < BLK; i += 16) {
            const v4f a = load4(p + i), c = load4(p + i + 4), d = load4(p + i + 8), e = load4(p + i + 12);
            fin += (a - a) + (c - c) + (d - d) + (e - e);
            m0 = max4(m0, a); m1 = max4(m1, c); m2 = max4(m2, d); m3 = max4(m3, e);
        }
        m0 = max4(max4(m0, m1), max4(m2, m3));
        bm[b] = std::max(std::max(m0[0], m0[1]), std::max(m0[2], m0[3]));
    }
    float tail_fin = 0.0f;
    for (int i = nb * BLK; i < n; ++i) {
        tail_fin += lg[i] - lg[i];
    }
    if (fin[0] != 0.0f || fin[1] != 0.0f || fin[2] != 0.0f || fin[3] != 0.0f || tail_fin != 0.0f) {
        return false;
    }
    // the need-th largest block maximum: the need-th largest logit is at least that
    sel.assign(bm.begin(), bm.end());
    std::nth_element(sel.begin(), sel.begin() + (need - 1), sel.end(), std::greater<float>());
    const float cut = sel[need - 1];
    pool.clear();
    for (int b = 0; b < nb; ++b) {
        if (bm[b] >= cut) {
            for (int i = b * BLK; i < (b + 1) * BLK; ++i) {
                if (lg[i] >= cut) {
                    pool.push_back(llama_token_data{i, lg[i], 0.0f});
                }
            }
            if (pool.size() > cap) {
                return false;
            }
        }
    }
    for (int i = nb * BLK; i < n; ++i) {
        if (lg[i] >= cut) {
            pool.push_back(llama_token_data{i, lg[i], 0.0f});
        }
    }
    if (pool.size() < (size_t) need || pool.size() > cap) {
        return false;
    }
    std::nth_element(pool.begin(), pool.begin() + (need - 1), pool.end(), by_logit_desc);
    std::sort(pool.begin(), pool.begin() + need, by_logit_desc);
    std::copy(pool.begin(), pool.begin() + need, out);
    return true;
}

/* Whether the k + 1 largest values of cur are all different (so top_k's order is decided). */
static bool top_distinct(const llama_token_data * cur, size_t size, int k) {
    thread_local std::vector<float> v;
    if ((size_t) k + 1 > size) {
        return false;
    }
    v.resize(size);
    for (size_t i = 0; i < size; ++i) {
        v[i] = cur[i].logit;
    }
    std::partial_sort(v.begin(), v.begin() + (k + 1), v.end(), std::greater<float>());
    for (int i = 0; i < k; ++i) {
        if (!(v[i] > v[i + 1])) {
            return false;
        }
    }
    return true;
}

}  // namespace alpaca2_topk

/* llama.cpp's greedy pick over raw logits: the first index whose logit no later one beats (a NaN
 * never beats and is never beaten, so a NaN first logit is kept, as there).  One pass of block
 * maxima (8 running maxima a block, which the compiler keeps in vector registers), then the first
 * index of the largest in the first block that reached it. */
static llama_token alpaca2_first_max(const float * lg, int n) {
    int blk = 0;
    float acc[8];
    if (n <= 1 || lg[0] != lg[0]) {
        return 0;
    }
    float best = lg[0];
    for (int s = 0; s < n; s += 512) {
        const int e = std::min(s + 512, n);
        for (int k = 0; k < 8; ++k) {
            acc[k] = best;
        }
        int i = s;
        for (; i + 8 <= e; i += 8) {
            for (int k = 0; k < 8; ++k) {
                const float x = lg[i + k];
                if (x > acc[k]) {
                    acc[k] = x;
                }
            }
        }
        for (; i < e; ++i) {
            if (lg[i] > acc[0]) {
                acc[0] = lg[i];
            }
        }
        for (int k = 0; k < 8; ++k) {
            if (acc[k] > best) {
                best = acc[k];
                blk = s;
            }
        }
    }
    for (int i = blk; i < std::min(blk + 512, n); ++i) {
        if (lg[i] == best) {
            return i;
        }
    }
    return blk;
}

/* Runs chain (whose first n_pre stages are logit_bias/penalties and whose next is top_k(k)) over
 * the k + 1 + m largest logits plus the `extra` tokens, in buf (room for k + 2 + m + n_extra);
 * returns the token it selects without accepting it; -1: not decided here, sample the plain
 * way (nothing was changed); -2: the chain selected nothing.  Throws what the stages throw. */
static llama_token alpaca2_sample_topk(llama_sampler * chain, int n_pre, int k, int m,
                                       const float * lg, int n, const llama_token * extra, int n_extra,
                                       llama_token_data * buf) {
    const int kp = k + 1 + m;                        // the raw candidates: k + 1 survive whatever m do
    if (!alpaca2_topk::top_logits(lg, n, kp + 1, buf, (size_t) 64 * (kp + 1) + 4096)) {
        return -1;
    }
    if (!(buf[kp - 1].logit > buf[kp].logit)) {
        return -1;                                   // a tie at the cut: which tokens are in is not decided
    }
    size_t size = (size_t) kp;
    for (int j = 0; j < n_extra; ++j) {              // a biased token may rise from anywhere
        const llama_token t = extra[j];
        bool have = false;
        for (int i = 0; i < kp && !have; ++i) {
            have = buf[i].id == t;
        }
        if (!have && t >= 0 && t < n) {
            buf[size++] = llama_token_data{t, lg[t], 0.0f};
        }
    }
    llama_token_data_array arr = { buf, size, -1, false };
    for (int i = 0; i < n_pre; ++i) {               // pure: they change only arr
        llama_sampler_apply(llama_sampler_chain_get(chain, i), &arr);
    }
    if (!alpaca2_topk::top_distinct(arr.data, arr.size, k)) {
        return -1;                                   // equal values where top_k's order matters
    }
    const int n_stages = llama_sampler_chain_n(chain);
    for (int i = n_pre; i < n_stages; ++i) {         // top_k, ..., dist (which draws from the RNG)
        llama_sampler_apply(llama_sampler_chain_get(chain, i), &arr);
    }
    if (arr.selected < 0 || (size_t) arr.selected >= arr.size) {
        return -2;                                   // no token selected (the RNG has moved: no retry)
    }
    return arr.data[arr.selected].id;
}

#endif
