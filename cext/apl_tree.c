/*
 * apl_tree.c — the primary's trees of numbered blocks (the controller, one
 * thread): creating a file, descending with a path for a write, put and
 * delete, and the structural work they cause: a chain that outgrows its
 * blocks is redistributed, grown, shares records with a sibling chain
 * (share_with_sibling) or is split into chains with new numbers
 * (layout_chain), separators go into inner blocks (insert_sep, split_inner),
 * an emptied chain's number is removed (remove_number), and every operation
 * records the blocks whose structure changed (apl_op_info), which
 * apl_commit_txn logs as BLOCK images. Edits of one chain are apl_chain.c's.
 *
 * Structural work (a chain that outgrows its blocks, a split, a removal) first
 * checks that enough free slots and block numbers exist for the worst case, so
 * an operation either completes or fails with APL_EFULL having changed nothing.
 * A small reserve of slots is kept back for undoing a failed transaction from
 * its B logs (apl_store_use_reserve).
 */

#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

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
/* Packing records into blocks                                       */
/* ------------------------------------------------------------------ */

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
    loc_publish(s, rnum, raddr);
    op_struct(s, rnum, 0);
    op_struct(s, number, 0);
    /* separator: the right block's first key (kept in its slot 0, which routes
     * everything below its second key) */
    struct rec sep = s->recs[bounds[0]];
    uint8_t keybuf[APL_MAX_KEY];
    rec_own_key(&sep, keybuf);
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
    loc_publish(s, lnum, laddr);
    op_struct(s, lnum, 0);
    uint16_t level = (uint16_t)(b->bh_level + 1);
    blk_reset(s, b);
    b->bh_level = level;
    struct rec first = {.prefix = 0, .ks = keybuf, .klen = 0, .vlen = 0, .aux = lnum};
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
    uint8_t full[APL_MAX_KEY];
    apl_key_out(full, sep->prefix, sep->ks, sep->klen);
    int rc = wdescend(s, file, sep->prefix, full, sep->klen, &wp);
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
    rec_own_key(&r, keybuf);
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

/* The addresses of a pending chain's overflow blocks, in order (at most 64). */
static void ovfl_addrs(apl_store *s, struct apl_bhdr *head, apl_addr *out)
{
    uint32_t k = 0;
    for (struct apl_bhdr *o = next_of(s, head); o && k < 64; o = next_of(s, o))
        out[k++] = addr_of(s, o);
}

/*
 * Before a full chain splits: share its records with a sibling chain of the
 * same parent that has room (right first, then left), so that both keep
 * their blocks at under 95% fill; only the right one's separator in the
 * parent changes (B*-trees do the same). A sibling has room when at least a
 * quarter of its blocks is free: a share logs both chains and the parent as
 * BLOCK images, so sharing with any sibling under 95% (leaves ~78% full
 * after random inserts, against ~66% with splits alone) would log 3.4 times
 * the bytes a random insert logs with splits alone, sharing only with a
 * sibling a quarter free 1.8 times, for leaves ~73% full (100,000 random
 * inserts of 104-byte records, 4 KiB blocks). recs[0, n) is the chain's new
 * content, as for layout_chain; it is left as it was when no sibling can
 * take a share (returns 1: split instead). Returns APL_OK when shared, 1
 * when not, an error (nothing changed) else.
 */
static int share_with_sibling(apl_store *s, uint32_t number, struct apl_bhdr *head,
                              uint64_t n, uint64_t total, uint32_t cur_nb, struct wpath *wp)
{
    if (wp->depth == 0)
        return 1;
    uint64_t cap = s->bsize - HDR_SIZE;
    uint32_t pnum = wp->num[wp->depth - 1], ci = wp->idx[wp->depth - 1];
    struct apl_bhdr *pb = head_of(s, pnum);
    if (!pb || ci >= pb->bh_nslots)
        return APL_ECORRUPT;
    for (int side = 0; side < 2; side++) {
        uint32_t j = side == 0 ? ci + 1 : ci - 1;
        if ((side == 0 && j >= pb->bh_nslots) || (side == 1 && ci == 0))
            continue;
        uint32_t sib = apl_slots(pb)[j].sl_aux;
        struct apl_bhdr *sh = head_of(s, sib);
        if (!sh || sh->bh_level != 0)
            continue;
        /* the sibling's size, from its slots */
        uint64_t stotal = 0, srecs = 0;
        uint32_t snb = 0;
        for (struct apl_bhdr *c = sh; c && snb < 64; c = next_of(s, c), snb++)
            for (uint32_t i = 0; i < c->bh_nslots; i++, srecs++)
                stotal += slot_bytes(&apl_slots(c)[i]);
        uint32_t nb = cur_nb + snb;
        if ((total + stotal) * 20 > cap * nb * 19 || stotal * 4 > cap * snb * 3)
            continue;
        /* capacity: copies of the sibling and of the parent, the combined
         * records behind recs[0, n), the sibling's blocks behind ours */
        uint64_t need = (sh->bh_version == s->pending ? 0 : snb) + (pb->bh_version == s->pending ? 0 : 1);
        uint64_t m = n + srecs;
        if (avail_slots(s) < need || 2 * n + srecs > s->recs_cap ||
            (uint64_t)(cur_nb + 1 + snb) * s->bsize > s->scratch_cap)
            return 1;
        /* the two chains' records in key order at recs[n, n + m) */
        struct rec *all = s->recs + n;
        uint64_t st;
        if (side == 0) {
            memcpy(all, s->recs, n * sizeof(struct rec));
            gather_at(s, sh, cur_nb + 1, all + n, &st);
        } else {
            gather_at(s, sh, cur_nb + 1, all, &st);
            memcpy(all + srecs, s->recs, n * sizeof(struct rec));
        }
        uint32_t lnb = side == 0 ? cur_nb : snb, rnb = nb - lnb;
        /* the split point: bytes in proportion to the blocks each keeps */
        uint64_t target = (total + stotal) * lnb / nb, acc = 0, at = 0;
        while (at + 1 < m && acc + rec_bytes(&all[at]) <= target)
            acc += rec_bytes(&all[at++]);
        if (at == 0)
            at = 1;
        uint64_t lb[64], rb[64];
        uint64_t cut = 0;
        for (uint64_t d = 0; d < 8 && !cut; d++) {
            uint64_t tries[2] = {at + d, at - d};
            for (int t = 0; t < 2 && !cut; t++) {
                uint64_t c = tries[t];
                if (c >= 1 && c < m && pack(s, n, n + c, lnb, 1, lb) && pack(s, n + c, n + m, rnb, 1, rb))
                    cut = c;
            }
        }
        if (!cut)
            continue;
        /* the right chain's new separator must fit in the parent in place of its old one */
        const struct rec *first = &all[cut];
        const struct apl_slot *old = &apl_slots(pb)[side == 0 ? j : ci];
        if ((uint64_t)blk_room(pb) + pb->bh_garbage + APL_KSFX(old->sl_klen) < APL_KSFX(first->klen))
            continue;

        /* from here on nothing fails but the copies: capacity was checked. A
         * sibling that cannot be copied (damaged, on a detached device) is
         * left alone, and the chain splits instead. */
        int rc = 0;
        struct apl_bhdr *sc = cow(s, sib, &rc);
        if (!sc)
            return 1;
        struct apl_bhdr *pc = cow(s, pnum, &rc);
        if (!pc)
            return rc;
        struct apl_bhdr *lh = side == 0 ? head : sc, *rh = side == 0 ? sc : head;
        apl_addr lov[64], rov[64];   /* both keep their blocks: their overflow blocks are rewritten */
        ovfl_addrs(s, lh, lov);
        ovfl_addrs(s, rh, rov);
        write_chain(s, lh, n, lb, lnb, lov);
        write_chain(s, rh, n + cut, rb, rnb, rov);
        uint8_t keybuf[APL_MAX_KEY];
        struct rec sep = *first;
        rec_own_key(&sep, keybuf);
        sep.vlen = 0;
        sep.aux = rh->bh_number;
        uint32_t rj = side == 0 ? j : ci;
        blk_remove(s, pc, rj);
        if (!blk_insert(s, pc, rj, &sep))
            return APL_ECORRUPT;   /* excluded by the room check above */
        op_struct(s, number, 0);
        op_struct(s, sib, 0);
        op_struct(s, pnum, 0);
        return APL_OK;
    }
    return 1;
}

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
        int rc = share_with_sibling(s, number, head, n, total, cur_nb, wp);
        if (rc <= 0)
            return rc;
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
        rec_own_key(&seps[c], sepkeys[c]);
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
        loc_publish(s, num, ha);
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
        memcpy(old, apl_slot_val(b, sl), sl->sl_aux);
    return APL_OK;
}

static int put_in(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
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
    struct rec r = {.prefix = p, .ks = apl_sfx(key, klen), .klen = klen, .val = val, .vlen = vlen, .aux = vlen};
    if (eq) {
        struct apl_slot *sl = &apl_slots(b)[idx];
        uint32_t oldv = sl->sl_aux;
        if (vlen <= oldv) {
            memcpy((uint8_t *)apl_slot_val(b, sl), val, vlen);
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
            loc_publish(s, num, ha);
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

static int delete_in(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
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
        loc_publish(s, root, ra);
        loc_publish(s, meta, ma);
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

/* A block of the path that the tree walk found nowhere, while a device is
 * detached: its location entry is marked (apl_devices.c), so the change
 * needs a block on that device. */
static int device_rc(const apl_store *s, int rc)
{
    return rc == APL_ECORRUPT && s->v->v_sb->sb_detached ? APL_EDEVICE : rc;
}

int apl_put(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
            const uint8_t *val, uint32_t vlen, uint32_t mode,
            uint8_t *old, uint64_t oldcap, int64_t *oldlen)
{
    return device_rc(s, put_in(s, file, key, klen, val, vlen, mode, old, oldcap, oldlen));
}

int apl_delete(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
               uint8_t *old, uint64_t oldcap, int64_t *oldlen)
{
    return device_rc(s, delete_in(s, file, key, klen, old, oldcap, oldlen));
}
