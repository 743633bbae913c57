/*
 * apl_errors.h — every error code of the C helpers, in one reserved negative
 * range. The same numbers travel on the wire, and appliance/errors.py maps each
 * to exactly one exception class (by the class attribute `code_name`).
 * Keep APL_ERRORS in step with apl_strerror() (apl_errors.c reads the same list).
 */
#ifndef APL_ERRORS_H
#define APL_ERRORS_H

#define APL_OK 0

/*      name                code    message */
#define APL_ERRORS(_) \
    _(APL_NOTFOUND,        -31001, "no such record") \
    _(APL_EXISTS,          -31002, "duplicate primary key") \
    _(APL_EFULL,           -31003, "appliance memory full: no free block slot") \
    _(APL_ETOOBIG,         -31004, "record too large for a block") \
    _(APL_EKEY,            -31005, "key too long or malformed") \
    _(APL_EBUFSIZE,        -31006, "output buffer too small") \
    _(APL_EVERSION,        -31007, "segment format version mismatch") \
    _(APL_EMAGIC,          -31008, "segment is not an appliance segment") \
    _(APL_ECORRUPT,        -31009, "block structure is inconsistent") \
    _(APL_EREADERS,        -31010, "no free reader slot") \
    _(APL_EFILE,           -31011, "no such file") \
    _(APL_EINVAL,          -31012, "invalid argument") \
    _(APL_ENOMEM,          -31013, "out of process memory") \
    _(APL_ELOGFULL,        -31014, "change log cannot hold the entry") \
    _(APL_EBATCH,          -31015, "no commit batch is open") \
    _(APL_EGEOMETRY,       -31016, "segment geometry differs from the configuration") \
    _(APL_EUNDO,           -31017, "undoing a failed transaction failed; the batch must not be published") \
    _(APL_ESNAPSHOT,       -31018, "snapshot too old: versions it reads were freed (its reader slot was cleared or overwritten)") \
    _(APL_EDEVICE,         -31019, "a block it needs lies on a detached storage device") \
    /* raised by the controller and the libraries (and APL_ECLOSED by a read of a closed view) */ \
    _(APL_ELOCKTIMEOUT,    -31101, "lock wait timed out; the transaction was cancelled") \
    _(APL_EDEADLOCK,       -31102, "deadlock; this transaction was chosen as the victim and cancelled") \
    _(APL_ECANCELLED,      -31103, "the transaction was cancelled") \
    _(APL_ETXN,            -31104, "the transaction is not open") \
    _(APL_ENOTABLE,        -31105, "no such table") \
    _(APL_ENOFIELD,        -31106, "no such field") \
    _(APL_ETYPE,           -31107, "wrong type") \
    _(APL_EACCESS,         -31108, "access denied") \
    _(APL_EUNAVAIL,        -31109, "appliance not running") \
    _(APL_EPROTO,          -31110, "protocol error") \
    _(APL_ECLOSED,         -31111, "the handle is closed") \
    _(APL_ECONFIG,         -31112, "bad configuration") \
    _(APL_ESTALE,          -31113, "stale epoch: the sender is no longer the primary") \
    _(APL_EBUSY,           -31114, "resource busy") \
    _(APL_EUNKNOWN,        -31115, "commit outcome unknown: the controller stopped before answering") \
    _(APL_EREADONLY,       -31116, "this appliance is a secondary: read-only") \
    _(APL_ENOREAD,         -31117, "this secondary keeps lz4 backup blocks and serves no reads") \
    _(APL_ELIMIT,          -31118, "the request exceeds a configured limit") \
    _(APL_EINTERNAL,       -31119, "internal error: an error code this build does not know") \
    _(APL_EBACKUP,         -31120, "committed locally; its synchronous backup was not confirmed in time") \
    _(APL_EDISK,           -31121, "the durability files could not be written or read") \
    _(APL_ENOSPC,          -31122, "no space left for the durability files") \
    _(APL_ENOTPRIMARY,     -31123, "this appliance is no longer the primary: a newer epoch took over") \
    _(APL_EROLE,           -31124, "the operation does not fit the appliance's role or state") \
    _(APL_EDAMAGED,        -31125, "a block's content does not match its checksum (damaged memory)") \
    _(APL_ENOHISTORY,      -31126, "the log history does not reach back that far") \
    _(APL_ECONFLICT,       -31127, "later transactions changed the same records") \
    _(APL_EPROGRAM,        -31128, "a program cannot be imported or is not the version recorded") \
    _(APL_ESTALEREAD,      -31129, "a record read optimistically changed before its lock; the transaction was cancelled")

enum apl_error {
#define APL_ERR_ENUM(name, code, msg) name = code,
    APL_ERRORS(APL_ERR_ENUM)
#undef APL_ERR_ENUM
};

/* "APL_NOTFOUND: no such record"; for an unknown code, a generic text. */
const char *apl_strerror(int code);
/* "APL_NOTFOUND"; NULL for an unknown code. */
const char *apl_errname(int code);

#endif
