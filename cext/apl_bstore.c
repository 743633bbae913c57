/*
 * apl_bstore.c — a secondary's lz4 backup blocks (format: apl_layout.h,
 * "Compressed backup blocks"). Controller process only, one thread, like
 * the block store, whose batches and publishing (apl_txn.c) and retire
 * queue (apl_alloc.c) it shares: an object replaced in a batch is retired
 * at the batch's version, so an unpublished batch rolls back after a crash
 * exactly as block versions do.
 *
 * Allocation: device segments are cut into pages; a page serves one size
 * class. Free objects of each class sit on a stack (process memory, rebuilt
 * by recovery from the live objects the location table reaches). Pages
 * never return to the free-page pool once classed (a simplification: the
 * mix of sizes in a backup store is stable).
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include <lz4.h>

#include "apl_store_int.h"

#define OBJ_HDR ((uint32_t)sizeof(struct apl_bobj))

struct bclass {
    uint32_t size;
    uint64_t *addr;      /* free objects */
    uint64_t n, cap;
};

struct bstore {
    uint32_t page;
    uint64_t pages_per_seg;
    uint8_t *page_class;          /* [seg * pages_per_seg + page]: class + 1, 0 = free */
    uint64_t *free_pages;         /* seg << 32 | page */
    uint64_t nfree_pages;
    uint64_t pages_used;
    uint64_t bytes_live;          /* object bytes (class sizes) in use */
    struct bclass cls[APL_BCLASSES];
    uint8_t *raw, *edit, *comp;   /* scratch: decompressed image, edited image, compressed */
    uint64_t rawcap, compcap;
};

static void class_sizes(uint32_t *out)
{
    uint32_t n = 0, sz = 0;
    static const uint32_t step[] = {64, 128, 256, 512, 1024, 4096};
    static const uint32_t upto[] = {1024, 2048, 4096, 8192, 16384, 65536};
    for (int r = 0; r < 6; r++)
        for (sz += step[r]; sz <= upto[r] && n < APL_BCLASSES; sz += step[r])
            out[n++] = sz;
}

static inline struct apl_bobj *obj_at(const apl_view *v, apl_addr a)
{
    uint32_t seg = APL_ADDR_SEG(a);
    uint64_t off = APL_ADDR_SLOT(a);
    uint64_t limit = (v->v_seg_slots + 1) * (uint64_t)v->v_sb->sb_page_size;
    if (seg >= v->v_nseg || !v->v_seg[seg] || off < v->v_sb->sb_page_size || off + OBJ_HDR > limit)
        return 0;
    struct apl_bobj *o = (struct apl_bobj *)(v->v_seg[seg] + off);
    if (o->bo_magic != APL_MAGIC_BOBJ || off + OBJ_HDR + (uint64_t)o->bo_clen > limit)
        return 0;
    return o;
}

int bs_open(apl_store *s)
{
    struct bstore *b = calloc(1, sizeof(*b));
    if (!b)
        return APL_ENOMEM;
    const apl_view *v = s->v;
    b->page = v->v_sb->sb_page_size;
    b->pages_per_seg = v->v_seg_slots + 1;   /* page 0 holds the segment header */
    uint32_t sizes[APL_BCLASSES];
    class_sizes(sizes);
    for (uint32_t i = 0; i < APL_BCLASSES; i++)
        b->cls[i].size = sizes[i];
    b->page_class = calloc(v->v_nseg * b->pages_per_seg, 1);
    b->free_pages = malloc(v->v_nseg * b->pages_per_seg * sizeof(uint64_t));
    b->rawcap = b->page;
    b->compcap = (uint64_t)LZ4_compressBound((int)b->page) + OBJ_HDR;
    b->raw = malloc(b->rawcap);
    b->edit = malloc(b->rawcap + 8192);
    b->comp = malloc(b->compcap);
    s->bs = b;
    if (!b->page_class || !b->free_pages || !b->raw || !b->edit || !b->comp) {
        bs_free(s);
        return APL_ENOMEM;
    }
    return APL_OK;
}

void bs_free(apl_store *s)
{
    struct bstore *b = s->bs;
    if (!b)
        return;
    for (uint32_t i = 0; i < APL_BCLASSES; i++)
        free(b->cls[i].addr);
    free(b->page_class);
    free(b->free_pages);
    free(b->raw);
    free(b->edit);
    free(b->comp);
    free(b);
    s->bs = 0;
}

static int push_free(struct bclass *c, uint64_t a)
{
    if (c->n == c->cap) {
        uint64_t ncap = c->cap ? c->cap * 2 : 256;
        uint64_t *na = realloc(c->addr, ncap * sizeof(uint64_t));
        if (!na)
            return APL_ENOMEM;
        c->addr = na;
        c->cap = ncap;
    }
    c->addr[c->n++] = a;
    return APL_OK;
}

static int class_for(struct bstore *b, uint64_t need)
{
    for (uint32_t i = 0; i < APL_BCLASSES; i++)
        if (b->cls[i].size >= need && b->cls[i].size <= b->page)
            return (int)i;
    return -1;
}

/* Carve a free page into objects of class ci. */
static int take_page(apl_store *s, uint32_t ci)
{
    struct bstore *b = s->bs;
    if (!b->nfree_pages)
        return APL_EFULL;
    uint64_t pg = b->free_pages[--b->nfree_pages];
    uint32_t seg = (uint32_t)(pg >> 32);
    uint64_t p = pg & 0xFFFFFFFFu;
    b->page_class[seg * b->pages_per_seg + p] = (uint8_t)(ci + 1);
    b->pages_used++;
    uint32_t sz = b->cls[ci].size;
    uint64_t start = p * b->page, n = b->page / sz;
    for (uint64_t i = n; i-- > 0;)
        if (push_free(&b->cls[ci], APL_BOBJ_ADDR(seg, start + i * sz)))
            return APL_ENOMEM;
    return APL_OK;
}

void bs_release(apl_store *s, apl_addr a)
{
    struct bstore *b = s->bs;
    struct apl_bobj *o = obj_at(s->v, a);
    if (!o || o->bo_class >= APL_BCLASSES)
        return;
    b->bytes_live -= b->cls[o->bo_class].size;
    o->bo_magic = 0;
    push_free(&b->cls[o->bo_class], a);
}

/* The version the object at `a` was removed at, 0 when live. */
uint64_t bs_removed_at(apl_store *s, apl_addr a)
{
    struct apl_bobj *o = obj_at(s->v, a);
    return o ? o->bo_retired : UINT64_MAX;
}

int bs_put_image(apl_store *s, uint32_t number, const uint8_t *img, uint64_t len)
{
    struct bstore *b = s->bs;
    if (!s->pending)
        return APL_EBATCH;
    if (number >= s->v->v_max_blocks)
        return APL_EINVAL;
    apl_addr old = s->v->v_loc[number];
    if (!img) {  /* the number is removed */
        struct apl_bobj *o = old == APL_ADDR_NONE ? 0 : obj_at(s->v, old);
        if (!o || o->bo_retired)
            return APL_OK;
        o->bo_retired = s->pending;  /* crash recovery and reclaim read it */
        return retire_push(s, RT_NUMBER, APL_ADDR_NONE, number, s->pending);
    }
    if (len > (uint64_t)LZ4_compressBound((int)b->page) || len > INT32_MAX)
        return APL_ETOOBIG;
    if ((uint64_t)LZ4_compressBound((int)len) + OBJ_HDR > b->compcap) {
        uint64_t ncap = (uint64_t)LZ4_compressBound((int)len) + OBJ_HDR;
        uint8_t *nc = realloc(b->comp, ncap);
        if (!nc)
            return APL_ENOMEM;
        b->comp = nc;
        b->compcap = ncap;
    }
    int clen = LZ4_compress_default((const char *)img, (char *)b->comp, (int)len, (int)b->compcap);
    if (clen <= 0)
        return APL_EINVAL;
    int ci = class_for(b, OBJ_HDR + (uint64_t)clen);
    if (ci < 0)
        return APL_ETOOBIG;
    if (!b->cls[ci].n) {
        int rc = take_page(s, (uint32_t)ci);
        if (rc)
            return rc;
    }
    apl_addr a = b->cls[ci].addr[--b->cls[ci].n];
    uint8_t *p = s->v->v_seg[APL_ADDR_SEG(a)] + APL_ADDR_SLOT(a);
    struct apl_bobj *o = (struct apl_bobj *)p;
    struct apl_bobj *prev = old == APL_ADDR_NONE ? 0 : obj_at(s->v, old);
    o->bo_number = number;
    o->bo_version = s->pending;
    o->bo_class = (uint32_t)ci;
    o->bo_clen = (uint32_t)clen;
    o->bo_rawlen = (uint32_t)len;
    o->bo_retired = 0;
    o->bo_pad = 0;
    memcpy(p + OBJ_HDR, b->comp, (size_t)clen);
    if (prev && prev->bo_version == s->pending) {
        /* replaced twice in one batch: only the committed version is worth keeping */
        o->bo_prev = prev->bo_prev;
        bs_release(s, old);
    } else {
        o->bo_prev = old;
        if (prev && retire_push(s, RT_OBJECT, old, number, s->pending))
            return APL_ENOMEM;
    }
    b->bytes_live += b->cls[ci].size;
    STORE_REL(&o->bo_magic, APL_MAGIC_BOBJ);
    loc_publish(s, number, a);
    if (number >= s->next_num)
        s->next_num = number + 1;
    return APL_OK;
}

int64_t bs_get_image(apl_store *s, uint32_t number, uint8_t *out, uint64_t cap)
{
    if (number >= s->v->v_max_blocks)
        return APL_EINVAL;
    apl_addr a = s->v->v_loc[number];
    if (a == APL_ADDR_NONE)
        return APL_NOTFOUND;
    struct apl_bobj *o = obj_at(s->v, a);
    if (!o)
        return APL_ECORRUPT;
    if (o->bo_retired)
        return APL_NOTFOUND;
    if (o->bo_rawlen > cap)
        return APL_EBUFSIZE;
    int n = LZ4_decompress_safe((const char *)(o + 1), (char *)out, (int)o->bo_clen, (int)cap);
    return n == (int)o->bo_rawlen ? n : APL_ECORRUPT;
}

/* A compressed block's image at a version (the reader side: apl_block_image). */
int64_t apl_bobj_image(const apl_view *v, uint32_t number, uint64_t version, uint8_t *out, uint64_t cap)
{
    if (number >= v->v_max_blocks)
        return APL_NOTFOUND;
    apl_addr a = LOAD_ACQ(&v->v_loc[number]);
    while (a != APL_ADDR_NONE) {
        struct apl_bobj *o = obj_at(v, a);
        if (!o)
            return APL_ECORRUPT;
        if (o->bo_version <= version) {
            if (o->bo_retired && o->bo_retired <= version)
                return APL_NOTFOUND;
            if (o->bo_rawlen > cap)
                return APL_EBUFSIZE;
            int n = LZ4_decompress_safe((const char *)(o + 1), (char *)out, (int)o->bo_clen, (int)cap);
            return n == (int)o->bo_rawlen ? n : APL_ECORRUPT;
        }
        a = o->bo_prev;
    }
    return APL_NOTFOUND;
}

int bs_recover(apl_store *s, struct apl_recovery *r)
{
    struct bstore *b = s->bs;
    apl_view *v = s->v;
    uint64_t g = v->v_sb->sb_version;
    uint64_t granules = (b->pages_per_seg * (uint64_t)b->page) / 64;
    uint8_t **used = calloc(v->v_nseg, sizeof(uint8_t *));
    int rc = used ? APL_OK : APL_ENOMEM;
    for (uint32_t i = 0; rc == APL_OK && i < v->v_nseg; i++)
        if (!(used[i] = calloc(granules / 8 + 1, 1)))
            rc = APL_ENOMEM;
    memset(b->page_class, 0, v->v_nseg * b->pages_per_seg);
    b->bytes_live = 0;
    uint64_t max_used = 0;
    for (uint64_t num = 0; rc == APL_OK && num < v->v_max_blocks; num++) {
        apl_addr a = v->v_loc[num], a0 = a;
        struct apl_bobj *o = 0;
        while (a != APL_ADDR_NONE) {
            o = obj_at(v, a);
            if (!o) {
                rc = APL_ECORRUPT;
                break;
            }
            if (o->bo_version <= g)
                break;
            r->rolled_back++;
            a = o->bo_prev;   /* no reader can hold it: it is simply not marked */
        }
        if (rc)
            break;
        if (a != a0)
            loc_publish(s, (uint32_t)num, a);
        if (a == APL_ADDR_NONE)
            continue;
        if (o->bo_retired > g)
            o->bo_retired = 0;
        if (o->bo_retired) {  /* removed in a published batch: free it now */
            loc_publish(s, (uint32_t)num, APL_ADDR_NONE);
            continue;
        }
        uint32_t seg = APL_ADDR_SEG(a);
        uint64_t off = APL_ADDR_SLOT(a);
        used[seg][(off / 64) >> 3] |= (uint8_t)(1u << ((off / 64) & 7));
        b->page_class[seg * b->pages_per_seg + off / b->page] = (uint8_t)(o->bo_class + 1);
        b->bytes_live += b->cls[o->bo_class].size;
        r->blocks_live++;
        r->slots_used++;
        max_used = num + 1;
    }
    if (rc == APL_OK) {
        s->next_num = max_used;
        b->nfree_pages = 0;
        b->pages_used = 0;
        for (uint32_t i = 0; i < APL_BCLASSES; i++)
            b->cls[i].n = 0;
        for (uint32_t seg = 0; seg < v->v_nseg; seg++) {
            for (uint64_t p = b->pages_per_seg; p-- > 1;) {
                uint8_t c = b->page_class[seg * b->pages_per_seg + p];
                if (!c) {
                    b->free_pages[b->nfree_pages++] = ((uint64_t)seg << 32) | p;
                    continue;
                }
                b->pages_used++;
                uint32_t sz = b->cls[c - 1].size;
                for (uint64_t i = b->page / sz; i-- > 0;) {
                    uint64_t off = p * b->page + i * sz;
                    if (!(used[seg][(off / 64) >> 3] & (1u << ((off / 64) & 7))))
                        push_free(&b->cls[c - 1], APL_BOBJ_ADDR(seg, off));
                }
            }
        }
    }
    for (uint32_t i = 0; used && i < v->v_nseg; i++)
        free(used[i]);
    free(used);
    return rc;
}

int bs_stats(apl_store *s, struct apl_stats *st)
{
    struct bstore *b = s->bs;
    st->slots_total = (b->pages_per_seg - 1) * s->v->v_nseg;
    st->slots_free = b->nfree_pages;
    st->bytes_used = b->pages_used * (uint64_t)b->page;
    st->bytes_live = b->bytes_live;
    return APL_OK;
}

/* ---- editing an image: one record inserted, replaced or deleted; the count ---- */

#define RD(T, at) ({ T _v; memcpy(&_v, (at), sizeof(T)); _v; })

/* Upsert/delete a record in the image `in` (leaf) into `out`; returns the new length. */
static int64_t image_edit(const uint8_t *in, uint64_t len, int kind, const uint8_t *key, uint32_t klen,
                          const uint8_t *val, uint32_t vlen, int delta, uint8_t *out, uint64_t cap)
{
    if (len < 20)
        return APL_ECORRUPT;
    uint32_t magic = RD(uint32_t, in + 4), nrec = RD(uint32_t, in + 16);
    if (magic != APL_BLK_LEAF)
        return APL_ECORRUPT;
    uint64_t p = 20, kp = apl_prefix(key, klen);
    uint32_t i = 0;
    int cmp = 1;
    uint64_t at = p;
    for (; i < nrec; i++) {
        if (p + 6 > len)
            return APL_ECORRUPT;
        uint16_t kl = RD(uint16_t, in + p);
        uint32_t vl = RD(uint32_t, in + p + 2);
        if (p + 6 + kl + vl > len)
            return APL_ECORRUPT;
        const uint8_t *k = in + p + 6;
        cmp = apl_keycmp(apl_prefix(k, kl), apl_sfx(k, kl), kl, kp, apl_sfx(key, klen), klen);
        at = p;
        if (cmp >= 0)
            break;
        p += 6 + (uint64_t)kl + vl;
        at = p;
    }
    int eq = i < nrec && cmp == 0;
    uint64_t oldlen = eq ? 6 + (uint64_t)RD(uint16_t, in + at) + RD(uint32_t, in + at + 2) : 0;
    const uint8_t *oldv = eq ? in + at + 6 + klen : 0;
    uint32_t oldvl = eq ? RD(uint32_t, in + at + 2) : 0;
    if (kind == APL_CE_DELETE && !eq) {
        if (len > cap)
            return APL_EBUFSIZE;
        memcpy(out, in, len);
        return (int64_t)len;
    }
    /* the new value (a delta patches the old one: [0116]) */
    uint8_t *tmp = 0;
    if (kind != APL_CE_DELETE && delta) {
        if (!eq || vlen < 8)
            return APL_ECORRUPT;
        uint32_t off = RD(uint32_t, val), rep = RD(uint32_t, val + 4);
        if ((uint64_t)off + rep > oldvl)
            return APL_ECORRUPT;
        uint32_t nl = oldvl - rep + (vlen - 8);
        if (!(tmp = malloc(nl ? nl : 1)))
            return APL_ENOMEM;
        memcpy(tmp, oldv, off);
        memcpy(tmp + off, val + 8, vlen - 8);
        memcpy(tmp + off + vlen - 8, oldv + off + rep, oldvl - off - rep);
        val = tmp;
        vlen = nl;
    }
    uint64_t addlen = kind == APL_CE_DELETE ? 0 : 6 + (uint64_t)klen + vlen;
    uint64_t nlen = len - oldlen + addlen;
    if (nlen > cap) {
        free(tmp);
        return APL_EBUFSIZE;
    }
    memcpy(out, in, at);
    uint32_t nn = nrec + (eq ? 0 : 1) - (kind == APL_CE_DELETE ? 1 : 0);
    memcpy(out + 16, &nn, 4);
    uint64_t q = at;
    if (addlen) {
        uint16_t kl = (uint16_t)klen;
        memcpy(out + q, &kl, 2);
        memcpy(out + q + 2, &vlen, 4);
        memcpy(out + q + 6, key, klen);
        memcpy(out + q + 6 + klen, val, vlen);
        q += addlen;
    }
    memcpy(out + q, in + at + oldlen, len - at - oldlen);
    free(tmp);
    return (int64_t)nlen;
}

/* apply_record / count_add / apply_image for a compressed store (apl_apply.c dispatches). */
int bs_apply_record(apl_store *s, uint32_t number, int kind, const uint8_t *key, uint32_t klen,
                    const uint8_t *val, uint32_t vlen, int delta)
{
    struct bstore *b = s->bs;
    int64_t n = bs_get_image(s, number, b->raw, b->rawcap);
    if (n < 0)
        return n == APL_NOTFOUND ? APL_ECORRUPT : (int)n;
    int64_t m = image_edit(b->raw, (uint64_t)n, kind, key, klen, val, vlen, delta, b->edit, b->rawcap + 8192);
    if (m < 0)
        return (int)m;
    return bs_put_image(s, number, b->edit, (uint64_t)m);
}

int bs_count_add(apl_store *s, uint32_t meta, int64_t delta)
{
    struct bstore *b = s->bs;
    int64_t n = bs_get_image(s, meta, b->raw, b->rawcap);
    if (n < 28 || RD(uint32_t, b->raw + 4) != APL_BLK_META)
        return APL_ECORRUPT;
    uint64_t c = RD(uint64_t, b->raw + 20) + (uint64_t)delta;
    memcpy(b->raw + 20, &c, 8);
    return bs_put_image(s, meta, b->raw, (uint64_t)n);
}

/*
 * Promoting an lz4 secondary ([0128]): every live backup object of `src`
 * (this store, between batches) is decompressed and laid into `dst`, an
 * uncompressed store of primary blocks with the same files, inside dst's open
 * batch (apl_apply_image: the same edit a copy's images get), so dst holds
 * the same image block for block. Nothing of src changes. *blocks and *bytes:
 * numbers laid in and image bytes decompressed.
 */
int apl_expand(apl_store *src, apl_store *dst, uint64_t *blocks, uint64_t *bytes)
{
    *blocks = *bytes = 0;
    if (!src->bs || dst->bs)
        return APL_EINVAL;
    if (!dst->pending || src->pending)
        return APL_EBATCH;
    const apl_view *v = src->v;
    uint64_t cap = (uint64_t)LZ4_compressBound((int)src->bs->page) + 64;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return APL_ENOMEM;
    int rc = APL_OK;
    for (uint64_t num = 0; rc == APL_OK && num < v->v_max_blocks; num++) {
        apl_addr a = v->v_loc[num];
        if (a == APL_ADDR_NONE)
            continue;
        struct apl_bobj *o = obj_at(v, a);
        if (!o) {
            rc = APL_ECORRUPT;
            break;
        }
        if (o->bo_retired)
            continue;
        if (num >= dst->v->v_max_blocks) {
            rc = APL_EFULL;
            break;
        }
        if (o->bo_rawlen > cap) {
            uint8_t *nb = realloc(buf, o->bo_rawlen);
            if (!nb) {
                rc = APL_ENOMEM;
                break;
            }
            buf = nb;
            cap = o->bo_rawlen;
        }
        int n = LZ4_decompress_safe((const char *)(o + 1), (char *)buf, (int)o->bo_clen, (int)cap);
        if (n != (int)o->bo_rawlen) {
            rc = APL_ECORRUPT;
            break;
        }
        rc = apl_apply_image(dst, (uint32_t)num, buf, (uint64_t)n);
        (*blocks)++;
        *bytes += (uint64_t)n;
    }
    free(buf);
    return rc;
}

uint64_t bs_sum(const apl_store *s, apl_addr a)
{
    const struct apl_bobj *o = obj_at(s->v, a);
    return o ? obj_sum(o, o->bo_number) : 1;   /* an address that points nowhere: never a match */
}

uint32_t bs_file_of(const apl_store *s, apl_addr a)
{
    const struct apl_bobj *o = obj_at(s->v, a);
    char head[16];
    uint32_t file = UINT32_MAX;
    if (o && LZ4_decompress_safe_partial((const char *)(o + 1), head, (int)o->bo_clen, 12, sizeof head) >= 12)
        memcpy(&file, head + 8, 4);   /* the image opens with u32 number, u32 kind, u32 file */
    return file;
}
