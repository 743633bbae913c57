/*
 * apl_scan.c — change-log entries held outside the ring (a log history's
 * parts, an exported blob: entries back to back, as apl_log_export writes
 * them), scanned at memory speed for what a restore plan needs before it
 * reads them one by one (appliance/recovery/restore.py): where its reading
 * may start, and the last serial a blob holds.
 *
 * Transactions do not interleave in a change log (the controller applies
 * each in one call: BEGIN, its changes, COMMIT or CANCEL back to back), so
 * the first transaction committed after a target begins after the last
 * boundary (COMMIT, CANCEL, or a history's gap marker, a PAD entry) that
 * precedes its COMMIT: everything before that boundary is older than the
 * target and can be passed over.
 *
 * Shared: nothing; the caller's buffer is only read.
 */
#include "apl_int.h"

int64_t apl_entries_start(const uint8_t *buf, uint64_t len, uint64_t serial, uint64_t time_ns, int by_time,
                          uint64_t *last_serial)
{
    uint64_t p = 0, boundary = 0, last = 0;
    int64_t start = -1;
    while (p + sizeof(struct apl_centry) <= len) {
        const struct apl_centry *e = (const struct apl_centry *)(buf + p);
        if (e->ce_len < sizeof(*e) || p + e->ce_len > len)
            break;                       /* cut short: the whole entries end here */
        last = e->ce_serial;
        uint16_t k = e->ce_kind;
        if (start < 0 && k == APL_CE_COMMIT && (by_time ? e->ce_time_ns > time_ns : e->ce_serial > serial))
            start = (int64_t)boundary;
        if (k == APL_CE_COMMIT || k == APL_CE_CANCEL || k == APL_CE_PAD)
            boundary = p;
        p += e->ce_len;
    }
    *last_serial = last;
    return start >= 0 ? start : (int64_t)boundary;
}
