/*
 * apl_store.c — the writer: the controller's "database control mechanism".
 *
 * Only the controller process calls anything here, from one thread, so the
 * allocator, the retire queue and the batch state are plain process memory.
 * What other processes see is the shared memory this code writes, under the
 * protocol described in apl_layout.h:
 *
 *   batch_begin          pending = G + 1
 *   put / delete ...     copy-on-write of each chain the first time the batch
 *                        touches it (cow()); later changes in the same batch
 *                        edit the copy in place. Copies are stored into the
 *                        location table only once fully written (release).
 *   log_append ...       change-log entries of the batch's transactions
 *   batch_publish        sb_pub[V & 1] = log bounds; sb_version = V (release)
 *   reclaim              free old versions once every pin has passed them
 *
 * Structural work (a chain that outgrows its blocks, a split, a removal) first
 * checks that enough free slots and block numbers exist for the worst case, so
 * an operation either completes or fails with APL_EFULL having changed nothing.
 * A small reserve of slots is kept back for undoing a failed transaction from
 * its B logs (apl_store_use_reserve).
 *
 * Crash recovery (apl_store_recover) needs nothing but the shared memory: every
 * block version newer than G is rolled back (its number's location entry is
 * set back to bh_prev), and the free lists and retire queue are rebuilt by
 * walking each number's version chain down to the first version that every
 * pin can see — everything older is free. That is sound because the oldest pin
 * never decreases (apl_layout.h), so nothing older was ever handed to a reader
 * that is still reading, and nothing kept has been reused.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>

#include "apl_store_int.h"


/* ------------------------------------------------------------------ */
/* Small helpers                                                       */
/* ------------------------------------------------------------------ */

static inline struct apl_bhdr *head_of(apl_store *s, uint32_t number)
{
    apl_addr a = s->v->v_loc[number];
    return a == APL_ADDR_NONE ? 0 : apl_ptr(s->v, a);
}

static inline struct apl_bhdr *next_of(apl_store *s, const struct apl_bhdr *b)
{
    return b->bh_next == APL_ADDR_NONE ? 0 : apl_ptr(s->v, b->bh_next);
}

static inline apl_addr addr_of(apl_store *s, const struct apl_bhdr *b)
{
    const uint8_t *p = (const uint8_t *)b;
    for (uint32_t i = 0; i < s->v->v_nseg; i++) {
        const uint8_t *base = s->v->v_seg[i];
        if (base && p >= base + s->bsize && p < base + (s->v->v_seg_slots + 1) * (uint64_t)s->bsize)
            return APL_ADDR(i, (uint64_t)(p - base) / s->bsize - 1);
    }
    return APL_ADDR_NONE;
}

static inline uint32_t rec_bytes(const struct rec *r)
{
    return SLOT_SIZE + r->klen + r->vlen;
}

static inline uint32_t blk_room(const struct apl_bhdr *b)
{
    return (uint32_t)b->bh_upper - b->bh_lower;
}

static uint32_t chain_len(apl_store *s, struct apl_bhdr *h)
{
    uint32_t n = 0;
    for (struct apl_bhdr *c = h; c && n < 64; c = next_of(s, c))
        n++;
    return n;
}

static void op_struct(apl_store *s, uint32_t number, int removed)
{
    for (uint32_t i = 0; i < s->op.nstruct; i++)
        if (s->op.structs[i] == number) {
            s->op.removed[i] |= (uint8_t)removed;
            return;
        }
    if (s->op.nstruct < 64) {
        s->op.structs[s->op.nstruct] = number;
        s->op.removed[s->op.nstruct] = (uint8_t)removed;
        s->op.nstruct++;
    }
}

/* ------------------------------------------------------------------ */
/* Allocation                                                          */
/* ------------------------------------------------------------------ */

static uint64_t avail_slots(apl_store *s)
{
    if (s->use_reserve)
        return s->free_total;
    return s->free_total > s->reserve ? s->free_total - s->reserve : 0;
}

static uint64_t avail_nums(apl_store *s)
{
    return s->nfree_nums + (s->v->v_max_blocks - s->next_num);
}

static apl_addr alloc_slot(apl_store *s)
{
    if (!avail_slots(s))
        return APL_ADDR_NONE;
    uint32_t n = s->v->v_nseg;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t seg = (s->next_seg + k) % n;
        if (s->nfree[seg] && s->v->v_seg[seg]) {
            s->next_seg = seg + 1;
            s->free_total--;
            return APL_ADDR(seg, s->free_slots[seg][--s->nfree[seg]]);
        }
    }
    return APL_ADDR_NONE;
}

static void free_slot(apl_store *s, apl_addr a)
{
    uint32_t seg = APL_ADDR_SEG(a);
    s->free_slots[seg][s->nfree[seg]++] = (uint32_t)APL_ADDR_SLOT(a);
    s->free_total++;
}

static void free_chain(apl_store *s, apl_addr a)
{
    int guard = 0;
    while (a != APL_ADDR_NONE && guard++ < 64) {
        struct apl_bhdr *b = apl_ptr(s->v, a);
        apl_addr nx = b ? b->bh_next : APL_ADDR_NONE;
        free_slot(s, a);
        a = nx;
    }
}

static uint32_t alloc_number(apl_store *s)
{
    if (s->nfree_nums)
        return s->free_nums[--s->nfree_nums];
    if (s->next_num < s->v->v_max_blocks)
        return (uint32_t)s->next_num++;
    return APL_NO_BLOCK;
}

int retire_push(apl_store *s, uint32_t kind, apl_addr addr, uint32_t number, uint64_t at)
{
    if (s->rq_len == s->rq_cap) {
        uint64_t ncap = s->rq_cap ? s->rq_cap * 2 : 1024;
        struct retire *nq = malloc(ncap * sizeof(*nq));
        if (!nq)
            return APL_ENOMEM;
        for (uint64_t i = 0; i < s->rq_len; i++)
            nq[i] = s->rq[(s->rq_head + i) % s->rq_cap];
        free(s->rq);
        s->rq = nq;
        s->rq_cap = ncap;
        s->rq_head = 0;
    }
    struct retire *r = &s->rq[(s->rq_head + s->rq_len) % s->rq_cap];
    r->at = at;
    r->addr = addr;
    r->number = number;
    r->kind = kind;
    r->slots = kind == RT_OBJECT ? 1 : kind == RT_CHAIN && !s->bs ? chain_len(s, apl_ptr(s->v, addr)) : 0;
    s->retained += r->slots;
    s->rq_len++;
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Blocks                                                              */
/* ------------------------------------------------------------------ */

static void blk_reset(apl_store *s, struct apl_bhdr *b)
{
    b->bh_nslots = 0;
    b->bh_lower = HDR_SIZE;
    b->bh_upper = (uint16_t)s->bsize;
    b->bh_garbage = 0;
}

static void blk_init(apl_store *s, struct apl_bhdr *b, uint32_t magic, uint32_t number,
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

/* Append a record after the last slot (the caller keeps order; room checked). */
static void blk_append(struct apl_bhdr *b, const struct rec *r)
{
    uint32_t body = r->klen + r->vlen;
    b->bh_upper = (uint16_t)(b->bh_upper - body);
    uint8_t *dst = (uint8_t *)b + b->bh_upper;
    memcpy(dst, r->k, r->klen);
    if (r->vlen)
        memcpy(dst + r->klen, r->val, r->vlen);
    struct apl_slot *sl = &apl_slots(b)[b->bh_nslots++];
    sl->sl_prefix = r->prefix;
    sl->sl_off = b->bh_upper;
    sl->sl_klen = (uint16_t)r->klen;
    sl->sl_aux = r->aux;
    b->bh_lower = (uint16_t)(b->bh_lower + SLOT_SIZE);
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
        struct rec r = {
            .prefix = ss[i].sl_prefix, .k = apl_slot_key(src, &ss[i]), .klen = ss[i].sl_klen,
            .vlen = src->bh_level ? 0 : ss[i].sl_aux, .aux = ss[i].sl_aux,
        };
        r.val = r.k + r.klen;
        blk_append(b, &r);
    }
}

/* Insert a record at slot index idx; 0 if it does not fit even compacted. */
static int blk_insert(apl_store *s, struct apl_bhdr *b, uint32_t idx, const struct rec *r)
{
    uint32_t need = rec_bytes(r);
    if (blk_room(b) < need) {
        if (blk_room(b) + b->bh_garbage < need)
            return 0;
        blk_compact(s, b);
    }
    uint32_t body = r->klen + r->vlen;
    b->bh_upper = (uint16_t)(b->bh_upper - body);
    uint8_t *dst = (uint8_t *)b + b->bh_upper;
    memcpy(dst, r->k, r->klen);
    if (r->vlen)
        memcpy(dst + r->klen, r->val, r->vlen);
    struct apl_slot *sl = apl_slots(b);
    memmove(&sl[idx + 1], &sl[idx], (size_t)(b->bh_nslots - idx) * SLOT_SIZE);
    sl[idx].sl_prefix = r->prefix;
    sl[idx].sl_off = b->bh_upper;
    sl[idx].sl_klen = (uint16_t)r->klen;
    sl[idx].sl_aux = r->aux;
    b->bh_nslots++;
    b->bh_lower = (uint16_t)(b->bh_lower + SLOT_SIZE);
    return 1;
}

static void blk_remove(apl_store *s, struct apl_bhdr *b, uint32_t idx)
{
    struct apl_slot *sl = apl_slots(b);
    uint32_t body = sl[idx].sl_klen + (b->bh_level ? 0 : sl[idx].sl_aux);
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
static void blk_copy(apl_store *s, struct apl_bhdr *dst, const struct apl_bhdr *src)
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
        struct rec r = {
            .prefix = ss[i].sl_prefix, .k = apl_slot_key(src, &ss[i]), .klen = ss[i].sl_klen,
            .vlen = src->bh_level ? 0 : ss[i].sl_aux, .aux = ss[i].sl_aux,
        };
        r.val = r.k + r.klen;
        blk_append(dst, &r);
    }
}

/* ------------------------------------------------------------------ */
/* Copy-on-write                                                       */
/* ------------------------------------------------------------------ */

/*
 * Make the chain of block `number` writable in the pending version and return
 * its head. The first time in a batch, every block of the chain is copied to
 * fresh slots; the old head goes to the retire queue (at = pending), and the
 * new head is published in the location table only after it is complete.
 */
static struct apl_bhdr *cow(apl_store *s, uint32_t number, int *err)
{
    apl_addr old = s->v->v_loc[number];
    struct apl_bhdr *h = old == APL_ADDR_NONE ? 0 : apl_ptr(s->v, old);
    if (!h) {
        *err = APL_ECORRUPT;
        return 0;
    }
    if (h->bh_version == s->pending)
        return h;
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
    STORE_REL(&s->v->v_loc[number], na[0]);
    return nh;
}

static int meta_add(apl_store *s, uint32_t file, int64_t delta)
{
    int err = 0;
    struct apl_bhdr *m = cow(s, s->v->v_files[file].fl_meta, &err);
    if (!m)
        return err;
    m->bh_count = (uint64_t)((int64_t)m->bh_count + delta);
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Descent with a path (the writer sees the newest versions)           */
/* ------------------------------------------------------------------ */

static int wdescend(apl_store *s, uint32_t file, uint64_t p, const uint8_t *k, uint32_t n,
                    struct wpath *wp)
{
    uint32_t num = s->v->v_files[file].fl_root;
    wp->depth = 0;
    wp->rightmost = 1;
    for (;;) {
        struct apl_bhdr *b = head_of(s, num);
        if (!b)
            return APL_ECORRUPT;
        if (b->bh_level == 0) {
            wp->leaf = num;
            return APL_OK;
        }
        if (b->bh_nslots == 0 || wp->depth >= (int)APL_MAX_HEIGHT - 1)
            return APL_ECORRUPT;
        uint32_t ci = apl_child_index(b, p, k, n);
        if (ci + 1 != b->bh_nslots)
            wp->rightmost = 0;
        wp->num[wp->depth] = num;
        wp->idx[wp->depth] = ci;
        wp->depth++;
        num = apl_slots(b)[ci].sl_aux;
    }
}

/* ------------------------------------------------------------------ */
/* Gathering and laying out records                                    */
/* ------------------------------------------------------------------ */

/* Copy every record of a chain (or one inner block) into scratch + recs. */
static uint64_t gather(apl_store *s, struct apl_bhdr *h, uint64_t *total)
{
    uint64_t n = 0, off = 0;
    *total = 0;
    for (struct apl_bhdr *c = h; c; c = next_of(s, c)) {
        memcpy(s->scratch + off, c, s->bsize);
        struct apl_bhdr *cp = (struct apl_bhdr *)(s->scratch + off);
        off += s->bsize;
        const struct apl_slot *sl = apl_slots(cp);
        for (uint16_t i = 0; i < cp->bh_nslots; i++) {
            struct rec *r = &s->recs[n++];
            r->prefix = sl[i].sl_prefix;
            r->k = apl_slot_key(cp, &sl[i]);
            r->klen = sl[i].sl_klen;
            r->vlen = cp->bh_level ? 0 : sl[i].sl_aux;
            r->aux = sl[i].sl_aux;
            r->val = r->k + r->klen;
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
static uint64_t gather_with(apl_store *s, struct apl_bhdr *h, uint32_t cur_nb, uint64_t p, const uint8_t *key,
                            uint32_t klen, const uint8_t *val, uint32_t vlen, int eq, uint64_t *total)
{
    uint64_t n = gather(s, h, total);
    uint8_t *tail = scratch_tail(s, cur_nb);
    memcpy(tail, key, klen);
    memcpy(tail + klen, val, vlen);
    struct rec nr = {.prefix = p, .k = tail, .klen = klen, .val = tail + klen, .vlen = vlen, .aux = vlen};
    uint64_t lo = 0, hi = n;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (apl_keycmp(s->recs[mid].prefix, s->recs[mid].k, s->recs[mid].klen, p, key, klen) < 0)
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

/*
 * Split recs[a, b) into nb consecutive non-empty groups that each fit one
 * block; bounds[i] is the end of group i. With `even`, groups are as equal in
 * bytes as the records allow; without, each block is filled before the next.
 * Returns 0 when no such split exists.
 */
static int pack(apl_store *s, uint64_t a, uint64_t b, uint32_t nb, int even, uint64_t *bounds)
{
    uint64_t cap = s->bsize - HDR_SIZE;
    uint64_t left = 0;
    for (uint64_t i = a; i < b; i++)
        left += rec_bytes(&s->recs[i]);
    if (nb == 0 || left > cap * nb || b - a < nb)
        return 0;
    uint64_t i = a;
    for (uint32_t g = 0; g < nb; g++) {
        uint32_t blocks_left = nb - g;
        uint64_t target = even ? (left + blocks_left - 1) / blocks_left : cap;
        uint64_t used = 0;
        while (i < b - (blocks_left - 1)) {  /* leave a record for each later group */
            uint64_t rb = rec_bytes(&s->recs[i]);
            if (used + rb > cap)
                break;
            if (blocks_left > 1 && used && used + rb > target && left - used <= cap * (blocks_left - 1))
                break;
            used += rb;
            i++;
        }
        if (!used)
            return 0;
        left -= used;
        bounds[g] = i;
    }
    return i == b;
}

/* Blocks for recs[a, b) as one chain: about 70% full, at most maxb. */
static uint32_t chain_blocks(apl_store *s, uint64_t a, uint64_t b, uint64_t *bounds)
{
    uint64_t cap = s->bsize - HDR_SIZE, bytes = 0;
    for (uint64_t i = a; i < b; i++)
        bytes += rec_bytes(&s->recs[i]);
    uint32_t want = (uint32_t)((bytes * 10 + cap * 7 - 1) / (cap * 7));
    if (want < 1)
        want = 1;
    if (want > s->maxb)
        want = s->maxb;
    for (uint32_t k = want; k <= s->maxb; k++)
        if (pack(s, a, b, k, 1, bounds))
            return k;
    for (uint32_t k = 1; k <= s->maxb; k++)
        if (pack(s, a, b, k, 0, bounds))
            return k;
    return 0;
}

/* Write recs[a, b) into the given chain head (reset), allocating overflow
 * blocks for groups after the first. The head's old overflow blocks must
 * already have been released by the caller. */
static void write_chain(apl_store *s, struct apl_bhdr *head, uint64_t a, const uint64_t *bounds,
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

/* ------------------------------------------------------------------ */
/* Inner blocks: insert a separator, split, remove a child             */
/* ------------------------------------------------------------------ */

static int insert_sep(apl_store *s, uint32_t file, const struct rec *sep, uint32_t child);

/* Children of a full inner block (recs[0, n)) split into two blocks; the left
 * half stays in `number` (or, for the root, both halves get new numbers). */
static int split_inner(apl_store *s, uint32_t file, uint32_t number, struct apl_bhdr *b, uint64_t n)
{
    uint64_t bounds[2];
    if (!pack(s, 0, n, 2, 1, bounds))
        return APL_ECORRUPT;
    int is_root = number == s->v->v_files[file].fl_root;
    uint32_t rnum = alloc_number(s);
    apl_addr raddr = alloc_slot(s);
    if (rnum == APL_NO_BLOCK || raddr == APL_ADDR_NONE)
        return APL_EFULL; /* excluded by the caller's capacity check */
    struct apl_bhdr *r = apl_ptr(s->v, raddr);
    blk_init(s, r, APL_BLK_INNR, rnum, file, b->bh_level);
    for (uint64_t i = bounds[0]; i < n; i++)
        blk_append(r, &s->recs[i]);
    STORE_REL(&s->v->v_loc[rnum], raddr);
    op_struct(s, rnum, 0);
    op_struct(s, number, 0);
    /* separator: the right block's first key (kept in its slot 0, which routes
     * everything below its second key) */
    struct rec sep = s->recs[bounds[0]];
    uint8_t keybuf[APL_MAX_KEY];
    memcpy(keybuf, sep.k, sep.klen);
    sep.k = keybuf;
    if (!is_root) {
        blk_reset(s, b);
        for (uint64_t i = 0; i < bounds[0]; i++)
            blk_append(b, &s->recs[i]);
        return insert_sep(s, file, &sep, rnum);
    }
    /* root: left half to a new number, root becomes their parent */
    uint32_t lnum = alloc_number(s);
    apl_addr laddr = alloc_slot(s);
    if (lnum == APL_NO_BLOCK || laddr == APL_ADDR_NONE)
        return APL_EFULL;
    struct apl_bhdr *l = apl_ptr(s->v, laddr);
    blk_init(s, l, APL_BLK_INNR, lnum, file, b->bh_level);
    for (uint64_t i = 0; i < bounds[0]; i++)
        blk_append(l, &s->recs[i]);
    STORE_REL(&s->v->v_loc[lnum], laddr);
    op_struct(s, lnum, 0);
    uint16_t level = (uint16_t)(b->bh_level + 1);
    blk_reset(s, b);
    b->bh_level = level;
    struct rec first = {.prefix = 0, .k = keybuf, .klen = 0, .vlen = 0, .aux = lnum};
    blk_append(b, &first);
    sep.aux = rnum;
    sep.vlen = 0;
    blk_append(b, &sep);
    return APL_OK;
}

/*
 * Insert separator `sep` pointing at `child` into the parent of the chain that
 * currently covers sep's key: right after that chain's slot.
 */
static int insert_sep(apl_store *s, uint32_t file, const struct rec *sep, uint32_t child)
{
    /* find the parent: descend until the child slot we are after */
    struct wpath wp;
    int rc = wdescend(s, file, sep->prefix, sep->k, sep->klen, &wp);
    if (rc)
        return rc;
    /* the level to insert at: the deepest inner block whose level is one above child's */
    struct apl_bhdr *cb = head_of(s, child);
    if (!cb)
        return APL_ECORRUPT;
    int d = -1;
    for (int i = 0; i < wp.depth; i++) {
        struct apl_bhdr *pb = head_of(s, wp.num[i]);
        if (pb && pb->bh_level == cb->bh_level + 1)
            d = i;
    }
    if (d < 0)
        return APL_ECORRUPT;
    uint32_t pnum = wp.num[d];
    struct apl_bhdr *p = cow(s, pnum, &rc);
    if (!p)
        return rc;
    op_struct(s, pnum, 0);
    struct rec r = *sep;
    r.vlen = 0;
    r.aux = child;
    if (blk_insert(s, p, wp.idx[d] + 1, &r))
        return APL_OK;
    /* full: gather its slots plus the new one, then split */
    uint8_t keybuf[APL_MAX_KEY];
    memcpy(keybuf, sep->k, sep->klen);
    r.k = keybuf;
    uint64_t total;
    uint64_t n = gather(s, p, &total);
    uint32_t at = wp.idx[d] + 1;
    memmove(&s->recs[at + 1], &s->recs[at], (n - at) * sizeof(struct rec));
    s->recs[at] = r;
    return split_inner(s, file, pnum, p, n + 1);
}

static int remove_number(apl_store *s, uint32_t file, struct wpath *wp, int level_from);

/* Remove the child at path level d (wp->idx[d] in wp->num[d]). */
static int remove_child(apl_store *s, uint32_t file, struct wpath *wp, int d)
{
    int rc = 0;
    uint32_t pnum = wp->num[d];
    struct apl_bhdr *p = cow(s, pnum, &rc);
    if (!p)
        return rc;
    op_struct(s, pnum, 0);
    blk_remove(s, p, wp->idx[d]);
    if (p->bh_nslots > 0)
        return APL_OK;
    if (pnum == s->v->v_files[file].fl_root) {
        /* the file is empty: the root becomes an empty leaf */
        blk_reset(s, p);
        p->bh_magic = APL_BLK_LEAF;
        p->bh_level = 0;
        return APL_OK;
    }
    return remove_number(s, file, wp, d);
}

/* Retire block number wp->num[d] (or the leaf when d == depth) and unlink it. */
static int remove_number(apl_store *s, uint32_t file, struct wpath *wp, int d)
{
    uint32_t number = d == wp->depth ? wp->leaf : wp->num[d];
    struct apl_bhdr *h = head_of(s, number);
    if (!h)
        return APL_ECORRUPT;
    h->bh_retired = s->pending;
    int rc = retire_push(s, RT_NUMBER, APL_ADDR_NONE, number, s->pending);
    if (rc)
        return rc;
    op_struct(s, number, 1);
    return remove_child(s, file, wp, d - 1);
}

/* ------------------------------------------------------------------ */
/* Chain rewrite: a chain that outgrew its blocks                      */
/* ------------------------------------------------------------------ */

/*
 * recs[0, n) is the chain's new content (sorted, `total` bytes with slots).
 * Lay it out as one chain of up to maxb blocks when it fits at under 90%
 * fill, or split it into several chains: the first keeps `number` (unless it
 * is the root, whose chains all get new numbers under it), the others get new
 * numbers and separators in the parent. Checks capacity for the worst case
 * first and changes nothing when it returns APL_EFULL.
 */
#define MAX_CHAINS 16
static int layout_chain(apl_store *s, uint32_t file, uint32_t number, struct apl_bhdr *head,
                        uint64_t n, uint64_t total, uint32_t cur_nb, struct wpath *wp)
{
    uint64_t cap = s->bsize - HDR_SIZE;
    int is_root = number == s->v->v_files[file].fl_root;
    uint32_t nchains = 1;
    uint32_t nbs[MAX_CHAINS];
    uint64_t ends[MAX_CHAINS];
    uint64_t bounds[MAX_CHAINS][10];

    if (total * 10 <= cap * cur_nb * 9 && pack(s, 0, n, cur_nb, 1, bounds[0])) {
        nbs[0] = cur_nb;                       /* redistribute within the chain */
    } else if (cur_nb < s->maxb && total * 10 <= cap * (cur_nb + 1) * 9 &&
               pack(s, 0, n, cur_nb + 1, 1, bounds[0])) {
        nbs[0] = cur_nb + 1;                   /* grow by one overflow block */
    } else {
        /* split: chains of at most half the chain capacity each, so that any
         * record sizes pack (records are at most half a block) */
        uint64_t per = cap * s->maxb / 2;
        nchains = (uint32_t)((total + per - 1) / per);
        if (nchains < 2)
            nchains = 2;
        if (nchains > MAX_CHAINS || nchains > n)
            return APL_ECORRUPT;
        uint64_t acc = 0, i = 0;
        for (uint32_t c = 0; c < nchains; c++) {
            uint64_t start = i, target = total * (c + 1) / nchains;
            uint64_t limit = n - (nchains - c - 1);
            while (i < limit && (i == start || acc + rec_bytes(&s->recs[i]) <= target)) {
                acc += rec_bytes(&s->recs[i]);
                i++;
            }
            if (c == nchains - 1)
                i = n;
            ends[c] = i;
            uint64_t a = start;
            if (!(nbs[c] = chain_blocks(s, a, ends[c], bounds[c])))
                return APL_ECORRUPT;
        }
    }
    if (nchains == 1)
        ends[0] = n;

    /* capacity for the worst case, before touching anything */
    uint64_t need_slots = 2u * (uint64_t)(wp->depth + 2), need_nums = (uint64_t)wp->depth + 2;
    for (uint32_t c = 0; c < nchains; c++)
        need_slots += nbs[c];
    need_nums += nchains;
    if (avail_slots(s) < need_slots || avail_nums(s) < need_nums)
        return APL_EFULL;

    /* the chain's overflow blocks are pending copies no reader can reach */
    for (struct apl_bhdr *o = next_of(s, head); o;) {
        struct apl_bhdr *nx = next_of(s, o);
        free_slot(s, addr_of(s, o));
        o = nx;
    }
    head->bh_next = APL_ADDR_NONE;

    uint32_t nums[MAX_CHAINS];
    uint8_t sepkeys[MAX_CHAINS][APL_MAX_KEY];
    struct rec seps[MAX_CHAINS];
    int root_split = is_root && nchains > 1;
    for (uint32_t c = 0; c < nchains; c++) {
        uint64_t a = c ? ends[c - 1] : 0;
        apl_addr ov[10];
        for (uint32_t g = 1; g < nbs[c]; g++)
            ov[g - 1] = alloc_slot(s);
        seps[c] = s->recs[a];
        memcpy(sepkeys[c], seps[c].k, seps[c].klen);
        seps[c].k = sepkeys[c];
        if (c == 0 && !root_split) {
            nums[0] = number;
            write_chain(s, head, a, bounds[0], nbs[0], ov);
            if (nchains > 1)
                op_struct(s, number, 0);
            continue;
        }
        uint32_t num = alloc_number(s);
        apl_addr ha = alloc_slot(s);
        struct apl_bhdr *h = apl_ptr(s->v, ha);
        blk_init(s, h, APL_BLK_LEAF, num, file, 0);
        write_chain(s, h, a, bounds[c], nbs[c], ov);
        STORE_REL(&s->v->v_loc[num], ha);
        op_struct(s, num, 0);
        nums[c] = num;
    }
    if (root_split) {
        blk_reset(s, head);
        head->bh_magic = APL_BLK_INNR;
        head->bh_level = 1;
        head->bh_chain = 1;
        op_struct(s, number, 0);
        for (uint32_t c = 0; c < nchains; c++) {
            struct rec r = seps[c];
            if (c == 0) {
                r.klen = 0;
                r.prefix = 0;
            }
            r.vlen = 0;
            r.aux = nums[c];
            blk_append(head, &r);
        }
        return APL_OK;
    }
    for (uint32_t c = 1; c < nchains; c++) {
        int rc = insert_sep(s, file, &seps[c], nums[c]);
        if (rc)
            return rc;
    }
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Put and delete                                                      */
/* ------------------------------------------------------------------ */

/* Where the record with this key now is: chain number and offset. */
static void locate(apl_store *s, uint32_t file, uint64_t p, const uint8_t *k, uint32_t n)
{
    struct wpath wp;
    if (wdescend(s, file, p, k, n, &wp))
        return;
    struct apl_bhdr *h = head_of(s, wp.leaf);
    uint32_t ci;
    struct apl_bhdr *b = apl_chain_block(s->v, h, p, k, n, &ci);
    int eq;
    uint32_t i = apl_lower_bound(b, p, k, n, &eq);
    s->op.block = wp.leaf;
    s->op.offset = eq ? ci * s->bsize + apl_slots(b)[i].sl_off : 0;
}

static int copy_old(const struct apl_bhdr *b, const struct apl_slot *sl, uint8_t *old,
                    uint64_t oldcap, int64_t *oldlen)
{
    if (!oldlen)
        return APL_OK;
    *oldlen = sl->sl_aux;
    if (old && sl->sl_aux <= oldcap)
        memcpy(old, apl_slot_key(b, sl) + sl->sl_klen, sl->sl_aux);
    return APL_OK;
}

int apl_put(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
            const uint8_t *val, uint32_t vlen, uint32_t mode,
            uint8_t *old, uint64_t oldcap, int64_t *oldlen)
{
    if (!s->pending)
        return APL_EBATCH;
    if (file >= s->v->v_nfiles)
        return APL_EFILE;
    if (klen == 0 || klen > s->max_key)
        return APL_EKEY;
    if ((uint64_t)SLOT_SIZE + klen + vlen > s->max_record)
        return APL_ETOOBIG;
    if (mode < APL_PUT_INSERT || mode > APL_PUT_UPSERT)
        return APL_EINVAL;
    memset(&s->op, 0, sizeof(s->op));
    if (oldlen)
        *oldlen = -1;
    uint64_t p = apl_prefix(key, klen);
    struct wpath wp;
    int rc = wdescend(s, file, p, key, klen, &wp);
    if (rc)
        return rc;
    /* read-only look first: refuse without copying anything */
    uint32_t ci;
    int eq;
    struct apl_bhdr *b = head_of(s, wp.leaf);
    if (!b)
        return APL_ECORRUPT;
    b = apl_chain_block(s->v, b, p, key, klen, &ci);
    uint32_t idx = apl_lower_bound(b, p, key, klen, &eq);
    if (eq && mode == APL_PUT_INSERT)
        return APL_EXISTS;
    if (!eq && mode == APL_PUT_UPDATE)
        return APL_NOTFOUND;
    if (eq)
        copy_old(b, &apl_slots(b)[idx], old, oldcap, oldlen);

    struct apl_bhdr *h = cow(s, wp.leaf, &rc);
    if (!h)
        return rc;
    b = apl_chain_block(s->v, h, p, key, klen, &ci);
    idx = apl_lower_bound(b, p, key, klen, &eq);
    struct rec r = {.prefix = p, .k = key, .klen = klen, .val = val, .vlen = vlen, .aux = vlen};
    if (eq) {
        struct apl_slot *sl = &apl_slots(b)[idx];
        uint32_t oldv = sl->sl_aux;
        if (vlen <= oldv) {
            memcpy((uint8_t *)b + sl->sl_off + klen, val, vlen);
            b->bh_garbage = (uint16_t)(b->bh_garbage + (oldv - vlen));
            sl->sl_aux = vlen;
            s->op.block = wp.leaf;
            s->op.offset = ci * s->bsize + sl->sl_off;
            return APL_CE_UPDATE;
        }
        if ((uint64_t)blk_room(b) + b->bh_garbage + oldv >= vlen) {
            /* fits in this block once the old record's bytes are reused */
            blk_remove(s, b, idx);
            blk_insert(s, b, idx, &r);
            s->op.block = wp.leaf;
            s->op.offset = ci * s->bsize + apl_slots(b)[idx].sl_off;
            return APL_CE_UPDATE;
        }
    } else {
        if (blk_insert(s, b, idx, &r)) {
            if ((rc = meta_add(s, file, 1))) {
                blk_remove(s, b, idx);
                return rc;
            }
            s->op.block = wp.leaf;
            s->op.offset = ci * s->bsize + apl_slots(b)[idx].sl_off;
            return APL_CE_INSERT;
        }
        /* The block is full. Data past the end of the file gets a new primary
         * block ([0077]) so that loading in key order fills blocks completely. */
        if (wp.rightmost && b->bh_next == APL_ADDR_NONE && idx == b->bh_nslots && wp.depth > 0) {
            if (avail_slots(s) < 1 + 2u * (uint64_t)(wp.depth + 2) + 1 ||
                avail_nums(s) < 1 + (uint64_t)wp.depth + 2)
                return APL_EFULL;
            if ((rc = meta_add(s, file, 1)))
                return rc;
            uint32_t num = alloc_number(s);
            apl_addr ha = alloc_slot(s);
            struct apl_bhdr *nh = apl_ptr(s->v, ha);
            blk_init(s, nh, APL_BLK_LEAF, num, file, 0);
            blk_append(nh, &r);
            STORE_REL(&s->v->v_loc[num], ha);
            op_struct(s, num, 0);
            if ((rc = insert_sep(s, file, &r, num)))
                return rc;
            s->op.block = num;
            s->op.offset = apl_slots(nh)[0].sl_off;
            return APL_CE_INSERT;
        }
    }
    /* Rewrite the chain with the record inserted or replaced (gathered copies
     * in scratch; the new record after them). */
    uint32_t cur_nb = chain_len(s, h);
    uint64_t total;
    uint64_t n = gather_with(s, h, cur_nb, p, key, klen, val, vlen, eq, &total);
    if (!eq && (rc = meta_add(s, file, 1)))
        return rc;
    rc = layout_chain(s, file, wp.leaf, h, n, total, cur_nb, &wp);
    if (rc) {
        if (!eq)
            meta_add(s, file, -1);
        return rc;
    }
    locate(s, file, p, key, klen);
    return eq ? APL_CE_UPDATE : APL_CE_INSERT;
}

/* Slots a delete of a record in chain wp->leaf may allocate: copies of the
 * chain and of the meta block unless the batch already has them, and when the
 * record is the chain's last, a copy of each ancestor the removal edits (it
 * climbs while a parent would be left empty; the root is never removed). */
static uint64_t delete_need(apl_store *s, uint32_t file, const struct wpath *wp)
{
    uint32_t root = s->v->v_files[file].fl_root;
    struct apl_bhdr *h = head_of(s, wp->leaf);
    struct apl_bhdr *m = head_of(s, s->v->v_files[file].fl_meta);
    uint64_t need = h->bh_version == s->pending ? 0 : chain_len(s, h);
    if (!m || m->bh_version != s->pending)
        need++;
    if (h->bh_next != APL_ADDR_NONE || h->bh_nslots != 1 || wp->leaf == root)
        return need;
    for (int d = wp->depth - 1; d >= 0; d--) {
        struct apl_bhdr *p = head_of(s, wp->num[d]);
        if (!p || p->bh_version != s->pending)
            need++;
        if (!p || p->bh_nslots > 1 || wp->num[d] == root)
            break;
    }
    return need;
}

int apl_delete(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
               uint8_t *old, uint64_t oldcap, int64_t *oldlen)
{
    if (!s->pending)
        return APL_EBATCH;
    if (file >= s->v->v_nfiles)
        return APL_EFILE;
    if (klen == 0 || klen > s->max_key)
        return APL_EKEY;
    memset(&s->op, 0, sizeof(s->op));
    if (oldlen)
        *oldlen = -1;
    uint64_t p = apl_prefix(key, klen);
    struct wpath wp;
    int rc = wdescend(s, file, p, key, klen, &wp);
    if (rc)
        return rc;
    uint32_t ci;
    int eq;
    struct apl_bhdr *b = head_of(s, wp.leaf);
    if (!b)
        return APL_ECORRUPT;
    b = apl_chain_block(s->v, b, p, key, klen, &ci);
    uint32_t idx = apl_lower_bound(b, p, key, klen, &eq);
    if (!eq)
        return APL_NOTFOUND;
    copy_old(b, &apl_slots(b)[idx], old, oldcap, oldlen);
    /* every slot the delete may need, before anything changes: a removal that
     * fails half-way would leave a retired number linked in its parent */
    if (avail_slots(s) < delete_need(s, file, &wp))
        return APL_EFULL;
    struct apl_bhdr *h = cow(s, wp.leaf, &rc);
    if (!h)
        return rc;
    if ((rc = meta_add(s, file, -1)))
        return rc;
    b = apl_chain_block(s->v, h, p, key, klen, &ci);
    idx = apl_lower_bound(b, p, key, klen, &eq);
    s->op.block = wp.leaf;
    s->op.offset = ci * s->bsize + apl_slots(b)[idx].sl_off;
    blk_remove(s, b, idx);

    uint32_t nb = chain_len(s, h);
    if (b->bh_nslots == 0 && nb > 1) {
        /* unlink the empty block from the chain */
        if (b == h) {
            struct apl_bhdr *nx = next_of(s, h);
            apl_addr nxa = h->bh_next;
            uint16_t chain = h->bh_chain;
            blk_copy(s, h, nx); /* keeps h's version and bh_prev: readers follow them */
            h->bh_magic = APL_BLK_LEAF;
            h->bh_chain = (uint16_t)(chain - 1);
            free_slot(s, nxa);
        } else {
            struct apl_bhdr *pv = h;
            while (next_of(s, pv) != b)
                pv = next_of(s, pv);
            pv->bh_next = b->bh_next;
            free_slot(s, addr_of(s, b));
            h->bh_chain = (uint16_t)(h->bh_chain - 1);
        }
        return APL_CE_DELETE;
    }
    if (h->bh_nslots == 0 && nb == 1) {
        if (wp.leaf == s->v->v_files[file].fl_root || wp.depth == 0)
            return APL_CE_DELETE;
        if ((rc = remove_number(s, file, &wp, wp.depth)))
            return rc;
        return APL_CE_DELETE;
    }
    if (nb > 1) {
        /* merge a sparse chain into fewer blocks */
        uint64_t total;
        uint64_t n = gather(s, h, &total);
        uint64_t cap = s->bsize - HDR_SIZE;
        if (total * 2 <= cap * (nb - 1)) {
            uint64_t bounds[10];
            uint32_t k = nb - 1;
            while (k > 1 && total * 10 <= cap * (k - 1) * 7)
                k--;
            /* optional: only when the slots it takes back cover the ones it needs
             * (they may not once the reserve has been used and switched off) */
            uint64_t after = s->free_total + (nb - 1);
            int room = s->use_reserve || after >= s->reserve + (k - 1);
            if (room && (pack(s, 0, n, k, 1, bounds) || pack(s, 0, n, k, 0, bounds))) {
                for (struct apl_bhdr *o = next_of(s, h); o;) {
                    struct apl_bhdr *nx = next_of(s, o);
                    free_slot(s, addr_of(s, o));
                    o = nx;
                }
                apl_addr ov[10];
                for (uint32_t g = 1; g < k; g++)
                    ov[g - 1] = alloc_slot(s);
                write_chain(s, h, 0, bounds, k, ov);
            }
        }
    }
    return APL_CE_DELETE;
}

int apl_op_info(apl_store *s, struct apl_opinfo *info)
{
    *info = s->op;
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Files                                                               */
/* ------------------------------------------------------------------ */

int apl_store_create_file(apl_store *s, uint32_t id, const char *name, uint32_t kind, uint32_t table)
{
    if (!s->pending)
        return APL_EBATCH;
    if (id >= s->v->v_nfiles || strlen(name) >= sizeof(s->v->v_files[0].fl_name))
        return APL_EINVAL;
    struct apl_file *f = &s->v->v_files[id];
    if (f->fl_kind)
        return APL_EINVAL;
    uint32_t root = alloc_number(s), meta = alloc_number(s);
    if (root == APL_NO_BLOCK || meta == APL_NO_BLOCK)
        return APL_EFULL;
    if (s->bs) {  /* compressed: an empty leaf image and a zero count */
        uint8_t img[28] = {0};
        uint32_t leaf = APL_BLK_LEAF, m = APL_BLK_META;
        memcpy(img, &root, 4);
        memcpy(img + 4, &leaf, 4);
        memcpy(img + 8, &id, 4);
        int rc = bs_put_image(s, root, img, 20);
        memcpy(img, &meta, 4);
        memcpy(img + 4, &m, 4);
        if (rc || (rc = bs_put_image(s, meta, img, 28)))
            return rc;
    } else {
        apl_addr ra = alloc_slot(s), ma = alloc_slot(s);
        if (ra == APL_ADDR_NONE || ma == APL_ADDR_NONE)
            return APL_EFULL;
        blk_init(s, apl_ptr(s->v, ra), APL_BLK_LEAF, root, id, 0);
        blk_init(s, apl_ptr(s->v, ma), APL_BLK_META, meta, id, 0);
        STORE_REL(&s->v->v_loc[root], ra);
        STORE_REL(&s->v->v_loc[meta], ma);
    }
    memset(f, 0, sizeof(*f));
    strcpy(f->fl_name, name);
    f->fl_id = id;
    f->fl_root = root;
    f->fl_meta = meta;
    f->fl_table = table;
    STORE_REL(&f->fl_kind, kind);
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Change log                                                          */
/* ------------------------------------------------------------------ */

/* Drop entries from the tail until [pos, pos+len) overwrites nothing valid.
 * The new tail is published before the bytes are overwritten, so a reader
 * that copies an entry and then re-checks the tail notices (apl_log_read). */
static void log_make_room(apl_store *s, uint64_t pos, uint64_t len)
{
    uint64_t size = s->v->v_log_size;
    if (pos + len <= s->log_tail + size)
        return;
    uint64_t need = pos + len - size;
    while (s->log_tail < need && s->log_tail < s->log_head) {
        uint64_t off = s->log_tail % size;
        if (size - off < sizeof(struct apl_centry)) {
            s->log_tail += size - off;
            continue;
        }
        const struct apl_centry *e = (const struct apl_centry *)(s->v->v_log + off);
        s->log_tail += e->ce_len ? e->ce_len : size - off;
    }
    if (s->log_tail < need)
        s->log_tail = need;
    uint64_t g = s->v->v_sb->sb_version;
    STORE_RLX(&s->v->v_sb->sb_pub[g & 1].pb_log_tail, s->log_tail);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static struct apl_centry *log_reserve(apl_store *s, uint64_t len)
{
    uint64_t size = s->v->v_log_size;
    uint64_t pos = s->log_head;
    uint64_t off = pos % size;
    if (size - off < len) {
        uint64_t rest = size - off;
        log_make_room(s, pos, rest);
        if (rest >= sizeof(struct apl_centry)) {
            struct apl_centry *pad = (struct apl_centry *)(s->v->v_log + off);
            memset(pad, 0, sizeof(*pad));
            pad->ce_len = (uint32_t)rest;
            pad->ce_kind = APL_CE_PAD;
        }
        pos += rest;
        off = 0;
    }
    log_make_room(s, pos, len);
    s->log_head = pos + len;
    return (struct apl_centry *)(s->v->v_log + off);
}

int apl_log_append(apl_store *s, uint16_t kind, uint16_t flags, uint32_t file,
                   uint32_t block, uint32_t offset, uint64_t txn, uint64_t time_ns,
                   const uint8_t *key, uint32_t klen, const uint8_t *a, uint32_t alen,
                   const uint8_t *b, uint32_t blen, uint64_t *serial)
{
    if (!s->pending)
        return APL_EBATCH;
    uint64_t len = APL_ALIGN(sizeof(struct apl_centry) + (uint64_t)klen + alen + blen, 8);
    if (len > s->v->v_log_size / 4)
        return APL_ELOGFULL;
    struct apl_centry *e = log_reserve(s, len);
    uint8_t *payload = (uint8_t *)(e + 1);
    if (klen)
        memcpy(payload, key, klen);
    if (alen)
        memcpy(payload + klen, a, alen);
    if (blen)
        memcpy(payload + klen + alen, b, blen);
    e->ce_len = (uint32_t)len;
    e->ce_kind = kind;
    e->ce_flags = flags;
    e->ce_file = file;
    e->ce_block = block;
    e->ce_serial = ++s->serial;
    e->ce_txn = txn;
    e->ce_epoch = s->epoch;
    e->ce_time_ns = time_ns;
    e->ce_version = s->pending;
    e->ce_offset = offset;
    e->ce_klen = klen;
    e->ce_alen = alen;
    e->ce_blen = blen;
    if (serial)
        *serial = s->serial;
    return APL_OK;
}

int apl_log_block(apl_store *s, uint32_t number, uint16_t flags, uint64_t txn,
                  uint64_t time_ns, uint64_t *serial)
{
    if (!s->pending)
        return APL_EBATCH;
    if (number >= s->v->v_max_blocks)
        return APL_EINVAL;
    uint64_t cap = (uint64_t)s->bsize * (s->maxb + 1) + 64;
    uint8_t *img = malloc(cap);
    if (!img)
        return APL_ENOMEM;
    struct apl_bhdr *h = head_of(s, number);
    int64_t n = 0;
    uint32_t file = 0;
    if (h && !(flags & APL_CEF_REMOVED)) {
        n = apl_image(s->v, h, img, cap);
        file = h->bh_file;
    } else if (h) {
        file = h->bh_file;
    }
    int rc = n < 0 ? (int)n
                   : apl_log_append(s, APL_CE_BLOCK, flags, file, number, 0, txn, time_ns,
                                    0, 0, img, (uint32_t)n, 0, 0, serial);
    free(img);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Batches                                                             */
/* ------------------------------------------------------------------ */

int apl_batch_begin(apl_store *s)
{
    if (s->pending)
        return APL_EINVAL;
    s->pending = s->v->v_sb->sb_version + 1;
    return APL_OK;
}

/*
 * apl_batch_abort: give up the open batch; nothing of it is ever published.
 * This is crash recovery (apl_store_recover) run in-process over the same
 * memory, sound for the same reasons, none of which needs a process to die:
 *  - nobody has seen the batch. Readers pin published versions only (<= G)
 *    and step over newer block versions through bh_prev; the change log is
 *    read only up to the published head. Undoing a location entry is one
 *    release store back to the newest version <= G.
 *  - a reader that loaded one of the batch's location entries before that
 *    store holds a pin <= G, so it follows bh_prev away from the batch's
 *    version; recovery retires that version at G + 1, so its slots stay
 *    intact until every pin has passed G + 1, after the next publish.
 *  - the slot free lists, the number list and the retire queue are rebuilt
 *    from shared memory alone (what each location entry reaches down to the
 *    oldest pin), so whatever the batch allocated, retired or half-wrote is
 *    accounted for, whichever step it failed at.
 *  - the log's head and serial go back to the published ones; its tail
 *    stays where the batch moved it (log_make_room publishes the tail before
 *    it overwrites anything).
 * What recovery cannot read from shared memory is reset here: the reserve
 * switch and the batch's source serial (apl_set_source). The cost is one
 * pass over the location table and the slots: an error path, not a hot one.
 */
int apl_batch_abort(apl_store *s, struct apl_recovery *r)
{
    if (!s->pending)
        return APL_EBATCH;
    s->use_reserve = 0;
    s->source_set = 0;
    return apl_store_recover(s, r);
}

int apl_batch_publish(apl_store *s, uint64_t time_ns, uint64_t last_txn)
{
    if (!s->pending)
        return APL_EBATCH;
    struct apl_super *sb = s->v->v_sb;
    uint64_t v = s->pending;
    struct apl_pub *pb = &sb->sb_pub[v & 1];
    STORE_RLX(&pb->pb_version, 0);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    pb->pb_log_head = s->log_head;
    pb->pb_log_tail = s->log_tail;
    pb->pb_serial = s->serial;
    if (last_txn)
        pb->pb_txn = last_txn;
    else
        pb->pb_txn = sb->sb_pub[(v - 1) & 1].pb_txn;
    pb->pb_time_ns = time_ns;
    if (!s->source_set) {  /* carry the applied primary serial over (secondaries) */
        pb->pb_source_serial = sb->sb_pub[(v - 1) & 1].pb_source_serial;
        pb->pb_source_instance = sb->sb_pub[(v - 1) & 1].pb_source_instance;
    }
    s->source_set = 0;
    STORE_REL(&pb->pb_version, v);
    STORE_REL(&sb->sb_version, v);
    FENCE();
    s->pending = 0;
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Readers: oldest pin, sweeping, reclamation                          */
/* ------------------------------------------------------------------ */

/* Slots to scan: up to the writer's own high-water mark, which learns from
 * rh_high but is never lowered by it (a client may write rh_high). */
static uint32_t readers_high(apl_store *s)
{
    uint32_t high = LOAD_ACQ(&s->v->v_rhdr->rh_high);
    if (high > s->v->v_nreaders)
        high = s->v->v_nreaders;
    if (high > s->rhigh)
        s->rhigh = high;
    return s->rhigh;
}

/* Smallest pinned version, or the current version when nothing is pinned;
 * never below the horizon (a pin under it reads nothing: apl_layout.h).
 * *busy when some reader is between PENDING and its pin. */
static uint64_t oldest_pin(apl_store *s, int *busy, uint64_t *active)
{
    FENCE();
    uint64_t g = LOAD_ACQ(&s->v->v_sb->sb_version);
    uint64_t oldest = g;
    *busy = 0;
    if (active)
        *active = 0;
    if (!s->v->v_readers)
        return oldest;
    uint32_t high = readers_high(s);
    for (uint32_t i = 0; i < high; i++) {
        uint64_t pin = LOAD_ACQ(&s->v->v_readers[i].rs_pin);
        if (pin == APL_PIN_PENDING) {
            *busy = 1;
            continue;
        }
        if (pin && active)
            (*active)++;
        if (pin && pin < oldest)
            oldest = pin;
    }
    return oldest < s->horizon ? s->horizon : oldest;
}

/* Clear a slot held by `pid`: only the winner of the CAS pid -> BUSY writes
 * it (a claimer may take the slot the moment rs_pid is 0 again). */
static int clear_slot(apl_store *s, struct apl_reader *r, uint32_t pid)
{
    uint32_t expect = pid;
    if (pid != APL_PID_BUSY &&
        !__atomic_compare_exchange_n(&r->rs_pid, &expect, APL_PID_BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    STORE_REL(&r->rs_pin, APL_PIN_IDLE);
    STORE_RLX(&r->rs_view, 0);
    STORE_REL(&r->rs_pid, 0);
    (void)s;
    return 1;
}

int64_t apl_sweep_readers(apl_store *s)
{
    if (!s->v->v_readers)
        return 0;
    int64_t cleared = 0;
    uint32_t high = readers_high(s);
    for (uint32_t i = 0; i < high; i++) {
        struct apl_reader *r = &s->v->v_readers[i];
        uint32_t pid = LOAD_ACQ(&r->rs_pid);
        /* BUSY is only ever set by a controller clearing the slot: one that
         * stopped half-way (only one controller runs at a time) */
        if (!pid || (pid != APL_PID_BUSY && !apl_pid_gone(pid, LOAD_RLX(&r->rs_start))))
            continue;
        cleared += clear_slot(s, r, pid);
    }
    return cleared;
}

int64_t apl_readers_list(apl_store *s, struct apl_slotinfo *out, uint32_t cap)
{
    if (!s->v->v_readers)
        return 0;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->v->v_nreaders && n < cap; i++) {
        struct apl_reader *r = &s->v->v_readers[i];
        uint32_t pid = LOAD_ACQ(&r->rs_pid);
        if (!pid)
            continue;
        if (i + 1 > s->rhigh)
            s->rhigh = i + 1;
        struct apl_slotinfo *o = &out[n++];
        o->slot = i;
        o->pid = pid;
        o->start = LOAD_RLX(&r->rs_start);
        o->gen = LOAD_RLX(&r->rs_gen);
        o->pin = LOAD_RLX(&r->rs_pin);
        o->since_ns = LOAD_RLX(&r->rs_since_ns);
        o->kind = LOAD_RLX(&r->rs_kind);
        o->owned = s->v->v_rown[i].ro_pid == pid && s->v->v_rown[i].ro_start == o->start;
    }
    return n;
}

int apl_reader_own(apl_store *s, uint32_t slot, uint32_t pid, uint64_t start)
{
    if (!s->v->v_readers || slot >= s->v->v_nreaders)
        return APL_EINVAL;
    s->v->v_rown[slot].ro_start = start;
    s->v->v_rown[slot].ro_pid = pid;
    return APL_OK;
}

int apl_reader_clear(apl_store *s, uint32_t slot, uint32_t pid, uint64_t gen)
{
    if (!s->v->v_readers || slot >= s->v->v_nreaders || !pid)
        return APL_EINVAL;
    struct apl_reader *r = &s->v->v_readers[slot];
    if (LOAD_ACQ(&r->rs_gen) != gen)
        return 0;
    int cleared = clear_slot(s, r, pid);
    if (cleared)
        s->v->v_rown[slot].ro_pid = 0;
    return cleared;
}

/* The version at which block `number` was removed (its head's bh_retired, or
 * a backup object's bo_retired); 0 when it is live, UINT64_MAX when not in use. */
static uint64_t removed_at(apl_store *s, uint32_t number)
{
    apl_addr a = s->v->v_loc[number];
    if (a == APL_ADDR_NONE)
        return UINT64_MAX;
    if (s->bs)
        return bs_removed_at(s, a);
    struct apl_bhdr *h = apl_ptr(s->v, a);
    return h ? h->bh_retired : UINT64_MAX;
}

int64_t apl_reclaim(apl_store *s)
{
    if (s->v->v_readers)
        readers_high(s);  /* learn every slot claimed so far, whatever rh_high says later */
    if (s->pending || !s->rq_len)
        return 0;
    int busy;
    uint64_t oldest = oldest_pin(s, &busy, 0);
    if (busy)
        return 0;
    if (oldest > s->horizon && s->rq[s->rq_head].at <= oldest) {
        /* before anything is freed: a pin below `oldest` (wiped or forged,
         * an honest one never is) fails its reads from now on */
        s->horizon = oldest;
        STORE_REL(&s->v->v_sb->sb_horizon, oldest);
        FENCE();
    }
    int64_t freed = 0;
    while (s->rq_len) {
        struct retire *r = &s->rq[s->rq_head];
        if (r->at > oldest)
            break;
        s->retained -= r->slots;
        if (r->kind == RT_CHAIN || r->kind == RT_OBJECT) {
            if (s->bs)
                bs_release(s, r->addr);
            else
                free_chain(s, r->addr);
            freed++;
        } else if (removed_at(s, r->number) == r->at) {
            /* The number is still removed by this very removal. It may have
             * come back since: a secondary re-creates a number as soon as its
             * primary reuses it, and the primary reuses a freed number at once
             * while this store's reclaim can lag (a snapshot pins it, or the
             * removal and the reuse arrived in one apply). Then its head is a
             * live block (bh_retired 0, or a later removal's version) and this
             * entry is stale: dropping the number would lose that block. */
            apl_addr a = s->v->v_loc[r->number];
            STORE_REL(&s->v->v_loc[r->number], APL_ADDR_NONE);
            if (s->bs)
                bs_release(s, a);
            else
                free_chain(s, a);
            s->free_nums[s->nfree_nums++] = r->number;
            freed++;
        }
        s->rq_head = (s->rq_head + 1) % s->rq_cap;
        s->rq_len--;
    }
    return freed;
}

/* ------------------------------------------------------------------ */
/* Opening and recovery                                                */
/* ------------------------------------------------------------------ */

apl_store *apl_store_new(apl_view *v, uint64_t reserve_slots)
{
    apl_store *s = calloc(1, sizeof(*s));
    if (!s)
        return 0;
    s->v = v;
    s->bsize = v->v_bsize;
    s->maxb = 1 + v->v_sb->sb_max_overflow;
    s->reserve = reserve_slots;
    s->epoch = v->v_sb->sb_epoch;
    s->max_record = (s->bsize - HDR_SIZE) / 2;
    s->max_key = (s->bsize - HDR_SIZE) / 4 - SLOT_SIZE;
    if (s->max_key > APL_MAX_KEY)
        s->max_key = APL_MAX_KEY;
    s->scratch_cap = (uint64_t)(s->maxb + 3) * s->bsize;
    s->scratch = malloc(s->scratch_cap);
    s->recs_cap = s->scratch_cap / SLOT_SIZE + 16;
    s->recs = malloc(s->recs_cap * sizeof(struct rec));
    s->free_nums = malloc(v->v_max_blocks * sizeof(uint32_t));
    int ok = s->scratch && s->recs && s->free_nums;
    if (ok && (v->v_flags & APL_SB_COMPRESSED))
        ok = bs_open(s) == APL_OK;
    for (uint32_t i = 0; ok && !s->bs && i < v->v_nseg; i++)
        ok = (s->free_slots[i] = malloc(v->v_seg_slots * sizeof(uint32_t))) != 0;
    if (!ok) {
        apl_store_free(s);
        return 0;
    }
    return s;
}

void apl_store_free(apl_store *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < APL_MAX_SEGMENTS; i++)
        free(s->free_slots[i]);
    bs_free(s);
    free(s->free_nums);
    free(s->scratch);
    free(s->recs);
    free(s->rq);
    free(s);
}

void apl_store_use_reserve(apl_store *s, int on)
{
    s->use_reserve = on ? 1 : 0;
}

void apl_store_set_epoch(apl_store *s, uint64_t epoch)
{
    s->epoch = epoch;
    STORE_REL(&s->v->v_sb->sb_epoch, epoch);
}

uint64_t apl_next_txn(apl_store *s)
{
    uint64_t t = s->v->v_sb->sb_txn_next;
    STORE_REL(&s->v->v_sb->sb_txn_next, t + 1);
    return t;
}

static int cmp_retire(const void *a, const void *b)
{
    const struct retire *x = a, *y = b;
    return (x->at > y->at) - (x->at < y->at);
}

static inline void mark(uint8_t **used, apl_addr a)
{
    used[APL_ADDR_SEG(a)][APL_ADDR_SLOT(a) >> 3] |= (uint8_t)(1u << (APL_ADDR_SLOT(a) & 7));
}

static int mark_chain(apl_store *s, uint8_t **used, apl_addr a, uint64_t *count)
{
    int guard = 0;
    while (a != APL_ADDR_NONE) {
        struct apl_bhdr *b = apl_ptr(s->v, a);
        if (!b || guard++ > 64)
            return APL_ECORRUPT;
        mark(used, a);
        (*count)++;
        a = b->bh_next;
    }
    return APL_OK;
}

int apl_store_recover(apl_store *s, struct apl_recovery *r)
{
    apl_view *v = s->v;
    struct apl_super *sb = v->v_sb;
    memset(r, 0, sizeof(*r));
    s->pending = 0;
    s->rq_head = s->rq_len = 0;
    uint64_t g = sb->sb_version;
    const struct apl_pub *pb = &sb->sb_pub[g & 1];
    if (g && pb->pb_version != g)
        return APL_ECORRUPT;
    s->log_head = g ? pb->pb_log_head : 0;
    s->log_tail = g ? pb->pb_log_tail : 0;
    /* the interrupted batch may have dropped entries past the published head
     * (log_make_room); nothing valid lies beyond the head */
    if (s->log_tail > s->log_head)
        s->log_tail = s->log_head;
    s->serial = g ? pb->pb_serial : 0;
    s->epoch = sb->sb_epoch;
    s->retained = 0;
    s->horizon = sb->sb_horizon;
    r->readers_cleared = (uint64_t)apl_sweep_readers(s);
    if (s->bs) {
        /* bs_recover keeps no old version: nothing below G is readable now */
        s->horizon = g;
        STORE_REL(&sb->sb_horizon, g);
        FENCE();
        int brc = bs_recover(s, r);
        r->log_head = s->log_head;
        return brc;
    }
    /* a reader between PENDING and its pin will pin the current version; a
     * pin below the horizon (forged, or wiped and written back) is taken as
     * the horizon: versions older than it may have been freed and reused, so
     * the chains are walked back no further */
    int busy;
    uint64_t oldest = oldest_pin(s, &busy, 0);

    uint8_t *used[APL_MAX_SEGMENTS] = {0};
    uint64_t bytes = (v->v_seg_slots + 7) / 8;
    int rc = APL_OK;
    for (uint32_t i = 0; i < v->v_nseg; i++)
        if (!(used[i] = calloc(1, bytes)))
            rc = APL_ENOMEM;
    uint64_t max_used = 0;
    s->nfree_nums = 0;
    for (uint64_t num = 0; rc == APL_OK && num < v->v_max_blocks; num++) {
        apl_addr a = v->v_loc[num];
        if (a == APL_ADDR_NONE)
            continue;
        /* roll back versions the crash left unpublished */
        apl_addr a0 = a;
        while (a != APL_ADDR_NONE) {
            struct apl_bhdr *h = apl_ptr(v, a);
            if (!h) {
                rc = APL_ECORRUPT;
                break;
            }
            if (h->bh_version <= g)
                break;
            if ((rc = mark_chain(s, used, a, &r->slots_used)) ||
                (rc = retire_push(s, RT_CHAIN, a, (uint32_t)num, g + 1)))
                break;
            r->rolled_back++;
            a = h->bh_prev;
        }
        if (rc)
            break;
        if (a != a0)
            STORE_REL(&v->v_loc[num], a);
        if (a == APL_ADDR_NONE)
            continue;
        struct apl_bhdr *h = apl_ptr(v, a);
        if (h->bh_retired > g)
            h->bh_retired = 0;
        if ((rc = mark_chain(s, used, a, &r->slots_used)))
            break;
        r->blocks_live++;
        max_used = num + 1;
        if (h->bh_retired && (rc = retire_push(s, RT_NUMBER, APL_ADDR_NONE, (uint32_t)num, h->bh_retired)))
            break;
        /* older versions some reader may still see */
        struct apl_bhdr *cur = h;
        while (cur->bh_version > oldest && cur->bh_prev != APL_ADDR_NONE) {
            apl_addr pa = cur->bh_prev;
            struct apl_bhdr *pv = apl_ptr(v, pa);
            if (!pv || pv->bh_version >= cur->bh_version) {
                rc = APL_ECORRUPT;
                break;
            }
            if ((rc = mark_chain(s, used, pa, &r->slots_used)) ||
                (rc = retire_push(s, RT_CHAIN, pa, (uint32_t)num, cur->bh_version)))
                break;
            r->versions_kept++;
            cur = pv;
        }
        if (rc)
            break;
    }
    if (rc == APL_OK) {
        s->next_num = max_used;
        for (uint64_t num = max_used; num-- > 0;)
            if (v->v_loc[num] == APL_ADDR_NONE)
                s->free_nums[s->nfree_nums++] = (uint32_t)num;
        s->free_total = 0;
        for (uint32_t i = 0; i < v->v_nseg; i++) {
            s->nfree[i] = 0;
            if (!v->v_seg[i])
                continue;
            for (uint64_t sl = v->v_seg_slots; sl-- > 0;)
                if (!(used[i][sl >> 3] & (1u << (sl & 7))))
                    s->free_slots[i][s->nfree[i]++] = (uint32_t)sl;
            s->free_total += s->nfree[i];
        }
        /* the retire queue must be ordered by `at` */
        if (s->rq_len) {
            struct retire *tmp = malloc(s->rq_len * sizeof(*tmp));
            if (!tmp) {
                rc = APL_ENOMEM;
            } else {
                for (uint64_t i = 0; i < s->rq_len; i++)
                    tmp[i] = s->rq[(s->rq_head + i) % s->rq_cap];
                qsort(tmp, s->rq_len, sizeof(*tmp), cmp_retire);
                memcpy(s->rq, tmp, s->rq_len * sizeof(*tmp));
                s->rq_head = 0;
                free(tmp);
            }
        }
    }
    for (uint32_t i = 0; i < v->v_nseg; i++)
        free(used[i]);
    r->log_head = s->log_head;
    return rc;
}

int apl_store_stats(apl_store *s, struct apl_stats *st)
{
    memset(st, 0, sizeof(*st));
    apl_view *v = s->v;
    st->version = v->v_sb->sb_version;
    st->slots_total = v->v_seg_slots * v->v_nseg;
    st->slots_free = s->free_total;
    st->blocks_used = s->next_num - s->nfree_nums;
    st->max_blocks = v->v_max_blocks;
    st->retire_pending = s->rq_len;
    int busy;
    uint64_t active;
    uint64_t oldest = oldest_pin(s, &busy, &active);
    st->oldest_pin = active ? oldest : 0;
    st->readers_active = active;
    st->retained = s->retained;
    st->horizon = s->horizon;
    st->log_head = s->log_head;
    st->log_tail = s->log_tail;
    st->log_size = v->v_log_size;
    st->serial = s->serial;
    for (uint32_t i = 0; i < v->v_nseg; i++)
        st->seg_free[i] = s->nfree[i];
    if (s->bs)
        bs_stats(s, st);
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Whole transactions                                                  */
/* ------------------------------------------------------------------ */

/* One step of apl_commit_txn's `ops` buffer (8-aligned records). */
struct txn_op {
    uint8_t op;        /* APL_TXN_INSERT / UPDATE / DELETE */
    uint8_t pad[3];
    uint32_t file;
    uint32_t klen;
    uint32_t vlen;
    /* key bytes, value bytes, padding to 8 */
};

/* What an applied step needs to be undone. */
struct undo_rec {
    uint8_t op;        /* the step that was applied */
    uint32_t file;
    const uint8_t *key;
    uint32_t klen;
    uint64_t old_off;  /* B image in the undo arena */
    uint32_t old_len;
};

static int log_op(apl_store *s, int kind, uint32_t file, const uint8_t *key, uint32_t klen,
                  const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                  uint64_t txn, uint64_t now)
{
    uint16_t flags = s->op.nstruct ? APL_CEF_STRUCT : 0;
    struct apl_opinfo info = s->op; /* log_block does not touch s->op, but keep a copy */
    int rc = apl_log_append(s, (uint16_t)kind, flags, file, info.block, info.offset, txn, now,
                            key, klen, a, alen, b, blen, 0);
    for (uint32_t i = 0; rc == APL_OK && i < info.nstruct; i++)
        rc = apl_log_block(s, info.structs[i], info.removed[i] ? APL_CEF_REMOVED : 0, txn, now, 0);
    return rc;
}

/* Apply one step and log it; the B image goes to *old (caller's buffer). */
static int apply_step(apl_store *s, uint8_t op, uint32_t file, const uint8_t *key, uint32_t klen,
                      const uint8_t *val, uint32_t vlen, uint8_t *old, uint64_t oldcap, int64_t *oldlen,
                      uint64_t txn, uint64_t now)
{
    int kind;
    if (op == APL_TXN_DELETE) {
        kind = apl_delete(s, file, key, klen, old, oldcap, oldlen);
        if (kind < 0)
            return kind;
        return log_op(s, APL_CE_DELETE, file, key, klen, 0, 0, old, (uint32_t)*oldlen, txn, now);
    }
    kind = apl_put(s, file, key, klen, val, vlen, op == APL_TXN_INSERT ? APL_PUT_INSERT : APL_PUT_UPDATE,
                   old, oldcap, oldlen);
    if (kind < 0)
        return kind;
    return log_op(s, kind, file, key, klen, val, vlen, old, *oldlen > 0 ? (uint32_t)*oldlen : 0, txn, now);
}

int apl_commit_txn(apl_store *s, uint64_t txn, uint64_t now, const uint8_t *tlog, uint32_t tlen,
                   const uint8_t *ops, uint64_t ops_len, uint64_t *commit_serial, int64_t *failed_at)
{
    if (!s->pending)
        return APL_EBATCH;
    *failed_at = -1;
    int rc = apl_log_append(s, APL_CE_BEGIN, 0, 0, 0, 0, txn, now, 0, 0, tlog, tlen, 0, 0, 0);
    if (rc)
        return rc;
    /* undo information: records + an arena of B images */
    uint64_t nsteps = 0, cap_steps = 16, arena_cap = 4096, arena_len = 0;
    struct undo_rec *steps = malloc(cap_steps * sizeof(*steps));
    uint8_t *arena = malloc(arena_cap);
    uint8_t *old = malloc(s->bsize);
    int64_t oldlen = -1;
    if (!steps || !arena || !old) {
        free(steps), free(arena), free(old);
        return APL_ENOMEM;
    }
    uint64_t pos = 0;
    int64_t index = 0;
    while (rc == APL_OK && pos + sizeof(struct txn_op) <= ops_len) {
        const struct txn_op *o = (const struct txn_op *)(ops + pos);
        uint64_t len = APL_ALIGN(sizeof(*o) + (uint64_t)o->klen + o->vlen, 8);
        if (pos + sizeof(*o) + o->klen + o->vlen > ops_len || o->op < APL_TXN_INSERT || o->op > APL_TXN_DELETE) {
            rc = APL_EINVAL;
            break;
        }
        const uint8_t *key = (const uint8_t *)(o + 1);
        rc = apply_step(s, o->op, o->file, key, o->klen, key + o->klen, o->vlen, old, s->bsize, &oldlen, txn, now);
        if (rc == APL_OK) {
            uint32_t ol = oldlen > 0 ? (uint32_t)oldlen : 0;
            if (nsteps == cap_steps) {
                struct undo_rec *ns = realloc(steps, (cap_steps *= 2) * sizeof(*steps));
                if (!ns) {
                    rc = APL_ENOMEM;
                    break;
                }
                steps = ns;
            }
            if (arena_len + ol > arena_cap) {
                while (arena_len + ol > arena_cap)
                    arena_cap *= 2;
                uint8_t *na = realloc(arena, arena_cap);
                if (!na) {
                    rc = APL_ENOMEM;
                    break;
                }
                arena = na;
            }
            memcpy(arena + arena_len, old, ol);
            steps[nsteps++] = (struct undo_rec){o->op, o->file, key, o->klen, arena_len, ol};
            arena_len += ol;
        }
        pos += len;
        index++;
    }
    if (rc == APL_OK && pos != ops_len)
        rc = APL_EINVAL;
    if (rc == APL_OK) {
        rc = apl_log_append(s, APL_CE_COMMIT, 0, 0, 0, 0, txn, now, 0, 0, 0, 0, 0, 0, commit_serial);
    } else {
        /* Undo what was applied, newest first, from the B images ([0122]);
         * every reversal is logged like a change, then CANCEL. */
        *failed_at = index;
        int urc = APL_OK;
        s->use_reserve++;
        for (uint64_t i = nsteps; urc == APL_OK && i-- > 0;) {
            struct undo_rec *u = &steps[i];
            const uint8_t *b = arena + u->old_off;
            if (u->op == APL_TXN_INSERT)
                urc = apply_step(s, APL_TXN_DELETE, u->file, u->key, u->klen, 0, 0, old, s->bsize, &oldlen, txn, now);
            else if (u->op == APL_TXN_DELETE)
                urc = apply_step(s, APL_TXN_INSERT, u->file, u->key, u->klen, b, u->old_len, old, s->bsize, &oldlen, txn, now);
            else
                urc = apply_step(s, APL_TXN_UPDATE, u->file, u->key, u->klen, b, u->old_len, old, s->bsize, &oldlen, txn, now);
        }
        s->use_reserve--;
        if (urc == APL_OK)
            urc = apl_log_append(s, APL_CE_CANCEL, 0, 0, 0, 0, txn, now, 0, 0, 0, 0, 0, 0, 0);
        if (urc != APL_OK)
            rc = APL_EUNDO;
    }
    free(steps);
    free(arena);
    free(old);
    return rc;
}

/* ------------------------------------------------------------------ */
/* The secondary: applying a primary's stream by block number          */
/* ------------------------------------------------------------------ */
/*
 * A secondary keeps the primary's block numbers ([0079], [0081]). It never
 * splits: a record change goes into the chain of the block number the entry
 * names (growing the chain if needed), and every structural change on the
 * primary arrives as BLOCK images that replace whole blocks. The result is
 * logically identical block for block (apl_block_image equal for every
 * number). Counts come from the entries' kinds, which the primary computed
 * exactly. Batches are published only at transaction boundaries, with the
 * applied primary serial in the same publish (sb_pub), so a crashed agent
 * resumes exactly after the last published transaction.
 */

static void note_number(apl_store *s, uint32_t number)
{
    if (number >= s->next_num)
        s->next_num = number + 1;
}

/* Lay recs[0, n) into the chain of `head` with as many blocks as needed. */
static int fill_chain(apl_store *s, struct apl_bhdr *head, uint64_t n)
{
    uint64_t cap = s->bsize - HDR_SIZE, bytes = 0;
    for (uint64_t i = 0; i < n; i++)
        bytes += rec_bytes(&s->recs[i]);
    /* greedy: fill each block before the next (records are <= cap / 2) */
    uint64_t bounds[64];
    uint32_t nb = 0;
    uint64_t used = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t rb = rec_bytes(&s->recs[i]);
        if (used + rb > cap) {
            if (nb == 63)
                return APL_ETOOBIG;
            bounds[nb++] = i;
            used = 0;
        }
        used += rb;
    }
    bounds[nb++] = n;
    (void)bytes;
    for (struct apl_bhdr *o = next_of(s, head); o;) {
        struct apl_bhdr *nx = next_of(s, o);
        free_slot(s, addr_of(s, o));
        o = nx;
    }
    head->bh_next = APL_ADDR_NONE;
    if (avail_slots(s) < nb - 1)
        return APL_EFULL;
    apl_addr ov[64];
    for (uint32_t g = 1; g < nb; g++)
        ov[g - 1] = alloc_slot(s);
    write_chain(s, head, 0, bounds, nb, ov);
    return APL_OK;
}

/* The head of `number` made writable, or a new chain when it does not exist. */
static struct apl_bhdr *cow_or_create(apl_store *s, uint32_t number, uint32_t magic, uint32_t file,
                                      uint16_t level, int *err)
{
    if (number >= s->v->v_max_blocks) {
        *err = APL_EINVAL;
        return 0;
    }
    if (s->v->v_loc[number] != APL_ADDR_NONE) {
        struct apl_bhdr *h = cow(s, number, err);
        if (h && h->bh_retired) {
            h->bh_retired = 0; /* a removed number that comes back */
        }
        return h;
    }
    apl_addr a = alloc_slot(s);
    if (a == APL_ADDR_NONE) {
        *err = APL_EFULL;
        return 0;
    }
    struct apl_bhdr *h = apl_ptr(s->v, a);
    blk_init(s, h, magic, number, file, level);
    STORE_REL(&s->v->v_loc[number], a);
    note_number(s, number);
    return h;
}

#define GET(T, dst) do { if (p + sizeof(T) > end) return APL_ECORRUPT; memcpy(&(dst), p, sizeof(T)); p += sizeof(T); } while (0)

int apl_apply_image(apl_store *s, uint32_t number, const uint8_t *img, uint64_t len)
{
    if (!s->pending)
        return APL_EBATCH;
    if (s->bs) {
        if (img && len && (len < 20 || memcmp(img, &number, 4) != 0))
            return APL_ECORRUPT;
        return bs_put_image(s, number, len ? img : 0, len);
    }
    int err = 0;
    if (!img || len == 0) {
        /* the number is not in use on the primary */
        struct apl_bhdr *h = head_of(s, number);
        if (!h || h->bh_retired)
            return APL_OK;
        h->bh_retired = s->pending;
        return retire_push(s, RT_NUMBER, APL_ADDR_NONE, number, s->pending);
    }
    const uint8_t *p = img, *end = img + len;
    uint32_t num, magic, file, nrec;
    uint16_t level, pad;
    GET(uint32_t, num);
    GET(uint32_t, magic);
    GET(uint32_t, file);
    GET(uint16_t, level);
    GET(uint16_t, pad);
    GET(uint32_t, nrec);
    (void)pad;
    if (num != number || file >= s->v->v_nfiles ||
        (magic != APL_BLK_LEAF && magic != APL_BLK_INNR && magic != APL_BLK_META))
        return APL_ECORRUPT;
    if (magic == APL_BLK_META) {
        uint64_t count;
        GET(uint64_t, count);
        struct apl_bhdr *h = cow_or_create(s, number, magic, file, 0, &err);
        if (!h)
            return err;
        h->bh_count = count;
        return APL_OK;
    }
    if (nrec > s->recs_cap)
        return APL_ECORRUPT;
    for (uint32_t i = 0; i < nrec; i++) {
        uint16_t kl;
        uint32_t aux;
        GET(uint16_t, kl);
        GET(uint32_t, aux);
        uint32_t vl = magic == APL_BLK_LEAF ? aux : 0;
        if (p + kl + vl > end || kl > s->max_key)
            return APL_ECORRUPT;
        struct rec *r = &s->recs[i];
        r->prefix = apl_prefix(p, kl);
        r->k = p;
        r->klen = kl;
        r->val = p + kl;
        r->vlen = vl;
        r->aux = aux;
        if ((uint64_t)SLOT_SIZE + kl + vl > (s->bsize - HDR_SIZE))
            return APL_ECORRUPT;
        p += kl + vl;
    }
    struct apl_bhdr *h = cow_or_create(s, number, magic, file, level, &err);
    if (!h)
        return err;
    h->bh_magic = magic;
    h->bh_level = level;
    h->bh_file = file;
    if (magic == APL_BLK_INNR) {
        for (struct apl_bhdr *o = next_of(s, h); o;) {
            struct apl_bhdr *nx = next_of(s, o);
            free_slot(s, addr_of(s, o));
            o = nx;
        }
        h->bh_next = APL_ADDR_NONE;
        blk_reset(s, h);
        for (uint32_t i = 0; i < nrec; i++) {
            if (blk_room(h) < rec_bytes(&s->recs[i]))
                return APL_ECORRUPT;
            blk_append(h, &s->recs[i]);
        }
        return APL_OK;
    }
    return fill_chain(s, h, nrec);
}

/* Upsert or delete one record in the chain of block `number`. */
int bs_apply_record(apl_store *s, uint32_t number, int kind, const uint8_t *key, uint32_t klen,
                    const uint8_t *val, uint32_t vlen, int delta);
int bs_count_add(apl_store *s, uint32_t meta, int64_t delta);

static int apply_record(apl_store *s, uint32_t number, int kind, const uint8_t *key, uint32_t klen,
                        const uint8_t *val, uint32_t vlen, int delta)
{
    if (s->bs)
        return bs_apply_record(s, number, kind, key, klen, val, vlen, delta);
    if (number >= s->v->v_max_blocks || !head_of(s, number))
        return APL_ECORRUPT;
    if (klen == 0 || klen > s->max_key)
        return APL_ECORRUPT;
    int err = 0;
    struct apl_bhdr *h = cow(s, number, &err);
    if (!h)
        return err;
    if (h->bh_level != 0)
        return APL_ECORRUPT;
    uint64_t p = apl_prefix(key, klen);
    uint32_t ci;
    int eq;
    struct apl_bhdr *b = apl_chain_block(s->v, h, p, key, klen, &ci);
    uint32_t idx = apl_lower_bound(b, p, key, klen, &eq);
    if (kind == APL_CE_DELETE) {
        if (!eq)
            return APL_OK;
        blk_remove(s, b, idx);
        if (b->bh_nslots == 0 && b != h) {
            struct apl_bhdr *pv = h;
            while (next_of(s, pv) != b)
                pv = next_of(s, pv);
            pv->bh_next = b->bh_next;
            free_slot(s, addr_of(s, b));
        }
        return APL_OK;
    }
    uint8_t *newval = 0;
    if (delta) {
        /* A = old[:off] + new + old[off+replaced:] */
        if (!eq || vlen < 8)
            return APL_ECORRUPT;
        uint32_t off, rep;
        memcpy(&off, val, 4);
        memcpy(&rep, val + 4, 4);
        const struct apl_slot *sl = &apl_slots(b)[idx];
        const uint8_t *old = apl_slot_key(b, sl) + sl->sl_klen;
        uint32_t oldlen = sl->sl_aux;
        if ((uint64_t)off + rep > oldlen)
            return APL_ECORRUPT;
        uint32_t nl = oldlen - rep + (vlen - 8);
        newval = malloc(nl ? nl : 1);
        if (!newval)
            return APL_ENOMEM;
        memcpy(newval, old, off);
        memcpy(newval + off, val + 8, vlen - 8);
        memcpy(newval + off + (vlen - 8), old + off + rep, oldlen - off - rep);
        val = newval;
        vlen = nl;
    }
    if ((uint64_t)SLOT_SIZE + klen + vlen > s->max_record) {
        free(newval);
        return APL_ECORRUPT;
    }
    struct rec r = {.prefix = p, .k = key, .klen = klen, .val = val, .vlen = vlen, .aux = vlen};
    int rc = APL_OK;
    if (eq) {
        struct apl_slot *sl = &apl_slots(b)[idx];
        if (vlen <= sl->sl_aux) {
            memcpy((uint8_t *)b + sl->sl_off + klen, val, vlen);
            b->bh_garbage = (uint16_t)(b->bh_garbage + (sl->sl_aux - vlen));
            sl->sl_aux = vlen;
            free(newval);
            return APL_OK;
        }
        if ((uint64_t)blk_room(b) + b->bh_garbage + sl->sl_aux >= vlen) {
            blk_remove(s, b, idx);
            blk_insert(s, b, idx, &r);
            free(newval);
            return APL_OK;
        }
    } else if (blk_insert(s, b, idx, &r)) {
        free(newval);
        return APL_OK;
    }
    /* the block is full: rewrite the chain with one more block (no split) */
    uint32_t cur_nb = chain_len(s, h);
    if ((uint64_t)(cur_nb + 2) * s->bsize > s->scratch_cap) {
        uint64_t ncap = (uint64_t)(cur_nb + 3) * s->bsize;
        uint8_t *ns = realloc(s->scratch, ncap);
        struct rec *nr = realloc(s->recs, (ncap / SLOT_SIZE + 16) * sizeof(struct rec));
        if (ns)
            s->scratch = ns;
        if (nr)
            s->recs = nr;
        if (!ns || !nr) {
            free(newval);
            return APL_ENOMEM;
        }
        s->scratch_cap = ncap;
        s->recs_cap = ncap / SLOT_SIZE + 16;
    }
    uint64_t total;
    uint64_t n = gather_with(s, h, cur_nb, p, key, klen, val, vlen, eq, &total);
    free(newval);
    rc = fill_chain(s, h, n);
    return rc;
}

static int count_add(apl_store *s, uint32_t file, int64_t delta, const uint8_t *copied, uint64_t nbits)
{
    if (file >= s->v->v_nfiles)
        return APL_ECORRUPT;
    uint32_t meta = s->v->v_files[file].fl_meta;
    if (copied && (meta >= nbits || !(copied[meta >> 3] & (1u << (meta & 7)))))
        return APL_OK; /* not copied yet: the copy will carry the count */
    if (s->bs)
        return bs_count_add(s, meta, delta);
    int err = 0;
    struct apl_bhdr *m = cow(s, meta, &err);
    if (!m)
        return err;
    m->bh_count = (uint64_t)((int64_t)m->bh_count + delta);
    return APL_OK;
}

int apl_apply_entries(apl_store *s, const uint8_t *buf, uint64_t len, uint64_t after_serial,
                      const uint8_t *copied, uint64_t nbits, uint64_t *consumed,
                      uint64_t *last_serial, uint64_t *last_commit)
{
    if (!s->pending)
        return APL_EBATCH;
    uint64_t pos = 0, boundary = 0, expect = after_serial + 1;
    uint64_t serial = after_serial, commit = 0;
    int rc = APL_OK;
    /* First pass: check every entry's framing and serial and find the end of
     * the last whole transaction, changing nothing: a transaction cut at the
     * end of the buffer must not be applied (it comes again, whole, later). */
    uint64_t limit = 0;
    {
        uint64_t p = 0, exp = after_serial + 1;
        while (p + sizeof(struct apl_centry) <= len) {
            const struct apl_centry *e = (const struct apl_centry *)(buf + p);
            if (e->ce_len < sizeof(*e) || (e->ce_len & 7) || p + e->ce_len > len ||
                sizeof(*e) + (uint64_t)e->ce_klen + e->ce_alen + e->ce_blen > e->ce_len ||
                e->ce_kind < APL_CE_BEGIN || e->ce_kind > APL_CE_BLOCK)
                return APL_ECORRUPT;
            if (e->ce_serial >= exp) {
                if (e->ce_serial != exp)
                    return APL_ECORRUPT; /* a gap inside one message */
                exp++;
            }
            p += e->ce_len;
            if (e->ce_kind == APL_CE_COMMIT || e->ce_kind == APL_CE_CANCEL)
                limit = p;
        }
    }
    while (pos + sizeof(struct apl_centry) <= limit) {
        const struct apl_centry *e = (const struct apl_centry *)(buf + pos);
        if (e->ce_serial < expect) { /* a duplicate: already applied */
            pos += e->ce_len;
            boundary = pos;
            continue;
        }
        const uint8_t *key = (const uint8_t *)(e + 1);
        const uint8_t *a = key + e->ce_klen;
        int skip = copied && (e->ce_block >= nbits || !(copied[e->ce_block >> 3] & (1u << (e->ce_block & 7))));
        switch (e->ce_kind) {
        case APL_CE_INSERT:
        case APL_CE_UPDATE:
        case APL_CE_DELETE:
            if (e->ce_kind != APL_CE_UPDATE)
                rc = count_add(s, e->ce_file, e->ce_kind == APL_CE_INSERT ? 1 : -1, copied, nbits);
            if (rc == APL_OK && !(e->ce_flags & APL_CEF_STRUCT) && !skip)
                rc = apply_record(s, e->ce_block, e->ce_kind, key, e->ce_klen, a, e->ce_alen,
                                  (e->ce_flags & APL_CEF_DELTA) != 0);
            break;
        case APL_CE_BLOCK:
            if (!skip)
                rc = (e->ce_flags & APL_CEF_REMOVED) ? apl_apply_image(s, e->ce_block, 0, 0)
                                                     : apl_apply_image(s, e->ce_block, a, e->ce_alen);
            break;
        case APL_CE_COMMIT:
        case APL_CE_CANCEL:
            commit = e->ce_serial;
            break;
        case APL_CE_BEGIN:
            break;
        default:
            rc = APL_ECORRUPT;
        }
        if (rc)
            return rc;
        serial = e->ce_serial;
        expect = serial + 1;
        pos += e->ce_len;
        if (e->ce_kind == APL_CE_COMMIT || e->ce_kind == APL_CE_CANCEL) {
            boundary = pos;
            *last_serial = serial;
            *last_commit = commit;
        }
    }
    *consumed = boundary;
    return APL_OK;
}

void apl_set_source(apl_store *s, uint64_t serial, uint64_t instance)
{
    /* written into the record of the version being built; published with it */
    struct apl_pub *pb = &s->v->v_sb->sb_pub[(s->pending ? s->pending : s->v->v_sb->sb_version + 1) & 1];
    pb->pb_source_serial = serial;
    pb->pb_source_instance = instance;
    s->source_set = 1;
}

/* Apply a batch of copied images (apl_block_images format); mark them copied. */
int apl_apply_images(apl_store *s, const uint8_t *buf, uint64_t len, uint8_t *copied, uint64_t nbits)
{
    uint64_t p = 0;
    while (p + 8 <= len) {
        uint32_t num, l;
        memcpy(&num, buf + p, 4);
        memcpy(&l, buf + p + 4, 4);
        if (p + 8 + l > len || num >= nbits)
            return APL_ECORRUPT;
        int rc = apl_apply_image(s, num, buf + p + 8, l);
        if (rc)
            return rc;
        copied[num >> 3] |= (uint8_t)(1u << (num & 7));
        p += 8 + (uint64_t)l;
    }
    return p == len ? APL_OK : APL_ECORRUPT;
}

/* The end of a copy: remove every number in use here that the copy did not
 * bring (the primary no longer has it). Returns how many were removed. */
int64_t apl_drop_uncopied(apl_store *s, const uint8_t *copied, uint64_t nbits)
{
    int64_t dropped = 0;
    for (uint64_t n = 0; n < s->v->v_max_blocks; n++) {
        if (n < nbits && (copied[n >> 3] & (1u << (n & 7))))
            continue;
        apl_addr a = s->v->v_loc[n];
        if (a == APL_ADDR_NONE)
            continue;
        int rc = apl_apply_image(s, (uint32_t)n, 0, 0);
        if (rc)
            return rc;
        dropped++;
    }
    return dropped;
}
