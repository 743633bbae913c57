/*
 * apl_rec.h — the record format: how one record of a table is laid out as
 * the value bytes of its leaf slot (and as the A and B images of the change
 * log). This header is the one place where it is defined; the codec that
 * writes and reads it is apl_py.c (RecordCodec), and Python never builds or
 * parses a record image itself.
 *
 * Why this format: a read decodes the record into a dict on every get, so the
 * format is chosen for decoding speed. The schema is known to every process
 * (it is part of the configuration, and the schema hash in the superblock
 * proves both sides agree), so a record carries no field names and no type
 * tags: each table has one fixed layout, computed from its fields in schema
 * order. Fixed-width values sit at offsets known from the schema; variable
 * ones are found through a small table of end offsets. Decoding is one pass
 * with no branching on the data but for nulls, and the length of the image is
 * known exactly from its own bytes, so a damaged image is detected, never
 * read past.
 *
 * Layout of one record with N fields, F of them fixed-width and V of them
 * variable-length (all little-endian, no alignment: values are read with
 * memcpy):
 *
 *   null bitmap   ceil(N / 8) bytes. Bit (i & 7) of byte (i >> 3) is set when
 *                 field i (schema order) is None; bits past N are 0.
 *   fixed slots   the fixed-width fields in schema order:
 *                   int   i64, 8 bytes (two's complement)
 *                   float IEEE-754 binary64, 8 bytes (-0.0, inf kept; NaN is
 *                         never stored: validation refuses it)
 *                   bool  1 byte, 0 or 1
 *                 a None field's slot is all zero.
 *   end table     one u16 per str/bytes field in schema order: the end offset
 *                 of that field's bytes from the start of the variable area;
 *                 it starts where the previous one ended (the first at 0), so
 *                 ends never decrease. A None field has length 0.
 *   variable area the str (UTF-8) and bytes values back to back.
 *
 * Its length is exactly ceil(N/8) + fixed bytes + 2V + the last end (0 when
 * V = 0). A record has exactly one image: the decoder refuses (as damage)
 * any other length, a stray bitmap bit, a None field whose slot or span is
 * not empty, a bool other than 0 or 1, a NaN, ends out of order, a str that
 * is not UTF-8. A leaf record takes at most (block - 64) / 2 bytes (at most 16,352
 * with 32 KiB blocks), so u16 ends always suffice; the encoder refuses
 * anything larger before building it.
 *
 * The format's number is APL_REC_FORMAT (apl_layout.h): the configuration's
 * schema hash, the replication fingerprint and the recorded layout include
 * it and the fields in schema order, so segments or a peer holding records
 * of another format or field order are refused with the setting that
 * differs, never misread.
 */
#ifndef APL_REC_H
#define APL_REC_H

#include <stdint.h>
#include <string.h>

#include "apl_layout.h"

/* Field types (the configuration's "int", "float", "bool", "str", "bytes"). */
enum apl_rec_type { APL_REC_INT = 1, APL_REC_FLOAT = 2, APL_REC_BOOL = 3, APL_REC_STR = 4, APL_REC_BYTES = 5 };

#define APL_REC_MAX_LEN 0xFFFFu   /* no image is longer (u16 end offsets) */

/* Where each field of one table lives in its records. */
struct apl_rec_field {
    uint8_t type;      /* enum apl_rec_type */
    uint8_t nullable;
    uint16_t at;       /* fixed: byte offset of the slot; str/bytes: index in the end table */
};

struct apl_rec_layout {
    uint32_t nfields;
    uint32_t nvar;     /* str/bytes fields */
    uint32_t fixed_at; /* = bitmap bytes: where the fixed slots start */
    uint32_t ends_at;  /* where the end table starts */
    uint32_t head;     /* bytes before the variable area */
    struct apl_rec_field *f;   /* nfields entries (owned by the codec) */
};

static inline int apl_rec_fixed(uint8_t type)
{
    return type == APL_REC_INT || type == APL_REC_FLOAT || type == APL_REC_BOOL;
}

/* Fill in the offsets of L from the types in L->f[0..nfields). */
static inline void apl_rec_plan(struct apl_rec_layout *L)
{
    uint32_t at = (L->nfields + 7) / 8, nvar = 0;
    L->fixed_at = at;
    for (uint32_t i = 0; i < L->nfields; i++) {
        struct apl_rec_field *f = &L->f[i];
        if (apl_rec_fixed(f->type)) {
            f->at = (uint16_t)at;
            at += f->type == APL_REC_BOOL ? 1 : 8;
        } else {
            f->at = (uint16_t)nvar++;
        }
    }
    L->nvar = nvar;
    L->ends_at = at;
    L->head = at + 2 * nvar;
}

static inline uint32_t apl_rec_u16(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

/* The variable area's length as the image says, or UINT32_MAX when the
 * image cannot be one of this layout (too short, or its length is not
 * head + that length). */
static inline uint32_t apl_rec_varlen(const struct apl_rec_layout *L, const uint8_t *p, uint64_t n)
{
    if (n < L->head)
        return UINT32_MAX;
    uint32_t var = L->nvar ? apl_rec_u16(p + L->ends_at + 2 * (L->nvar - 1)) : 0;
    return (uint64_t)L->head + var == n ? var : UINT32_MAX;
}

#endif
