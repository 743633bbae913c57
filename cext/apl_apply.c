/*
 * apl_apply.c — a secondary applying its primary's stream (the controller,
 * one thread): change entries (apl_apply_entries), BLOCK images and a first
 * copy's images (apl_apply_image, apl_apply_images, apl_drop_uncopied), and
 * the primary serial a batch brings this secondary to (apl_set_source). For
 * a store of lz4 backup blocks the edits are apl_bstore.c's (apply_record,
 * count_add and apl_apply_image dispatch to it).
 *
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

#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

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

/* A new one-block head for a number whose chain has a block on a detached
 * device (its location entry has APL_ADDR_OFF): the image fills it, nothing
 * is copied from the old chain. The old chain stays reachable through
 * bh_prev for the pins that still see it and goes to the retire queue, so
 * the detached device's slots come back as those pins pass. */
static struct apl_bhdr *refill_head(apl_store *s, uint32_t number, uint32_t magic, uint32_t file,
                                    uint16_t level, int *err)
{
    apl_addr old = apl_loc_raw(s->v->v_loc[number]);
    apl_addr a = alloc_slot(s);
    if (a == APL_ADDR_NONE) {
        *err = APL_EFULL;
        return 0;
    }
    int rc = retire_push(s, RT_CHAIN, old, number, s->pending);
    if (rc) {
        free_slot(s, a);
        *err = rc;
        return 0;
    }
    struct apl_bhdr *h = apl_ptr(s->v, a);
    blk_init(s, h, magic, number, file, level);
    h->bh_prev = old;
    loc_publish(s, number, a);
    return h;
}

/* The head of `number` made writable, or a new chain when it does not exist. */
static struct apl_bhdr *cow_or_create(apl_store *s, uint32_t number, uint32_t magic, uint32_t file,
                                      uint16_t level, int *err)
{
    if (number >= s->v->v_max_blocks) {
        *err = APL_EINVAL;
        return 0;
    }
    if (apl_loc_off(s->v->v_loc[number]))
        return refill_head(s, number, magic, file, level, err);
    if (s->v->v_loc[number] != APL_ADDR_NONE) {
        s->replacing = 1;     /* the image replaces the content: a damaged one too ([0123] repair) */
        struct apl_bhdr *h = cow(s, number, err);
        s->replacing = 0;
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
    loc_publish(s, number, a);
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
        apl_addr a = s->v->v_loc[number];
        if (apl_loc_off(a))                /* its chain is intact under the mark: retire that */
            loc_publish(s, number, a = apl_loc_raw(a));
        struct apl_bhdr *h = a == APL_ADDR_NONE ? 0 : apl_ptr(s->v, a);
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
        h->bh_magic = magic;
        h->bh_file = file;
        h->bh_level = 0;
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
        r->ks = apl_sfx(p, kl);
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

int apply_record(apl_store *s, uint32_t number, int kind, const uint8_t *key, uint32_t klen,
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
        const uint8_t *old = apl_slot_val(b, sl);
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
    struct rec r = {.prefix = p, .ks = apl_sfx(key, klen), .klen = klen, .val = val, .vlen = vlen, .aux = vlen};
    int rc = APL_OK;
    if (eq) {
        struct apl_slot *sl = &apl_slots(b)[idx];
        if (vlen <= sl->sl_aux) {
            memcpy((uint8_t *)apl_slot_val(b, sl), val, vlen);
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

int count_add(apl_store *s, uint32_t file, int64_t delta, const uint8_t *copied, uint64_t nbits)
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
