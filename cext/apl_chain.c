/*
 * apl_chain.c — one block chain in the writer (the controller, one thread):
 * the slotted page of a block (init, append, insert, remove, compact, copy),
 * copy-on-write of a chain into the pending version (cow), and gathering a
 * chain's records into scratch and writing them back as a chain (gather,
 * gather_with, write_chain). Shared by the primary's trees (apl_tree.c),
 * which split and rebalance, and the secondary's apply (apl_apply.c), which
 * never splits: a chain is what the two have in common.
 *
 * Readers follow block versions while this code runs: cow copies a chain to
 * fresh slots and stores the new head into the location table (release)
 * only once it is complete; later edits in the same batch change that copy
 * in place, which no reader can be looking at (a reader at version S follows
 * bh_prev while bh_version > S). blk_copy never writes bh_version or bh_prev
 * of its target, which may be such a head already in the location table.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

uint32_t chain_len(apl_store *s, struct apl_bhdr *h)
{
    uint32_t n = 0;
    for (struct apl_bhdr *c = h; c && n < 64; c = next_of(s, c))
        n++;
    return n;
}

/* ------------------------------------------------------------------ */
/* Blocks                                                              */
/* ------------------------------------------------------------------ */

void blk_reset(apl_store *s, struct apl_bhdr *b)
{
    b->bh_nslots = 0;
    b->bh_lower = HDR_SIZE;
    b->bh_upper = (uint16_t)s->bsize;
    b->bh_garbage = 0;
}

void blk_init(apl_store *s, struct apl_bhdr *b, uint32_t magic, uint32_t number,
                     uint32_t file, uint16_t level)
{
    b->bh_magic = magic;
    b->bh_number = number;
    b->bh_version = s->pending;
    b->bh_prev = APL_ADDR_NONE;
    b->bh_next = APL_ADDR_NONE;
    b->bh_retired = 0;
    b->bh_file = file;
    b->bh_level = level;
    b->bh_chain = 1;
    b->bh_count = 0;
    blk_reset(s, b);
}

/* Put record r into slot index idx of a block with room for it: its bytes
 * at the top of the heap, the slots from idx on moved up by one. */
static void put_at(struct apl_bhdr *b, uint32_t idx, const struct rec *r)
{
    uint32_t sk = APL_KSFX(r->klen), body = sk + r->vlen;
    b->bh_upper = (uint16_t)(b->bh_upper - body);
    uint8_t *dst = (uint8_t *)b + b->bh_upper;
    memcpy(dst, r->ks, sk);
    if (r->vlen)
        memcpy(dst + sk, r->val, r->vlen);
    struct apl_slot *sl = apl_slots(b);
    memmove(&sl[idx + 1], &sl[idx], (size_t)(b->bh_nslots - idx) * SLOT_SIZE);
    sl[idx].sl_prefix = r->prefix;
    sl[idx].sl_off = b->bh_upper;
    sl[idx].sl_klen = (uint16_t)r->klen;
    sl[idx].sl_aux = r->aux;
    b->bh_nslots++;
    b->bh_lower = (uint16_t)(b->bh_lower + SLOT_SIZE);
}

/* Append a record after the last slot (the caller keeps order; room checked). */
void blk_append(struct apl_bhdr *b, const struct rec *r)
{
    put_at(b, b->bh_nslots, r);
}

/* The record in slot sl of block b (its bytes stay in b). */
static struct rec slot_rec(const struct apl_bhdr *b, const struct apl_slot *sl)
{
    struct rec r = {
        .prefix = sl->sl_prefix, .ks = apl_slot_sfx(b, sl), .klen = sl->sl_klen,
        .vlen = b->bh_level ? 0 : sl->sl_aux, .aux = sl->sl_aux,
    };
    r.val = r.ks + APL_KSFX(r.klen);
    return r;
}

/* Rewrite a block's heap without its garbage (in place, through scratch). */
static void blk_compact(apl_store *s, struct apl_bhdr *b)
{
    memcpy(s->scratch, b, s->bsize);
    struct apl_bhdr *src = (struct apl_bhdr *)s->scratch;
    const struct apl_slot *ss = apl_slots(src);
    uint16_t n = src->bh_nslots;
    blk_reset(s, b);
    for (uint16_t i = 0; i < n; i++) {
        struct rec r = slot_rec(src, &ss[i]);
        blk_append(b, &r);
    }
}

/* Insert a record at slot index idx; 0 if it does not fit even compacted. */
int blk_insert(apl_store *s, struct apl_bhdr *b, uint32_t idx, const struct rec *r)
{
    uint32_t need = rec_bytes(r);
    if (blk_room(b) < need) {
        if (blk_room(b) + b->bh_garbage < need)
            return 0;
        blk_compact(s, b);
    }
    put_at(b, idx, r);
    return 1;
}

void blk_remove(apl_store *s, struct apl_bhdr *b, uint32_t idx)
{
    struct apl_slot *sl = apl_slots(b);
    uint32_t body = APL_KSFX(sl[idx].sl_klen) + (b->bh_level ? 0 : sl[idx].sl_aux);
    memmove(&sl[idx], &sl[idx + 1], (size_t)(b->bh_nslots - idx - 1) * SLOT_SIZE);
    b->bh_nslots--;
    b->bh_lower = (uint16_t)(b->bh_lower - SLOT_SIZE);
    b->bh_garbage = (uint16_t)(b->bh_garbage + body);
    if (b->bh_nslots == 0)
        blk_reset(s, b);
}

/* Copy src into dst without garbage; dst keeps nothing of its own but its
 * bh_version and bh_prev, which are never written here: dst may be a pending
 * head already in the location table, and readers follow those two fields. */
void blk_copy(apl_store *s, struct apl_bhdr *dst, const struct apl_bhdr *src)
{
    const size_t ver_at = offsetof(struct apl_bhdr, bh_version);
    const size_t next_at = offsetof(struct apl_bhdr, bh_next);
    _Static_assert(offsetof(struct apl_bhdr, bh_prev) + sizeof(apl_addr) == offsetof(struct apl_bhdr, bh_next),
                   "bh_version and bh_prev are adjacent");
    memcpy(dst, src, ver_at);
    memcpy((uint8_t *)dst + next_at, (const uint8_t *)src + next_at, HDR_SIZE - next_at);
    blk_reset(s, dst);
    const struct apl_slot *ss = apl_slots(src);
    for (uint16_t i = 0; i < src->bh_nslots; i++) {
        struct rec r = slot_rec(src, &ss[i]);
        blk_append(dst, &r);
    }
}

/* ------------------------------------------------------------------ */
/* Copy-on-write                                                       */
/* ------------------------------------------------------------------ */

/*
 * Make the chain of block `number` writable in the pending version and return
 * its head (APL_EDAMAGED when its content no longer matches its checksum).
 * The first time in a batch, every block of the chain is copied to
 * fresh slots; the old head goes to the retire queue (at = pending), and the
 * new head is published in the location table only after it is complete.
 */
struct apl_bhdr *cow(apl_store *s, uint32_t number, int *err)
{
    apl_addr old = s->v->v_loc[number];
    struct apl_bhdr *h = old == APL_ADDR_NONE ? 0 : apl_ptr(s->v, old);
    if (!h) {
        *err = apl_loc_off(old) ? APL_EDEVICE : APL_ECORRUPT;
        return 0;
    }
    if (h->bh_version == s->pending)
        return h;
    /* a version whose bytes no longer match its checksum is not carried on:
     * the change fails (its block needs `appliance repair`, apl_sums.c) */
    if (!s->replacing && s->sums[number] && sum_of(s, number) != s->sums[number]) {
        *err = APL_EDAMAGED;
        return 0;
    }
    uint32_t n = chain_len(s, h);
    if (avail_slots(s) < n) {
        *err = APL_EFULL;
        return 0;
    }
    apl_addr na[64];
    for (uint32_t i = 0; i < n; i++)
        na[i] = alloc_slot(s);
    const struct apl_bhdr *src = h;
    for (uint32_t i = 0; i < n; i++, src = next_of(s, src)) {
        struct apl_bhdr *dst = apl_ptr(s->v, na[i]);
        blk_copy(s, dst, src);
        dst->bh_version = s->pending;
        dst->bh_next = i + 1 < n ? na[i + 1] : APL_ADDR_NONE;
        dst->bh_prev = APL_ADDR_NONE;
        dst->bh_retired = 0;
    }
    struct apl_bhdr *nh = apl_ptr(s->v, na[0]);
    nh->bh_prev = old;
    nh->bh_chain = (uint16_t)n;
    int rc = retire_push(s, RT_CHAIN, old, number, s->pending);
    if (rc) {
        for (uint32_t i = 0; i < n; i++)
            free_slot(s, na[i]);
        *err = rc;
        return 0;
    }
    loc_publish(s, number, na[0]);
    return nh;
}

/* ------------------------------------------------------------------ */
/* Gathering records and writing them back as a chain                */
/* ------------------------------------------------------------------ */

/* Copy every record of a chain (or one inner block) into scratch + recs. */
uint64_t gather(apl_store *s, struct apl_bhdr *h, uint64_t *total)
{
    return gather_at(s, h, 0, s->recs, total);
}

/* gather() with the block copies from scratch block `at` on and the records
 * from `out` on (the caller checked both capacities). */
uint64_t gather_at(apl_store *s, struct apl_bhdr *h, uint32_t at, struct rec *out, uint64_t *total)
{
    uint64_t n = 0, off = (uint64_t)at * s->bsize;
    *total = 0;
    for (struct apl_bhdr *c = h; c; c = next_of(s, c)) {
        memcpy(s->scratch + off, c, s->bsize);
        struct apl_bhdr *cp = (struct apl_bhdr *)(s->scratch + off);
        off += s->bsize;
        const struct apl_slot *sl = apl_slots(cp);
        for (uint16_t i = 0; i < cp->bh_nslots; i++) {
            struct rec *r = &out[n++];
            *r = slot_rec(cp, &sl[i]);
            *total += rec_bytes(r);
        }
        if (c->bh_level)
            break; /* inner blocks have no chain */
    }
    return n;
}

/* The record area scratch holds after `nblocks` block copies: for a new record. */
static uint8_t *scratch_tail(apl_store *s, uint32_t nblocks)
{
    return s->scratch + (uint64_t)nblocks * s->bsize;
}

/* gather() the chain of `h` (cur_nb blocks), with the record (key, val) put
 * in key order: replacing the equal one when `eq`, inserted otherwise. The
 * record is copied behind the gathered ones in scratch; *total counts it.
 * Returns the number of records in s->recs. */
uint64_t gather_with(apl_store *s, struct apl_bhdr *h, uint32_t cur_nb, uint64_t p, const uint8_t *key,
                            uint32_t klen, const uint8_t *val, uint32_t vlen, int eq, uint64_t *total)
{
    uint64_t n = gather(s, h, total);
    uint8_t *tail = scratch_tail(s, cur_nb);
    uint32_t sk = APL_KSFX(klen);
    memcpy(tail, apl_sfx(key, klen), sk);
    memcpy(tail + sk, val, vlen);
    struct rec nr = {.prefix = p, .ks = tail, .klen = klen, .val = tail + sk, .vlen = vlen, .aux = vlen};
    uint64_t lo = 0, hi = n;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (apl_keycmp(s->recs[mid].prefix, s->recs[mid].ks, s->recs[mid].klen, p, nr.ks, klen) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (eq) {
        *total -= rec_bytes(&s->recs[lo]);
    } else {
        memmove(&s->recs[lo + 1], &s->recs[lo], (n - lo) * sizeof(struct rec));
        n++;
    }
    s->recs[lo] = nr;
    *total += rec_bytes(&nr);
    return n;
}

/* Write recs[a, b) into the given chain head (reset), allocating overflow
 * blocks for groups after the first. The head's old overflow blocks must
 * already have been released by the caller. */
void write_chain(apl_store *s, struct apl_bhdr *head, uint64_t a, const uint64_t *bounds,
                        uint32_t nb, const apl_addr *ovfl)
{
    struct apl_bhdr *b = head;
    uint64_t i = a;
    blk_reset(s, head);
    head->bh_next = APL_ADDR_NONE;
    head->bh_chain = (uint16_t)nb;
    for (uint32_t g = 0; g < nb; g++) {
        if (g > 0) {
            struct apl_bhdr *o = apl_ptr(s->v, ovfl[g - 1]);
            blk_init(s, o, APL_BLK_OVFL, head->bh_number, head->bh_file, 0);
            b->bh_next = ovfl[g - 1];
            b = o;
        }
        for (; i < bounds[g]; i++)
            blk_append(b, &s->recs[i]);
    }
}
