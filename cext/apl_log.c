/*
 * apl_log.c — the change log, both sides of the ring (format: apl_layout.h,
 * "The change log"). Writer side (the controller, one thread): space at the
 * head (log_reserve), room made by moving the tail (log_make_room), entries
 * appended inside the open batch (apl_log_append, apl_log_block); they
 * become valid when apl_batch_publish (apl_txn.c) publishes the batch's
 * head. Reader side (the agent, recovery tools, the controller's status):
 * the published bounds, reading entries, exporting them for the replication
 * stream, finding a serial.
 *
 * Shared: the ring (meta segment) and, in sb_pub[G & 1], the head, tail and
 * serial of version G. Only the writer writes them; readers only copy. The
 * writer publishes a new tail before it overwrites the bytes behind the old
 * one (release fence). A reader takes an entry's header once, copies what it
 * describes, then a full fence and the bounds again: an entry that is behind
 * the tail by then may have been overwritten under the copy and is reported
 * as APL_ELOGFULL, never returned. Nothing past the published head is read,
 * so the entries of a batch not yet published are never seen.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

/* ------------------------------------------------------------------ */
/* Writing the change log (the controller)                           */
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
/* Reading the change log (any process)                              */
/* ------------------------------------------------------------------ */

static int log_bounds(apl_view *v, uint64_t *head, uint64_t *tail, uint64_t *version, uint64_t *serial)
{
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t g = LOAD_ACQ(&v->v_sb->sb_version);
        const struct apl_pub *pb = &v->v_sb->sb_pub[g & 1];
        uint64_t h = LOAD_ACQ(&pb->pb_log_head);
        uint64_t t = LOAD_ACQ(&pb->pb_log_tail);
        uint64_t s = LOAD_ACQ(&pb->pb_serial);
        FENCE();
        if (LOAD_ACQ(&pb->pb_version) == g && LOAD_ACQ(&v->v_sb->sb_version) == g) {
            *head = h;
            *tail = t;
            *version = g;
            *serial = s;
            return APL_OK;
        }
    }
    return APL_ECORRUPT;
}

int apl_log_bounds(apl_view *v, uint64_t *head, uint64_t *tail, uint64_t *version, uint64_t *serial)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_bounds(v, head, tail, version, serial);
    view_exit();
    return rc;
}

/*
 * Reading entries the writer may be overwriting (log_make_room publishes the
 * new tail, then a release fence, then overwrites): take the header once into
 * *h and use nothing but that copy (a compiler barrier keeps the compiler from
 * reading the shared header again); copy what it describes; then a full fence
 * and the bounds again. An entry from before the tail is APL_ELOGFULL, never
 * trusted: the copy may mix two entries. A header that fails its checks while
 * its position is still retained is corruption.
 */
static inline void entry_header(struct apl_centry *h, const struct apl_centry *e)
{
    memcpy(h, e, sizeof *h);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* The error for a header that failed its checks at log position pos. */
static int entry_bad(apl_view *v, uint64_t pos)
{
    uint64_t head, tail, ver, serial;
    FENCE();
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    return rc ? rc : pos < tail ? APL_ELOGFULL : APL_ECORRUPT;
}

/* After reading log bytes from position `from` on: APL_OK if the writer
 * overwrote none of them meanwhile (the tail, published before bytes are
 * overwritten, has not passed `from`), else APL_ELOGFULL. */
static int still_valid(apl_view *v, uint64_t from)
{
    uint64_t head, tail, ver, serial;
    FENCE();
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    return rc ? rc : from < tail ? APL_ELOGFULL : APL_OK;
}

/* The reader side's walk over the ring: the header of the first entry that
 * is not PAD at or after log position *p (the wrap gap and PAD space
 * skipped): 1 with *h and *p set to it, 0 when *p reaches `head`, or the
 * error of a header that does not hold (entry_bad). What it read is valid
 * only if the writer did not overwrite it meanwhile: the caller checks that
 * with still_valid(), from where it started. */
static int next_entry(apl_view *v, uint64_t *p, uint64_t head, struct apl_centry *h)
{
    uint64_t size = v->v_log_size;
    while (*p < head) {
        uint64_t off = *p % size;
        if (size - off < sizeof(struct apl_centry)) {
            *p += size - off;
            continue;
        }
        entry_header(h, (const struct apl_centry *)(v->v_log + off));
        uint32_t len = h->ce_len;
        if (len < sizeof(*h) || (len & 7) || len > size - off)
            return entry_bad(v, *p);
        if (h->ce_kind != APL_CE_PAD)
            return 1;
        *p += len;
    }
    return 0;
}

static int64_t log_read(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap)
{
    uint64_t head, tail, ver, serial;
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    if (rc)
        return rc;
    if (*pos < tail)
        return APL_ELOGFULL;
    struct apl_centry h;
    if ((rc = next_entry(v, pos, head, &h)) <= 0)
        return rc;
    uint32_t len = h.ce_len;
    if (len > cap) {
        if (cap >= 8) {
            uint64_t need = len;
            memcpy(out, &need, 8);
        }
        return APL_EBUFSIZE;
    }
    memcpy(out, &h, sizeof h);
    memcpy(out + sizeof h, v->v_log + *pos % v->v_log_size + sizeof h, len - sizeof h);
    if ((rc = still_valid(v, *pos)))
        return rc;
    *pos += len;
    return len;
}

int64_t apl_log_read(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap)
{
    int64_t rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_read(v, pos, out, cap);
    view_exit();
    return rc;
}

/* The first entry of `kind` at or after log position *pos, looking at no
 * more than max_entries: its header into *out and its position into *pos
 * (1); 0 when none is there (*pos: where the search stopped); APL_ELOGFULL
 * when the writer overwrote what was being read. Headers only: nothing is
 * copied out but the one found. */
static int64_t log_find(apl_view *v, uint64_t *pos, uint16_t kind, uint64_t max_entries, struct apl_centry *out)
{
    uint64_t head, tail, ver, serial;
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    if (rc)
        return rc;
    uint64_t start = *pos, p = start, seen = 0;
    if (p < tail)
        return APL_ELOGFULL;
    int found = 0;
    while (seen < max_entries && (rc = next_entry(v, &p, head, out)) == 1) {
        if (out->ce_kind == kind) {
            found = 1;
            break;
        }
        seen++;
        p += out->ce_len;
    }
    if (rc < 0)
        return rc;
    if ((rc = still_valid(v, start)))   /* every header read lies at or after start */
        return rc;
    *pos = p;
    return found;
}

int64_t apl_log_find(apl_view *v, uint64_t *pos, uint16_t kind, uint64_t max_entries, struct apl_centry *out)
{
    int64_t rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_find(v, pos, kind, max_entries, out);
    view_exit();
    return rc;
}

/*
 * Copy whole entries from log position *pos (up to the published head) into
 * `out` for the replication stream, advancing *pos. With APL_EXPORT_DELTA an
 * UPDATE's A image becomes only its changed part when that is smaller
 * (u32 offset, u32 replaced length, new bytes; flag APL_CEF_DELTA, [0116]);
 * with APL_EXPORT_NO_B the B image is left out (flag APL_CEF_NO_B).
 * Entries with a serial above max_serial (unless 0) are left for later.
 * Returns bytes written (0: nothing new), APL_ELOGFULL when *pos was
 * overwritten, APL_EBUFSIZE when not even the first entry fits.
 */
static int64_t log_export(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap, uint32_t opts,
                          uint64_t max_serial, uint64_t *first_serial, uint64_t *last_serial, uint64_t *count)
{
    uint64_t head, tail, ver, serial;
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    if (rc)
        return rc;
    uint64_t size = v->v_log_size, used = 0, n = 0, p = *pos;
    uint64_t start = p;
    *first_serial = *last_serial = 0;
    if (p < tail)
        return APL_ELOGFULL;
    struct apl_centry h;
    while ((rc = next_entry(v, &p, head, &h)) == 1) {
        uint64_t off = p % size;
        uint32_t len = h.ce_len;
        if (sizeof(h) + (uint64_t)h.ce_klen + h.ce_alen + h.ce_blen > len)
            return entry_bad(v, p);
        if (max_serial && h.ce_serial > max_serial)
            break;
        const uint8_t *key = v->v_log + off + sizeof(h);
        const uint8_t *a = key + h.ce_klen, *b = a + h.ce_alen;
        uint32_t klen = h.ce_klen, alen = h.ce_alen, blen = h.ce_blen, flags = h.ce_flags;
        uint32_t doff = 0, drep = 0, dnew = 0;
        int delta = 0;
        if ((opts & APL_EXPORT_DELTA) && h.ce_kind == APL_CE_UPDATE && alen && blen) {
            uint32_t m = alen < blen ? alen : blen, pre = 0, suf = 0;
            while (pre < m && a[pre] == b[pre])
                pre++;
            while (suf < m - pre && a[alen - 1 - suf] == b[blen - 1 - suf])
                suf++;
            doff = pre;
            drep = blen - pre - suf;
            dnew = alen - pre - suf;
            if (8 + dnew < alen)
                delta = 1;
        }
        uint32_t out_alen = delta ? 8 + dnew : alen;
        uint32_t out_blen = (opts & APL_EXPORT_NO_B) ? 0 : blen;
        uint64_t elen = APL_ALIGN(sizeof(h) + (uint64_t)klen + out_alen + out_blen, 8);
        if (used + elen > cap) {
            if (n == 0) {
                if (cap >= 8)
                    memcpy(out, &elen, 8);
                return APL_EBUFSIZE;
            }
            break;
        }
        struct apl_centry *o = (struct apl_centry *)(out + used);
        memcpy(o, &h, sizeof(h));
        uint8_t *q = (uint8_t *)(o + 1);
        memcpy(q, key, klen);
        q += klen;
        if (delta) {
            memcpy(q, &doff, 4);
            memcpy(q + 4, &drep, 4);
            memcpy(q + 8, a + doff, dnew);
            flags |= APL_CEF_DELTA;
        } else {
            memcpy(q, a, alen);
        }
        q += out_alen;
        if (out_blen)
            memcpy(q, b, out_blen);
        else if (blen)
            flags |= APL_CEF_NO_B;
        q += out_blen;
        memset(q, 0, (out + used + elen) - q);
        o->ce_len = (uint32_t)elen;
        o->ce_alen = out_alen;
        o->ce_blen = out_blen;
        o->ce_flags = (uint16_t)flags;
        if (!n)
            *first_serial = h.ce_serial;
        *last_serial = h.ce_serial;
        n++;
        used += elen;
        p += len;
    }
    if (rc < 0)
        return rc;
    if ((rc = still_valid(v, start)))   /* what was copied lies at or after start */
        return rc;
    *pos = p;
    *count = n;
    return (int64_t)used;
}

int64_t apl_log_export(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap, uint32_t opts,
                       uint64_t max_serial, uint64_t *first_serial, uint64_t *last_serial, uint64_t *count)
{
    int64_t rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_export(v, pos, out, cap, opts, max_serial, first_serial, last_serial, count);
    view_exit();
    return rc;
}

/* Position of the entry with this serial; APL_NOTFOUND when it is past the
 * head, APL_ELOGFULL when it is no longer retained. */
static int log_seek(apl_view *v, uint64_t serial, uint64_t *pos)
{
    uint64_t head, tail, ver, last;
    int rc = log_bounds(v, &head, &tail, &ver, &last);
    if (rc)
        return rc;
    if (serial > last)
        return APL_NOTFOUND;
    uint64_t p = tail;
    struct apl_centry h;
    while ((rc = next_entry(v, &p, head, &h)) == 1) {
        if (h.ce_serial == serial) {
            *pos = p;
            return still_valid(v, p);
        }
        if (h.ce_serial > serial)
            return APL_ELOGFULL;
        p += h.ce_len;
    }
    return rc < 0 ? rc : APL_ELOGFULL;
}

int apl_log_seek(apl_view *v, uint64_t serial, uint64_t *pos)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_seek(v, serial, pos);
    view_exit();
    return rc;
}
