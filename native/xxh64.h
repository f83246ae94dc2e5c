/* XXH64, written from the published algorithm description
 * (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md, "XXH64 Algorithm").
 *
 * One-shot hashing of a byte range with a 64-bit seed. Output is bit-identical to
 * python-xxhash's xxh64_intdigest; tests/test_index_hash.py checks that on random inputs.
 * Reads are unaligned-safe (memcpy) and little-endian on every host.
 */
#ifndef PREFIXLB_XXH64_H
#define PREFIXLB_XXH64_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PLB_P64_1 0x9E3779B185EBCA87ULL
#define PLB_P64_2 0xC2B2AE3D27D4EB4FULL
#define PLB_P64_3 0x165667B19E3779F9ULL
#define PLB_P64_4 0x85EBCA77C2B2AE63ULL
#define PLB_P64_5 0x27D4EB2F165667C5ULL

static inline uint64_t plb_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t plb_read64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t plb_read32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t plb_xxh64_round(uint64_t acc, uint64_t lane)
{
    acc += lane * PLB_P64_2;
    acc = plb_rotl64(acc, 31);
    return acc * PLB_P64_1;
}

static inline uint64_t plb_xxh64_merge(uint64_t acc, uint64_t val)
{
    acc ^= plb_xxh64_round(0, val);
    return acc * PLB_P64_1 + PLB_P64_4;
}

/* The four lanes folded into one accumulator (after the last full stripe). */
static inline uint64_t plb_xxh64_converge(uint64_t v1, uint64_t v2, uint64_t v3, uint64_t v4)
{
    uint64_t h = plb_rotl64(v1, 1) + plb_rotl64(v2, 7) + plb_rotl64(v3, 12) + plb_rotl64(v4, 18);
    h = plb_xxh64_merge(h, v1);
    h = plb_xxh64_merge(h, v2);
    h = plb_xxh64_merge(h, v3);
    return plb_xxh64_merge(h, v4);
}

static inline uint64_t plb_xxh64_avalanche(uint64_t h)
{
    h ^= h >> 33;
    h *= PLB_P64_2;
    h ^= h >> 29;
    h *= PLB_P64_3;
    h ^= h >> 32;
    return h;
}

static inline uint64_t plb_xxh64(const unsigned char *p, size_t len, uint64_t seed)
{
    const unsigned char *const end = p + len;
    uint64_t h;

    if (len >= 32) {
        const unsigned char *const limit = end - 32;
        uint64_t v1 = seed + PLB_P64_1 + PLB_P64_2;
        uint64_t v2 = seed + PLB_P64_2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - PLB_P64_1;
        do {
            v1 = plb_xxh64_round(v1, plb_read64(p));
            v2 = plb_xxh64_round(v2, plb_read64(p + 8));
            v3 = plb_xxh64_round(v3, plb_read64(p + 16));
            v4 = plb_xxh64_round(v4, plb_read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = plb_xxh64_converge(v1, v2, v3, v4);
    } else {
        h = seed + PLB_P64_5;
    }
    h += (uint64_t)len;

    while (p + 8 <= end) {
        h ^= plb_xxh64_round(0, plb_read64(p));
        h = plb_rotl64(h, 27) * PLB_P64_1 + PLB_P64_4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)plb_read32(p) * PLB_P64_1;
        h = plb_rotl64(h, 23) * PLB_P64_2 + PLB_P64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * PLB_P64_5;
        h = plb_rotl64(h, 11) * PLB_P64_1;
        p++;
    }
    return plb_xxh64_avalanche(h);
}

/* plb_xxh64(p, 64, seed) for exactly 64 bytes (the default block), unrolled. The lanes'
 * input products do not depend on the seed, so they are formed first and overlap the previous
 * block's serial tail when a chain is hashed. */
static inline uint64_t plb_xxh64_64(const unsigned char *p, uint64_t seed)
{
    const uint64_t a1 = plb_read64(p) * PLB_P64_2, a2 = plb_read64(p + 8) * PLB_P64_2;
    const uint64_t a3 = plb_read64(p + 16) * PLB_P64_2, a4 = plb_read64(p + 24) * PLB_P64_2;
    const uint64_t b1 = plb_read64(p + 32) * PLB_P64_2, b2 = plb_read64(p + 40) * PLB_P64_2;
    const uint64_t b3 = plb_read64(p + 48) * PLB_P64_2, b4 = plb_read64(p + 56) * PLB_P64_2;
    uint64_t v1 = plb_rotl64(seed + PLB_P64_1 + PLB_P64_2 + a1, 31) * PLB_P64_1;
    uint64_t v2 = plb_rotl64(seed + PLB_P64_2 + a2, 31) * PLB_P64_1;
    uint64_t v3 = plb_rotl64(seed + a3, 31) * PLB_P64_1;
    uint64_t v4 = plb_rotl64(seed - PLB_P64_1 + a4, 31) * PLB_P64_1;
    v1 = plb_rotl64(v1 + b1, 31) * PLB_P64_1;
    v2 = plb_rotl64(v2 + b2, 31) * PLB_P64_1;
    v3 = plb_rotl64(v3 + b3, 31) * PLB_P64_1;
    v4 = plb_rotl64(v4 + b4, 31) * PLB_P64_1;
    return plb_xxh64_avalanche(plb_xxh64_converge(v1, v2, v3, v4) + 64);
}

#endif /* PREFIXLB_XXH64_H */
