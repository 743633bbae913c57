/*
 * apl_read.c — reading one file at one version, in any process that maps the
 * segments: lookups (apl_get, apl_count, and apl_lookup for apl_py.c),
 * ordered iteration (apl_scan, apl_find and its continuable apl_find_at),
 * block images and their checksums (apl_block_image, and apl_block_images
 * for a first copy).
 *
 * Shared: block versions, the location table, sb_version and sb_horizon,
 * written by the controller alone; this process writes only its own reader
 * slot. A read enters the view (view_enter: nothing mapped is touched on a
 * closed one), pins the latest version in its thread's slot unless it is
 * given a pinned one (read_begin in apl_int.h, apl_op_pin in apl_readers.c),
 * reads with no lock and no retry, following bh_prev to the version it
 * pinned, and checks the horizon before it unpins (read_end): memory is reused only
 * after sb_horizon passed the versions it held, so a read that saw reused
 * bytes fails with APL_ESNAPSHOT instead of returning them (apl_layout.h).
 * Every walk is bounded, so damaged or reused memory never makes it loop.
 */
#include <stdlib.h>

#include "apl_int.h"

/* ------------------------------------------------------------------ */
/* Lookups                                                             */
/* ------------------------------------------------------------------ */

struct apl_bhdr *apl_descend(const apl_view *v, uint32_t file, uint64_t version,
                             uint64_t p, const uint8_t *k, uint32_t n)
{
    if (file >= v->v_nfiles)
        return 0;
    uint32_t num = v->v_files[file].fl_root;
    for (uint32_t depth = 0; depth < APL_MAX_HEIGHT; depth++) {
        struct apl_bhdr *b = apl_resolve(v, num, version);
        if (!b)
            return 0;
        if (b->bh_level == 0)
            return b->bh_magic == APL_BLK_LEAF ? b : 0;
        if (b->bh_magic != APL_BLK_INNR || b->bh_nslots == 0)
            return 0;
        num = apl_slots(b)[apl_child_index(b, p, k, n)].sl_aux;
    }
    return 0;
}

int apl_lookup(const apl_view *v, uint32_t file, uint64_t ver, const uint8_t *key, uint32_t klen,
               const uint8_t **val, uint32_t *vlen)
{
    uint64_t p = apl_prefix(key, klen);
    struct apl_bhdr *b = apl_descend(v, file, ver, p, key, klen);
    if (!b)
        return APL_ECORRUPT;
    /* the misses of a random lookup in the leaf chain (its slots, its
     * overflow block's header), all started before the first is waited for:
     * ~10% more gets a second at 1,000,000 records */
    apl_prefetch_slots(b);
    if (b->bh_next != APL_ADDR_NONE) {
        struct apl_bhdr *nx = apl_ptr(v, b->bh_next);
        if (nx)
            apl_prefetch_head(nx);
    }
    uint32_t ci;
    b = apl_chain_block(v, b, p, key, klen, &ci);
    int eq;
    uint32_t i = apl_lower_bound(b, p, key, klen, &eq);
    if (!eq)
        return APL_NOTFOUND;
    const struct apl_slot *s = &apl_slots(b)[i];
    if (!apl_slot_ok(v, s))
        return APL_ECORRUPT;
    *val = apl_slot_val(b, s);
    *vlen = s->sl_aux;
    return APL_OK;
}

static int64_t get_at(apl_view *v, uint32_t file, uint64_t ver, const uint8_t *key,
                      uint32_t klen, uint8_t *out, uint64_t cap)
{
    const uint8_t *val;
    uint32_t vlen;
    int rc = apl_lookup(v, file, ver, key, klen, &val, &vlen);
    if (rc)
        return rc;
    if (vlen > cap) {
        if (cap >= 8) {
            uint64_t need = vlen;
            memcpy(out, &need, 8);
        }
        return APL_EBUFSIZE;
    }
    memcpy(out, val, vlen);
    return vlen;
}

int64_t apl_get(apl_view *v, uint32_t file, const uint8_t *key, uint32_t klen,
                uint64_t version, uint8_t *out, uint64_t cap)
{
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    if (klen > APL_MAX_KEY)
        return APL_EKEY;
    if (file >= v->v_nfiles)
        return APL_EFILE;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, get_at(v, file, ver, key, klen, out, cap));
}

/* Integer keys: 8 bytes big-endian with the sign bit flipped (memcmp order = numeric order). */
int64_t apl_get_i64(apl_view *v, uint32_t file, int64_t key, uint64_t version,
                    uint8_t *out, uint64_t cap)
{
    uint64_t be = __builtin_bswap64((uint64_t)key ^ 0x8000000000000000ull);
    return apl_get(v, file, (const uint8_t *)&be, 8, version, out, cap);
}

int64_t apl_count(apl_view *v, uint32_t file, uint64_t version)
{
    if (file >= v->v_nfiles)
        return APL_EFILE;
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    if (v->v_flags & APL_SB_COMPRESSED) {
        uint8_t img[64];
        int64_t n = apl_bobj_image(v, v->v_files[file].fl_meta, ver, img, sizeof img);
        uint64_t c;
        if (n >= 28) {
            memcpy(&c, img + 20, 8);
            rc = (int64_t)c;
        } else {
            rc = APL_ECORRUPT;
        }
    } else {
        struct apl_bhdr *m = apl_resolve(v, v->v_files[file].fl_meta, ver);
        rc = (m && m->bh_magic == APL_BLK_META) ? (int64_t)m->bh_count : APL_ECORRUPT;
    }
    return read_end(v, ver, r, rc);
}

/* ------------------------------------------------------------------ */
/* Ordered iteration over one file at one version                      */
/* ------------------------------------------------------------------ */

struct iter {
    const apl_view *v;
    uint64_t ver;
    int depth;                         /* number of inner levels on the path */
    struct { struct apl_bhdr *b; uint32_t i; } path[APL_MAX_HEIGHT];
    struct apl_bhdr *blk;              /* current block of the leaf chain */
    uint32_t idx;                      /* next slot in blk */
    uint32_t hops;                     /* overflow blocks followed in this chain */
    int err;
};

/* Descend to the leftmost leaf below block `num`, pushing the path. */
static int iter_down(struct iter *it, uint32_t num)
{
    for (;;) {
        struct apl_bhdr *b = apl_resolve(it->v, num, it->ver);
        if (!b)
            return it->err = APL_ECORRUPT;
        if (b->bh_level == 0) {
            it->blk = b;
            it->idx = 0;
            it->hops = 0;
            return 0;
        }
        if (b->bh_nslots == 0 || it->depth >= (int)APL_MAX_HEIGHT)
            return it->err = APL_ECORRUPT;
        it->path[it->depth].b = b;
        it->path[it->depth].i = 0;
        it->depth++;
        num = apl_slots(b)[0].sl_aux;
    }
}

/* Position at the first record >= key (> key when !incl). */
static int iter_seek(struct iter *it, uint32_t file, const uint8_t *k, uint32_t n, int incl)
{
    uint64_t p = apl_prefix(k, n);
    uint32_t num = it->v->v_files[file].fl_root;
    it->depth = 0;
    it->err = 0;
    for (;;) {
        struct apl_bhdr *b = apl_resolve(it->v, num, it->ver);
        if (!b)
            return it->err = APL_ECORRUPT;
        if (b->bh_level == 0)
            break;
        if (b->bh_nslots == 0 || it->depth >= (int)APL_MAX_HEIGHT)
            return it->err = APL_ECORRUPT;
        uint32_t ci = apl_child_index(b, p, k, n);
        it->path[it->depth].b = b;
        it->path[it->depth].i = ci;
        it->depth++;
        num = apl_slots(b)[ci].sl_aux;
    }
    struct apl_bhdr *b = apl_resolve(it->v, num, it->ver);
    if (!b)
        return it->err = APL_ECORRUPT;
    uint32_t ci;
    b = apl_chain_block(it->v, b, p, k, n, &ci);
    it->hops = ci;
    int eq;
    uint32_t i = apl_lower_bound(b, p, k, n, &eq);
    if (eq && !incl)
        i++;
    it->blk = b;
    it->idx = i;
    return 0;
}

/* Next record, or 0 at the end. */
static const struct apl_slot *iter_next(struct iter *it, struct apl_bhdr **owner)
{
    for (;;) {
        if (it->err)
            return 0;
        if (it->idx < it->blk->bh_nslots) {
            const struct apl_slot *s = &apl_slots(it->blk)[it->idx++];
            if (!apl_slot_ok(it->v, s)) {
                it->err = APL_ECORRUPT;
                return 0;
            }
            *owner = it->blk;
            return s;
        }
        if (it->blk->bh_next != APL_ADDR_NONE) {
            struct apl_bhdr *nx = apl_ptr(it->v, it->blk->bh_next);
            if (!nx || ++it->hops > 64) {
                it->err = APL_ECORRUPT;
                return 0;
            }
            it->blk = nx;
            it->idx = 0;
            continue;
        }
        /* end of the chain: climb to the next child */
        while (it->depth > 0 && it->path[it->depth - 1].i + 1 >= it->path[it->depth - 1].b->bh_nslots)
            it->depth--;
        if (it->depth == 0)
            return 0;
        struct apl_bhdr *pb = it->path[it->depth - 1].b;
        uint32_t ni = ++it->path[it->depth - 1].i;
        if (iter_down(it, apl_slots(pb)[ni].sl_aux))
            return 0;
    }
}

static int64_t scan_at(apl_view *v, uint32_t file, uint64_t ver,
                       const uint8_t *lo, uint32_t lolen, int lo_incl,
                       const uint8_t *hi, uint32_t hilen, uint32_t what,
                       uint8_t *out, uint64_t cap, uint64_t *count,
                       uint8_t *resume, uint32_t *resume_len, int *more)
{
    struct iter it = {.v = v, .ver = ver};
    if (iter_seek(&it, file, lo, lolen, lo_incl))
        return it.err;
    uint64_t hp = hilen != APL_NO_BOUND ? apl_prefix(hi, hilen) : 0;
    uint64_t used = 0, n = 0;
    *more = 0;
    struct apl_bhdr *b;
    const struct apl_slot *s;
    while ((s = iter_next(&it, &b))) {
        const uint8_t *sfx = apl_slot_sfx(b, s);
        if (hilen != APL_NO_BOUND && apl_keycmp(s->sl_prefix, sfx, s->sl_klen, hp, apl_sfx(hi, hilen), hilen) >= 0)
            break;
        uint64_t need = what == APL_SCAN_KEYS ? 2u + s->sl_klen : 4u + s->sl_aux;
        if (used + need > cap) {
            if (n == 0) {
                if (cap >= 8)
                    memcpy(out, &need, 8);
                return APL_EBUFSIZE;
            }
            *more = 1;
            break;
        }
        if (what == APL_SCAN_KEYS) {
            uint16_t kl = s->sl_klen;
            memcpy(out + used, &kl, 2);
            apl_key_out(out + used + 2, s->sl_prefix, sfx, kl);
        } else {
            uint32_t vl = s->sl_aux;
            memcpy(out + used, &vl, 4);
            memcpy(out + used + 4, apl_slot_val(b, s), vl);
        }
        used += need;
        n++;
        apl_key_out(resume, s->sl_prefix, sfx, s->sl_klen);
        *resume_len = s->sl_klen;
    }
    if (it.err)
        return it.err;
    *count = n;
    return (int64_t)used;
}

int64_t apl_scan(apl_view *v, uint32_t file,
                 const uint8_t *lo, uint32_t lolen, int lo_incl,
                 const uint8_t *hi, uint32_t hilen,
                 uint64_t version, uint32_t what, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more)
{
    if (file >= v->v_nfiles)
        return APL_EFILE;
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    if (lolen > APL_MAX_KEY || (hilen != APL_NO_BOUND && hilen > APL_MAX_KEY))
        return APL_EKEY;
    if (what != APL_SCAN_VALUES && what != APL_SCAN_KEYS)
        return APL_EINVAL;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, scan_at(v, file, ver, lo, lolen, lo_incl, hi, hilen, what, out, cap,
                                       count, resume, resume_len, more));
}

int64_t apl_find_at(apl_view *v, uint32_t index, uint32_t table, uint64_t ver,
                    const uint8_t *prefix, uint32_t plen,
                    const uint8_t *after, uint32_t afterlen,
                    uint8_t *out, uint64_t cap, uint64_t *count,
                    uint8_t *resume, uint32_t *resume_len, int *more)
{
    struct iter it = {.v = v, .ver = ver};
    int rc = afterlen ? iter_seek(&it, index, after, afterlen, 0)
                      : iter_seek(&it, index, prefix, plen, 1);
    if (rc)
        return rc;
    uint64_t used = 0, n = 0;
    *more = 0;
    struct apl_bhdr *b;
    const struct apl_slot *s;
    uint8_t k[APL_MAX_KEY];
    while ((s = iter_next(&it, &b))) {
        if (s->sl_klen > APL_MAX_KEY)
            return APL_ECORRUPT;   /* no writer stores a longer key: damaged memory */
        if (s->sl_klen < plen)
            break;
        apl_key_out(k, s->sl_prefix, apl_slot_sfx(b, s), s->sl_klen);
        if (memcmp(k, prefix, plen) != 0)
            break;
        const uint8_t *val;
        uint32_t vlen;
        rc = apl_lookup(v, table, ver, k + plen, s->sl_klen - plen, &val, &vlen);
        if (rc)
            return rc == APL_NOTFOUND ? APL_ECORRUPT : rc;   /* an index entry without its record */
        uint64_t need = 4u + vlen;
        if (used + need > cap) {
            if (n == 0) {
                if (cap >= 8)
                    memcpy(out, &need, 8);
                return APL_EBUFSIZE;
            }
            *more = 1;
            break;
        }
        memcpy(out + used, &vlen, 4);
        memcpy(out + used + 4, val, vlen);
        used += need;
        n++;
        memcpy(resume, k, s->sl_klen);
        *resume_len = s->sl_klen;
    }
    if (it.err)
        return it.err;
    *count = n;
    return (int64_t)used;
}

int64_t apl_find(apl_view *v, uint32_t index, uint32_t table,
                 const uint8_t *prefix, uint32_t plen,
                 const uint8_t *after, uint32_t afterlen,
                 uint64_t version, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more)
{
    if (index >= v->v_nfiles || table >= v->v_nfiles)
        return APL_EFILE;
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    if (plen > APL_MAX_KEY || afterlen > APL_MAX_KEY)
        return APL_EKEY;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, apl_find_at(v, index, table, ver, prefix, plen, after, afterlen, out, cap,
                                           count, resume, resume_len, more));
}

/* ------------------------------------------------------------------ */
/* Block images                                                        */
/* ------------------------------------------------------------------ */

#define PUT(T, x) do { T _x = (T)(x); if (used + sizeof(T) > cap) return APL_EBUFSIZE; \
                       memcpy(out + used, &_x, sizeof(T)); used += sizeof(T); } while (0)
#define PUTB(p, n) do { if (used + (n) > cap) return APL_EBUFSIZE; \
                        memcpy(out + used, (p), (n)); used += (n); } while (0)

int64_t apl_image(const apl_view *v, struct apl_bhdr *b, uint8_t *out, uint64_t cap)
{
    uint64_t used = 0;
    uint32_t nrec = 0, nb = 0;
    /* a chain has at most 1 + max_overflow (<= 9) blocks: a longer walk (reused
     * memory under a wiped pin) stops here; the horizon check then reports it */
    for (struct apl_bhdr *c = b; c && nb < 64; c = c->bh_next != APL_ADDR_NONE ? apl_ptr(v, c->bh_next) : 0, nb++)
        nrec += c->bh_nslots;
    if (nb == 64)
        return APL_ECORRUPT;
    PUT(uint32_t, b->bh_number);
    PUT(uint32_t, b->bh_magic);
    PUT(uint32_t, b->bh_file);
    PUT(uint16_t, b->bh_level);
    PUT(uint16_t, 0);
    PUT(uint32_t, nrec);
    if (b->bh_magic == APL_BLK_META) {
        PUT(uint64_t, b->bh_count);
        return (int64_t)used;
    }
    nb = 0;
    for (struct apl_bhdr *c = b; c && nb < 64; c = c->bh_next != APL_ADDR_NONE ? apl_ptr(v, c->bh_next) : 0, nb++) {
        const struct apl_slot *s = apl_slots(c);
        for (uint32_t i = 0; i < c->bh_nslots; i++) {
            uint32_t vlen = c->bh_level ? 0 : s[i].sl_aux;
            if ((uint32_t)s[i].sl_off + APL_KSFX(s[i].sl_klen) + vlen > v->v_bsize || s[i].sl_klen > APL_MAX_KEY)
                return APL_ECORRUPT;
            PUT(uint16_t, s[i].sl_klen);
            PUT(uint32_t, s[i].sl_aux);
            if (used + s[i].sl_klen > cap)
                return APL_EBUFSIZE;
            apl_key_out(out + used, s[i].sl_prefix, apl_slot_sfx(c, &s[i]), s[i].sl_klen);
            used += s[i].sl_klen;
            if (vlen)
                PUTB(apl_slot_val(c, &s[i]), vlen);
        }
    }
    return (int64_t)used;
}

int64_t apl_block_image(apl_view *v, uint32_t number, uint64_t version, uint8_t *out, uint64_t cap)
{
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    if (v->v_flags & APL_SB_COMPRESSED) {
        rc = apl_bobj_image(v, number, ver, out, cap);
    } else {
        struct apl_bhdr *b = apl_resolve_in_use(v, number, ver);
        rc = b ? apl_image(v, b, out, cap) : APL_NOTFOUND;
    }
    return read_end(v, ver, r, rc);
}

int apl_block_checksum(apl_view *v, uint32_t number, uint64_t version, uint64_t *sum)
{
    uint64_t cap = (uint64_t)v->v_bsize * 16 + 64;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return APL_ENOMEM;
    int64_t n = apl_block_image(v, number, version, buf, cap);
    if (n == APL_NOTFOUND) {
        *sum = 0;
        n = 0;
    } else if (n >= 0) {
        *sum = apl_fnv(0xcbf29ce484222325ull, buf, (uint64_t)n);
    }
    free(buf);
    return n < 0 ? (int)n : APL_OK;
}

/* Highest block number in use + 1, inside a read of v. */
static uint64_t block_limit_in(const apl_view *v)
{
    uint64_t n = v->v_max_blocks;
    while (n > 0 && LOAD_RLX(&v->v_loc[n - 1]) == APL_ADDR_NONE)
        n--;
    return n;
}

uint64_t apl_block_limit(apl_view *v)
{
    if (view_enter(v))
        return 0;
    uint64_t n = block_limit_in(v);
    view_exit();
    return n;
}

int apl_chain_lengths(apl_view *v, uint64_t *hist, uint32_t nbuckets)
{
    if (nbuckets == 0)
        return APL_EINVAL;
    memset(hist, 0, sizeof(*hist) * nbuckets);
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_OK;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, 0, &ver, &r);
    if (rc)
        return rc;
    uint64_t limit = block_limit_in(v);
    for (uint64_t n = 0; n < limit; n++) {
        const struct apl_bhdr *b = apl_resolve_in_use(v, (uint32_t)n, ver);
        if (!b || b->bh_magic != APL_BLK_LEAF)
            continue;
        uint32_t len = b->bh_chain ? b->bh_chain : 1;
        hist[len >= nbuckets ? nbuckets - 1 : len - 1]++;
    }
    return (int)read_end(v, ver, r, APL_OK);
}

/*
 * Block images of numbers [start, limit) at a pinned version, for a copy:
 * records of (u32 number, u32 length, image) back to back. A number not in
 * use at that version gets length 0: the secondary removes it and counts it
 * as copied, so a block the primary creates under that number later is
 * applied from the log, not dropped as "the copy will carry it" (the copy
 * has passed it). Stops before `cap` would overflow or at `limit`; *next is
 * the number to continue from. Returns bytes written.
 */
/* One record of block_images: (u32 number, u32 length, image) at out, or
 * APL_EBUFSIZE when it does not fit in cap. */
static int64_t image_record(apl_view *v, uint32_t n, uint64_t version, uint8_t *out, uint64_t cap)
{
    if (cap < 8)
        return APL_EBUFSIZE;
    int64_t len;
    if (v->v_flags & APL_SB_COMPRESSED) {
        len = apl_bobj_image(v, n, version, out + 8, cap - 8);
    } else {
        struct apl_bhdr *b = apl_resolve_in_use(v, n, version);
        len = b ? apl_image(v, b, out + 8, cap - 8) : APL_NOTFOUND;
    }
    if (len == APL_NOTFOUND)
        len = 0;
    if (len < 0)
        return len;
    uint32_t l32 = (uint32_t)len;
    memcpy(out, &n, 4);
    memcpy(out + 4, &l32, 4);
    return 8 + len;
}

static int64_t block_images(apl_view *v, uint32_t start, uint32_t limit, uint64_t version,
                            uint8_t *out, uint64_t cap, uint32_t *next)
{
    uint64_t used = 0;
    uint32_t n = start;
    if (limit > v->v_max_blocks)
        limit = (uint32_t)v->v_max_blocks;
    for (; n < limit; n++) {
        int64_t got = image_record(v, n, version, out + used, cap - used);
        if (got == APL_EBUFSIZE) {
            if (used == 0)
                return APL_EBUFSIZE;
            break;
        }
        if (got < 0)
            return got;
        used += (uint64_t)got;
    }
    *next = n;
    return (int64_t)used;
}

int64_t apl_block_images(apl_view *v, uint32_t start, uint32_t limit, uint64_t version,
                         uint8_t *out, uint64_t cap, uint32_t *next)
{
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, block_images(v, start, limit, ver, out, cap, next));
}

/* The same records for numbers[0, count) (a repair, a device refill): *next
 * is the index to continue from. */
int64_t apl_block_images_of(apl_view *v, const uint32_t *numbers, uint32_t count, uint64_t version,
                            uint8_t *out, uint64_t cap, uint32_t *next)
{
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    uint64_t used = 0;
    uint32_t i = 0;
    for (; i < count; i++) {
        int64_t got = image_record(v, numbers[i], ver, out + used, cap - used);
        if (got == APL_EBUFSIZE && used)
            break;
        if (got < 0)
            return read_end(v, ver, r, got);
        used += (uint64_t)got;
    }
    *next = i;
    return read_end(v, ver, r, (int64_t)used);
}
