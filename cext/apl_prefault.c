/*
 * apl_prefault.c — map a segment's pages into this process ahead of use.
 *
 * A segment's memory is reserved when it is made (posix_fallocate), but a
 * page still costs a fault the first time this process writes it: on a VM
 * that is several microseconds a page (the host backs the page then), paid
 * by whatever write comes first — a commit, or the first copy pouring a
 * whole store into an empty secondary. The controller calls this from a
 * background thread at start, a chunk at a time, so those faults are paid
 * before the work that would wait on them.
 *
 * Shared: the segment's pages, written by the controller's main thread at
 * the same time. Nothing here writes them: MADV_POPULATE_WRITE (Linux 5.14)
 * only builds the page-table entries, as a write fault would, and leaves the
 * contents alone; where the kernel lacks it, one volatile read per page
 * maps the page (a later write then pays only the cheap write-protect
 * fault). Either is safe beside a concurrent writer, and beside a device
 * renewal's MADV_REMOVE (a page mapped again after the hole is punched is a
 * zero page, which is what the renewal wants there).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "apl.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

int apl_prefault(uint8_t *base, uint64_t len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)base & ~(uintptr_t)(page - 1);
    uint64_t n = len + ((uintptr_t)base - a);
    if (madvise((void *)a, n, MADV_POPULATE_WRITE) == 0)
        return 0;
    if (errno != EINVAL)
        return APL_EINVAL;        /* not mapped writable (EFAULT, ENOMEM): nothing to do */
    for (uint64_t off = 0; off < n; off += page)
        (void)*(volatile uint8_t *)(a + off);
    return 1;
}
