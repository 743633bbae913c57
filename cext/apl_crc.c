/*
 * apl_crc.c — the CRC-32 of the durability files' records, fast.
 *
 * The same function as zlib's crc32() (the reflected CRC-32 of gzip and
 * PNG, polynomial 0xEDB88320, the register inverted before and after), so
 * files written with either read back with the other: records.py uses it
 * for large payloads and zlib.crc32 for small ones. zlib here does about
 * 5.5 GB/s alone (2 GB/s with the other core busy), this 13.7 GB/s; a cold
 * start checks every byte of a checkpoint and its log, and the log writer
 * every byte it writes.
 *
 * Where the CPU has PCLMULQDQ, the buffer is folded 64 bytes at a time
 * into four 128-bit lanes (carry-less multiplication by x^(512+32) and
 * x^(512-32) mod P, reflected), the lanes folded into one (by x^(128+32)
 * and x^(128-32)), and the 16 bytes left — whose CRC, from a register of
 * zero, is the buffer's — finished by the table, with the bytes of the
 * buffer that did not fill a 16-byte block. The constants are the ones
 * every PCLMULQDQ CRC-32 uses (Gopal et al., "Fast CRC Computation for
 * Generic Polynomials Using PCLMULQDQ Instruction", Intel, 2009).
 * Without PCLMULQDQ the table does all of it, 8 bytes a step.
 *
 * Shared: the table and the CPU check, made once by the first call
 * (pthread_once: any thread may call, the GIL let go), read-only after.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "apl.h"

static uint32_t tab[8][256];
static int have_clmul;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        tab[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++)
            tab[t][n] = tab[0][tab[t - 1][n] & 0xFF] ^ (tab[t - 1][n] >> 8);
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#else
    have_clmul = 0;
#endif
}

/* the raw register (no inversion) over buf */
static uint32_t crc_table(uint32_t c, const uint8_t *p, uint64_t n)
{
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = tab[7][lo & 0xFF] ^ tab[6][(lo >> 8) & 0xFF] ^ tab[5][(lo >> 16) & 0xFF] ^ tab[4][lo >> 24] ^
            tab[3][hi & 0xFF] ^ tab[2][(hi >> 8) & 0xFF] ^ tab[1][(hi >> 16) & 0xFF] ^ tab[0][hi >> 24];
    }
    while (n--)
        c = tab[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

/* The raw register over buf, n >= 64: fold to 16 bytes, finish with the table. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc_clmul(uint32_t c, const uint8_t *p, uint64_t n)
{
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);   /* fold by 4 x 128 */
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);   /* fold by 128 */
    __m128i x0 = _mm_loadu_si128((const __m128i *)p);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
    for (; n >= 64; n -= 64, p += 64) {
        x0 = fold(x0, k1k2, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    x0 = fold(x0, k3k4, x1);
    x0 = fold(x0, k3k4, x2);
    x0 = fold(x0, k3k4, x3);
    for (; n >= 16; n -= 16, p += 16)
        x0 = fold(x0, k3k4, _mm_loadu_si128((const __m128i *)p));
    uint8_t last[16];
    _mm_storeu_si128((__m128i *)last, x0);
    return crc_table(crc_table(0, last, 16), p, n);
}
#endif

uint32_t apl_crc32(uint32_t crc, const uint8_t *buf, uint64_t len)
{
    pthread_once(&once, init);
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (have_clmul && len >= 64)
        return ~crc_clmul(c, buf, len);
#endif
    return ~crc_table(c, buf, len);
}
