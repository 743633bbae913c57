/*
 * apl_int.h — what the C files share that Python does not see: inline helpers
 * of readers (apl_readers.c, apl_read.c, apl_log.c, apl_py.c) and the writer
 * (its files are listed in apl_store_int.h): address resolution, version
 * chains, key comparison, the binary search inside one block, entering a
 * view, beginning and ending one read; and the internal functions one file
 * defines for others (APL_INTERNAL: not exported from the compiled module).
 */
#ifndef APL_INT_H
#define APL_INT_H

#include <string.h>
#include "apl.h"

/* A function or variable one C file defines for the others: a direct call
 * inside the module, neither exported nor interposable. */
#define APL_INTERNAL __attribute__((visibility("hidden")))

#define LOAD_ACQ(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p)      __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, x)  __atomic_store_n((p), (x), __ATOMIC_RELEASE)
#define STORE_RLX(p, x)  __atomic_store_n((p), (x), __ATOMIC_RELAXED)
#define FENCE()          __atomic_thread_fence(__ATOMIC_SEQ_CST)

#define HDR_SIZE   ((uint32_t)sizeof(struct apl_bhdr))
#define SLOT_SIZE  ((uint32_t)sizeof(struct apl_slot))
#ifndef APL_PREFETCH_LINES
#define APL_PREFETCH_LINES 6
#endif

static inline struct apl_bhdr *apl_ptr(const apl_view *v, apl_addr a)
{
    uint32_t seg = APL_ADDR_SEG(a);
    uint64_t slot = APL_ADDR_SLOT(a);
    if (seg >= v->v_nseg || slot >= v->v_seg_slots || !v->v_seg[seg])
        return 0;
    return (struct apl_bhdr *)(v->v_seg[seg] + (slot + 1) * (uint64_t)v->v_bsize);
}

static inline struct apl_slot *apl_slots(const struct apl_bhdr *b)
{
    return (struct apl_slot *)((uint8_t *)b + HDR_SIZE);
}

/*
 * A record in a block's heap holds the key's bytes past the first 8 (its
 * "suffix": the slot's sl_prefix already holds the first 8) and then, in a
 * leaf, the value. A key of at most 8 bytes is all in its slot. Full keys
 * are put back together (apl_key_out) only where one leaves the block: a
 * scan's output, a block image, a separator copied into another block.
 */
#define APL_KSFX(n) ((uint32_t)(n) > 8u ? (uint32_t)(n) - 8u : 0u)

/* The suffix of a full key (never read when the key has 8 bytes or fewer). */
static inline const uint8_t *apl_sfx(const uint8_t *k, uint32_t n)
{
    return n > 8 ? k + 8 : k;
}

static inline const uint8_t *apl_slot_sfx(const struct apl_bhdr *b, const struct apl_slot *s)
{
    return (const uint8_t *)b + s->sl_off;
}

/* A leaf slot's value bytes (sl_aux of them). */
static inline const uint8_t *apl_slot_val(const struct apl_bhdr *b, const struct apl_slot *s)
{
    return (const uint8_t *)b + s->sl_off + APL_KSFX(s->sl_klen);
}

/* Write the full key of (prefix, suffix, n) to out (n bytes). */
static inline void apl_key_out(uint8_t *out, uint64_t prefix, const uint8_t *sfx, uint32_t n)
{
    uint64_t be = __builtin_bswap64(prefix);
    memcpy(out, &be, n < 8 ? n : 8);
    if (n > 8)
        memcpy(out + 8, sfx, n - 8);
}

/* The rest of a leaf's slot array, past the lines apl_resolve asked for: a
 * binary search probes lines all over it (and apl_chain_block its last
 * slot), so every miss is started at once; reading bh_nslots waits only for
 * the header, already on its way. */
static inline void apl_prefetch_slots(const struct apl_bhdr *b)
{
    uint32_t end = HDR_SIZE + SLOT_SIZE * (uint32_t)b->bh_nslots;
    if (end > APL_MAX_BLOCK)   /* damaged memory: prefetches never fault, but stay near */
        end = APL_MAX_BLOCK;
    for (uint32_t off = APL_PREFETCH_LINES * APL_CACHELINE; off < end; off += APL_CACHELINE)
        __builtin_prefetch((const char *)b + off, 0, 3);
}

static inline void apl_prefetch_head(const struct apl_bhdr *b)
{
    for (int l = 0; l < APL_PREFETCH_LINES; l++)
        __builtin_prefetch((const char *)b + l * APL_CACHELINE, 0, 3);
}

/*
 * The version of block `number` visible at `version`: the newest one whose
 * bh_version <= version. Versions strictly decrease along bh_prev; a chain that
 * does not (or an address that points nowhere) is corruption and yields NULL,
 * so a reader never loops or faults on damaged memory.
 */
static inline struct apl_bhdr *apl_resolve(const apl_view *v, uint32_t number, uint64_t version)
{
    if (number >= v->v_max_blocks)
        return 0;
    apl_addr a = LOAD_ACQ(&v->v_loc[number]);
    uint64_t last = UINT64_MAX;
    while (a != APL_ADDR_NONE) {
        struct apl_bhdr *b = apl_ptr(v, a);
        if (!b)
            return 0;
        /* The header and the slot array are needed next, one binary-search
         * probe after another: ask for their cache lines all at once so the
         * misses overlap instead of queueing (the dominant cost of a random
         * lookup on a large file). */
        apl_prefetch_head(b);
        uint64_t bv = b->bh_version;
        if (bv >= last)
            return 0;
        if (bv <= version)
            return b;
        last = bv;
        a = b->bh_prev;
    }
    return 0;
}

/*
 * Block `number` as a block image sees it at `version`: NULL when the number
 * is not in use then. A removed number stays in the location table until no
 * pin can reach it; its head's bh_retired (set before the removal's version
 * is published) tells from which version on it is gone.
 */
static inline struct apl_bhdr *apl_resolve_in_use(const apl_view *v, uint32_t number, uint64_t version)
{
    struct apl_bhdr *b = apl_resolve(v, number, version);
    if (!b)
        return 0;
    uint64_t retired = LOAD_ACQ(&b->bh_retired);
    return retired && retired <= version ? 0 : b;
}

/* Big-endian 8-byte prefix as an integer, zero-padded on the right. */
static inline uint64_t apl_prefix(const uint8_t *k, uint32_t n)
{
    uint64_t p = 0;
    if (n >= 8) {
        memcpy(&p, k, 8);
    } else {
        memcpy(&p, k, n);
    }
    return __builtin_bswap64(p);
}

/* memcmp order of two keys given as (prefix, suffix, length); a key that is
 * a proper prefix of another sorts first. */
static inline int apl_keycmp(uint64_t pa, const uint8_t *a, uint32_t na,
                             uint64_t pb, const uint8_t *b, uint32_t nb)
{
    if (pa != pb)
        return pa < pb ? -1 : 1;
    uint32_t m = na < nb ? na : nb;
    if (m > 8) {
        int c = memcmp(a, b, m - 8);
        if (c)
            return c;
    }
    return (na > nb) - (na < nb);
}

static inline int apl_slotcmp(const struct apl_bhdr *b, const struct apl_slot *s,
                              uint64_t p, const uint8_t *k, uint32_t n)
{
    /* compare slot key with search key */
    if (s->sl_prefix != p)
        return s->sl_prefix < p ? -1 : 1;
    return apl_keycmp(s->sl_prefix, apl_slot_sfx(b, s), s->sl_klen, p, apl_sfx(k, n), n);
}

/* Index of the first slot whose key is >= the search key; *eq when equal. */
static inline uint32_t apl_lower_bound(const struct apl_bhdr *b, uint64_t p,
                                       const uint8_t *k, uint32_t n, int *eq)
{
    const struct apl_slot *s = apl_slots(b);
    uint32_t lo = 0, hi = b->bh_nslots;
    while (lo < hi) {
        uint32_t mid = (lo + hi) >> 1;
        if (apl_slotcmp(b, &s[mid], p, k, n) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *eq = lo < b->bh_nslots && apl_slotcmp(b, &s[lo], p, k, n) == 0;
    return lo;
}

/* Inner block: the index of the last slot whose key is <= the search key
 * (slot 0 of the leftmost block at each level has the empty key). */
static inline uint32_t apl_child_index(const struct apl_bhdr *b, uint64_t p,
                                       const uint8_t *k, uint32_t n)
{
    const struct apl_slot *s = apl_slots(b);
    uint32_t lo = 0, hi = b->bh_nslots;
    while (lo < hi) {
        uint32_t mid = (lo + hi) >> 1;
        if (apl_slotcmp(b, &s[mid], p, k, n) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo ? lo - 1 : 0;
}

/* Compare the search key with the last key of a block (block must be non-empty). */
static inline int apl_cmp_last(const struct apl_bhdr *b, uint64_t p, const uint8_t *k, uint32_t n)
{
    const struct apl_slot *s = &apl_slots(b)[b->bh_nslots - 1];
    return -apl_slotcmp(b, s, p, k, n);
}

/*
 * Walk an overflow chain to the block that holds (or would hold) the key: the
 * first block whose last key is >= the key, or the last block. Records across
 * a chain are sorted: the primary block has the lowest keys.
 */
static inline struct apl_bhdr *apl_chain_block(const apl_view *v, struct apl_bhdr *b,
                                               uint64_t p, const uint8_t *k, uint32_t n,
                                               uint32_t *chain_index)
{
    uint32_t i = 0;
    while (b->bh_next != APL_ADDR_NONE && i < 64) {
        if (b->bh_nslots && apl_cmp_last(b, p, k, n) <= 0)
            break;
        struct apl_bhdr *nx = apl_ptr(v, b->bh_next);
        if (!nx)
            break;
        b = nx;
        i++;
    }
    *chain_index = i;
    return b;
}

static inline uint64_t apl_now_version(const apl_view *v)
{
    return LOAD_ACQ(&v->v_sb->sb_version);
}

/* FNV-1a, 64-bit: checksums of block images. */
static inline uint64_t apl_fnv(uint64_t h, const uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* No pid is above the kernel's PID_MAX_LIMIT: a larger rs_pid is forged. */
#define APL_PID_MAX 4194304u
/* The process that owned a reader slot is gone: no such pid, or the pid now
 * names a process started at another time than `start` (0: not checked). */
APL_INTERNAL int apl_pid_gone(uint32_t pid, uint64_t start);

/* Pin the latest committed version in the calling thread's slot (apl_readers.c). */
APL_INTERNAL struct apl_reader *apl_op_pin(apl_view *v, uint64_t *version);
static inline void apl_op_unpin(struct apl_reader *r)
{
    STORE_REL(&r->rs_pin, APL_PIN_IDLE);
}

/* ---- entering a view: every reader entry point (thread records: apl_readers.c) ---- */
/* This thread's record: which view a read of it is inside (0 = none). */
struct rd_thread {
    volatile uint64_t in_view;
    struct rd_thread *next;
    int registered;
};
APL_INTERNAL extern __thread struct rd_thread tls_rd;
/* 0 once membarrier(PRIVATE_EXPEDITED) is registered (apl_readers.c) */
APL_INTERNAL extern int rd_need_fence;
/* A thread's first read: link its record into the process's list. */
APL_INTERNAL void rd_register(void);

/* Enter a read of view v: announce it, then check that v is not closed
 * (Dekker with apl_view_close: one of the two sees the other). Nothing
 * mapped may be touched before this returns APL_OK. */
static inline int view_enter(apl_view *v)
{
    if (__builtin_expect(!tls_rd.registered, 0))
        rd_register();
    STORE_RLX(&tls_rd.in_view, v->v_id);
    if (rd_need_fence)
        FENCE();
    else
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (LOAD_RLX(&v->v_closed)) {
        STORE_REL(&tls_rd.in_view, 0);
        return APL_ECLOSED;
    }
    return APL_OK;
}

static inline void view_exit(void)
{
    STORE_REL(&tls_rd.in_view, 0);
}

/* ---- one read: begin, end (every read entry point: apl_read.c, apl_py.c) ---- */

/* A read's result, unless its version was freed meanwhile: reused memory is
 * written only after sb_horizon passed the versions it held (apl_reclaim), so
 * a read that saw any of it sees the horizon past its version here. */
static inline int64_t horizon_checked(const apl_view *v, uint64_t ver, int64_t rc)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD_ACQ(&v->v_sb->sb_horizon) > ver)
        return APL_ESNAPSHOT;
    return rc;
}

/* Begin a read at `version`, or (0) at the latest under this thread's
 * per-call pin (*r, else NULL): view_enter first, so nothing mapped is touched
 * on a closed view. */
static inline int read_begin(apl_view *v, uint64_t version, uint64_t *ver, struct apl_reader **r)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    *r = 0;
    *ver = version;
    if (!version && !(*r = apl_op_pin(v, ver))) {
        view_exit();
        return APL_EREADERS;
    }
    return APL_OK;
}

/* End it: the result, checked against the horizon while still pinned. */
static inline int64_t read_end(apl_view *v, uint64_t ver, struct apl_reader *r, int64_t rc)
{
    rc = horizon_checked(v, ver, rc);
    /* a location entry marked by a detach points past every segment: the
     * read found nothing there (apl_devices.c) */
    if (rc == APL_ECORRUPT && LOAD_RLX(&v->v_sb->sb_detached))
        rc = APL_EDEVICE;
    if (r)
        apl_op_unpin(r);
    view_exit();
    return rc;
}

/* A leaf slot's record, bounds-checked against the block. */
static inline int apl_slot_ok(const apl_view *v, const struct apl_slot *s)
{
    return (uint32_t)s->sl_off + APL_KSFX(s->sl_klen) + s->sl_aux <= v->v_bsize && s->sl_off >= HDR_SIZE;
}

/* ---- lookups at one version (apl_read.c) ---- */

/* Descend a file's tree to the leaf chain that holds the key (reader or writer). */
APL_INTERNAL struct apl_bhdr *apl_descend(const apl_view *v, uint32_t file, uint64_t version,
                                          uint64_t p, const uint8_t *k, uint32_t n);
/* The value of `key` in `file` at `ver` inside a read: *val points into the
 * mapped block (copy it before read_end), *vlen its length. APL_NOTFOUND or
 * APL_ECORRUPT otherwise. */
APL_INTERNAL int apl_lookup(const apl_view *v, uint32_t file, uint64_t ver, const uint8_t *key,
                            uint32_t klen, const uint8_t **val, uint32_t *vlen);

/* Records of `table` whose alternate key in index file `index` is `prefix`,
 * inside a read at `ver` (apl_find's work, without its read_begin/read_end,
 * so a caller may continue it under the same pin). */
APL_INTERNAL int64_t apl_find_at(apl_view *v, uint32_t index, uint32_t table, uint64_t ver,
                                 const uint8_t *prefix, uint32_t plen,
                                 const uint8_t *after, uint32_t afterlen,
                                 uint8_t *out, uint64_t cap, uint64_t *count,
                                 uint8_t *resume, uint32_t *resume_len, int *more);

/* The image of block version b (apl_block_image format; apl_read.c). */
APL_INTERNAL int64_t apl_image(const apl_view *v, struct apl_bhdr *b, uint8_t *out, uint64_t cap);
/* apl_bstore.c: a compressed block's image at a version */
APL_INTERNAL int64_t apl_bobj_image(const apl_view *v, uint32_t number, uint64_t version, uint8_t *out, uint64_t cap);

#endif
