/*
 * apl_errors.c — the text and the name of each error code (apl_strerror,
 * apl_errname), both generated from the one list in apl_errors.h.
 */
#include "apl_errors.h"

const char *apl_strerror(int code)
{
    switch (code) {
    case APL_OK: return "APL_OK: success";
#define APL_ERR_STR(name, c, msg) case name: return #name ": " msg;
    APL_ERRORS(APL_ERR_STR)
#undef APL_ERR_STR
    default: return "APL_UNKNOWN: unknown error code";
    }
}

const char *apl_errname(int code)
{
    switch (code) {
#define APL_ERR_NAME(name, c, msg) case name: return #name;
    APL_ERRORS(APL_ERR_NAME)
#undef APL_ERR_NAME
    default: return 0;
    }
}
