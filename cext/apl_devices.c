/*
 * apl_devices.c — a storage device (one device segment) taken out of service
 * and brought back ([0125], [0129]–[0132]): the controller, between batches
 * (detach, renew) or in an open batch (fill).
 *
 * Detach sets the device's bit in sb_detached and marks (APL_ADDR_OFF) the
 * location entry of every number whose current chain has a block on it. A
 * reader loads that entry as it always does; its segment field is then past
 * every segment, so the read finds nothing and fails (read_end turns the
 * failure into APL_EDEVICE while a bit of sb_detached is set) — no test is
 * added to the read path. The writer's changes to such a number fail the
 * same way (cow: APL_EDEVICE); nothing is allocated on the device any more
 * (alloc_slot), and slots freed there are kept aside (free_slot).
 *
 * Refill: a peer's image of a marked number (apl_apply_image) gets a fresh
 * head on the devices in service, whose bh_prev is the old chain, so a pin
 * that still sees the old version reads it there: the detached device's
 * memory is left as it was (the segment stays mapped by every process) and
 * its slots come back one by one through the retire queue as pins pass.
 *
 * Renew: once every slot of the device is free again, no version anyone can
 * reach lives there. Its memory is given back (MADV_REMOVE: the pages are
 * dropped, a fresh zeroed page appears where it is next written) and the
 * bit cleared: the device is new and in service. Fill then moves the
 * numbers it held back onto it, each by an ordinary copy-on-write with the
 * allocator taking the device's slots first (prefer_seg).
 *
 * Shared: sb_detached and the location table (the controller writes both;
 * readers load them). A reader that loaded an entry before it was marked
 * reads the old chain, which stays intact until the renewal; the renewal
 * needs every slot free, which the retire queue grants only after every pin
 * passed the versions that lived there — the argument any reuse of a slot
 * rests on (apl_alloc.c).
 */

#define _GNU_SOURCE
#include <sys/mman.h>
#include <unistd.h>

#include "apl_store_int.h"

/* Does the chain at raw address `a` have a block on a segment of `mask`? */
static int chain_on(apl_store *s, apl_addr a, uint64_t mask)
{
    for (int i = 0; a != APL_ADDR_NONE && i < 64; i++) {
        if ((mask >> APL_ADDR_SEG(a)) & 1)
            return 1;
        const struct apl_bhdr *b = apl_ptr(s->v, a);
        if (!b)
            return 0;
        a = b->bh_next;
    }
    return 0;
}

/* Mark every number whose chain touches a device of `mask`; how many. */
static int64_t tag_numbers(apl_store *s, uint64_t mask)
{
    int64_t n = 0;
    for (uint64_t num = 0; num < s->v->v_max_blocks; num++) {
        apl_addr a = s->v->v_loc[num];
        if (a == APL_ADDR_NONE)
            continue;
        if (apl_loc_off(a)) {
            n++;
            continue;
        }
        if (chain_on(s, a, mask)) {
            STORE_REL(&s->v->v_loc[num], a | APL_ADDR_OFF);
            n++;
        }
    }
    return n;
}

void devices_retag(apl_store *s)
{
    uint64_t mask = s->v->v_sb->sb_detached;
    if (mask && !s->bs)
        tag_numbers(s, mask);
}

int64_t apl_device_detach(apl_store *s, uint32_t seg)
{
    if (s->bs || seg >= s->v->v_nseg || !s->v->v_seg[seg])
        return APL_EINVAL;
    if (s->pending)
        return APL_EBATCH;
    struct apl_super *sb = s->v->v_sb;
    uint64_t bit = 1ull << seg;
    if (!(sb->sb_detached & bit)) {
        s->free_total -= s->nfree[seg];
        STORE_REL(&sb->sb_detached, sb->sb_detached | bit);
        FENCE();
    }
    return tag_numbers(s, bit);
}

int64_t apl_device_marked(apl_store *s, uint32_t seg)
{
    if (s->bs || seg >= s->v->v_nseg)
        return APL_EINVAL;
    int64_t n = 0;
    for (uint64_t num = 0; num < s->v->v_max_blocks; num++) {
        apl_addr a = s->v->v_loc[num];
        if (apl_loc_off(a) && chain_on(s, apl_loc_raw(a), 1ull << seg))
            n++;
    }
    return n;
}

int64_t apl_device_numbers(apl_store *s, uint32_t seg, uint32_t start, uint32_t *out, uint32_t cap,
                           uint32_t *next)
{
    if (s->bs || seg >= s->v->v_nseg)
        return APL_EINVAL;
    uint64_t num = start, max = s->v->v_max_blocks;
    uint32_t n = 0;
    for (; num < max && n < cap; num++) {
        apl_addr a = apl_loc_raw(s->v->v_loc[num]);
        if (a != APL_ADDR_NONE && chain_on(s, a, 1ull << seg))
            out[n++] = (uint32_t)num;
    }
    *next = (uint32_t)num;
    return n;
}

int apl_device_renew(apl_store *s, uint32_t seg)
{
    apl_view *v = s->v;
    if (s->bs || seg >= v->v_nseg || !v->v_seg[seg])
        return APL_EINVAL;
    if (s->pending)
        return APL_EBATCH;
    struct apl_super *sb = v->v_sb;
    uint64_t bit = 1ull << seg;
    if (!(sb->sb_detached & bit))
        return APL_OK;
    if (s->nfree[seg] != v->v_seg_slots)
        return APL_EBUSY;     /* versions some pin may still read live there */
    uint8_t *base = v->v_seg[seg];
    uint64_t from = v->v_bsize, to = (v->v_seg_slots + 1) * (uint64_t)v->v_bsize;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t a = APL_ALIGN(from, page), b = to & ~(page - 1);
    if (a < b && madvise(base + a, b - a, MADV_REMOVE) == 0) {
        memset(base + from, 0, a - from);
        memset(base + b, 0, to - b);
    } else {
        memset(base + from, 0, to - from);
    }
    STORE_REL(&sb->sb_detached, sb->sb_detached & ~bit);
    FENCE();
    s->free_total += s->nfree[seg];
    return APL_OK;
}

int64_t apl_device_fill(apl_store *s, uint32_t seg, const uint32_t *numbers, uint64_t n)
{
    if (s->bs || seg >= s->v->v_nseg || seg_detached(s, seg))
        return APL_EINVAL;
    if (!s->pending)
        return APL_EBATCH;
    int64_t moved = 0;
    int rc = APL_OK;
    s->prefer_seg = seg + 1;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t num = numbers[i];
        if (num >= s->v->v_max_blocks)
            continue;
        apl_addr a = s->v->v_loc[num];
        if (a == APL_ADDR_NONE || apl_loc_off(a))
            continue;
        int err = 0;
        if (cow(s, num, &err)) {
            moved++;
        } else if (err != APL_EDAMAGED) {    /* a damaged one stays for `repair` */
            rc = err;
            break;
        }
    }
    s->prefer_seg = 0;
    return rc ? rc : moved;
}
