/*
 * apl_sums.c — the checksum every block carries ([0123], partial recovery):
 * one 64-bit checksum per block number, of its current version, in the meta
 * segment (sb_sums_off: u64[sb_max_blocks]), kept by the controller alone
 * (one thread). A batch marks each number it gives a new version
 * (loc_publish, apl_store_int.h); apl_batch_publish computes their
 * checksums just before it publishes the version (sums_publish), and
 * recovery (a crash, an aborted batch) recomputes those of the numbers it
 * rolls back (sums_flush), so the table always describes the published
 * version. apl_check_blocks recomputes and compares: a mismatch is a block
 * whose bytes changed without the controller (damaged memory), which
 * `appliance verify` reports and `appliance repair` copies again from a peer.
 *
 * What is summed: for a block chain, each block's header but bh_retired (set
 * on a committed version when its number is removed), its slot array and its
 * record heap (not the free space between them); for an lz4 backup object,
 * its header but bo_retired, and its compressed bytes. The hash is XXH64's
 * construction (four 64-bit lanes, multiply-rotate), about 10 GB/s here, so
 * a batch pays well under a microsecond per block it changed.
 *
 * Shared: the table is in meta (controller-written; nobody else reads it).
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull
#define P4 0x85EBCA77C2B2AE63ull
#define P5 0x27D4EB2F165667C5ull

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t lane(uint64_t acc, uint64_t in) { return rotl(acc + in * P2, 31) * P1; }
static inline uint64_t merge(uint64_t h, uint64_t v) { return (h ^ lane(0, v)) * P1 + P4; }

static uint64_t hash64(const uint8_t *p, uint64_t n, uint64_t seed)
{
    const uint8_t *end = p + n;
    uint64_t h;
    if (n >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        do {
            v1 = lane(v1, rd64(p));
            v2 = lane(v2, rd64(p + 8));
            v3 = lane(v3, rd64(p + 16));
            v4 = lane(v4, rd64(p + 24));
            p += 32;
        } while (p + 32 <= end);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(merge(merge(merge(h, v1), v2), v3), v4);
    } else {
        h = seed + P5;
    }
    h += n;
    for (; p + 8 <= end; p += 8)
        h = rotl(h ^ lane(0, rd64(p)), 27) * P1 + P4;
    if (p + 4 <= end) {
        h = rotl(h ^ (uint64_t)rd32(p) * P1, 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; p++)
        h = rotl(h ^ *p * P5, 11) * P1;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    return h ^ (h >> 32);
}

static uint64_t block_sum(const apl_store *s, const struct apl_bhdr *b, uint64_t h)
{
    const uint8_t *p = (const uint8_t *)b;
    const size_t ret = offsetof(struct apl_bhdr, bh_retired);
    h = hash64(p, ret, h);
    h = hash64(p + ret + sizeof(b->bh_retired), HDR_SIZE - ret - sizeof(b->bh_retired), h);
    if (b->bh_lower > HDR_SIZE && b->bh_lower <= s->bsize)
        h = hash64(p + HDR_SIZE, b->bh_lower - HDR_SIZE, h);
    if (b->bh_upper < s->bsize)
        h = hash64(p + b->bh_upper, s->bsize - b->bh_upper, h);
    return h;
}

uint64_t sum_of(const apl_store *s, uint32_t number)
{
    apl_addr a = s->v->v_loc[number];
    if (a == APL_ADDR_NONE)
        return 0;
    if (s->bs)
        return bs_sum(s, a);
    uint64_t h = number;
    const struct apl_bhdr *b = apl_ptr(s->v, a);
    for (int i = 0; b && i < 64; i++) {
        h = block_sum(s, b, h);
        b = b->bh_next == APL_ADDR_NONE ? 0 : apl_ptr(s->v, b->bh_next);
    }
    return h | 1;   /* 0 only for a number not in use */
}

/* The object header but bo_retired, and its compressed bytes (apl_bstore.c calls it). */
uint64_t obj_sum(const struct apl_bobj *o, uint64_t h)
{
    const uint8_t *p = (const uint8_t *)o;
    const size_t ret = offsetof(struct apl_bobj, bo_retired);
    h = hash64(p, ret, h);
    h = hash64(p + ret + sizeof(o->bo_retired), sizeof(*o) - ret - sizeof(o->bo_retired), h);
    return hash64(p + sizeof(*o), o->bo_clen, h) | 1;
}

int sums_dirty_grow(apl_store *s)
{
    uint64_t ncap = s->dirty_cap ? s->dirty_cap * 2 : 1024;
    uint32_t *nd = realloc(s->dirty, ncap * sizeof(uint32_t));
    if (!nd)
        return APL_ENOMEM;
    s->dirty = nd;
    s->dirty_cap = ncap;
    return APL_OK;
}

void sums_flush(apl_store *s)
{
    for (uint64_t i = 0; i < s->ndirty; i++) {
        uint32_t n = s->dirty[i];
        s->sums[n] = sum_of(s, n);
        s->dirty_bits[n >> 3] &= (uint8_t)~(1u << (n & 7));
    }
    s->ndirty = 0;
    s->sums_lost = 0;
}

void sums_publish(apl_store *s)
{
    if (s->sums_lost) {     /* the dirty list could not grow: recompute everything */
        for (uint64_t n = 0; n < s->v->v_max_blocks; n++)
            s->sums[n] = sum_of(s, (uint32_t)n);
        memset(s->dirty_bits, 0, (s->v->v_max_blocks + 7) / 8);
        s->ndirty = 0;
        s->sums_lost = 0;
        return;
    }
    sums_flush(s);
}

int64_t apl_check_blocks(apl_store *s, uint32_t start, uint32_t limit, struct apl_blockinfo *out, uint32_t cap,
                         uint32_t damaged_only, uint32_t *next)
{
    if (s->pending)
        return APL_EBATCH;
    uint64_t max = s->v->v_max_blocks;
    if (limit > max)
        limit = (uint32_t)max;
    uint32_t n = 0, num = start;
    for (; num < limit && n < cap; num++) {
        apl_addr a = s->v->v_loc[num];
        if (a == APL_ADDR_NONE)
            continue;
        uint64_t now = sum_of(s, num);
        int bad = now != s->sums[num];
        if (damaged_only && !bad)
            continue;
        struct apl_blockinfo *o = &out[n++];
        o->number = num;
        o->damaged = (uint32_t)bad;
        o->devices = 0;
        o->file = UINT32_MAX;
        o->removed = 0;
        if (s->bs) {
            o->devices = 1ull << APL_ADDR_SEG(a);
            o->removed = bs_removed_at(s, a) != 0;
            o->file = bs_file_of(s, a);
            continue;
        }
        const struct apl_bhdr *b = apl_ptr(s->v, a);
        if (b) {
            o->file = b->bh_file;
            o->removed = b->bh_retired != 0;
        }
        for (int i = 0; b && i < 64; i++) {
            apl_addr ba = i ? b->bh_next : a;
            if (i)
                b = ba == APL_ADDR_NONE ? 0 : apl_ptr(s->v, ba);
            if (b)
                o->devices |= 1ull << APL_ADDR_SEG(ba);
        }
    }
    *next = num;
    return n;
}
