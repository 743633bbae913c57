"""Key encoding: keys become bytes whose memcmp order is the natural order.

- int: 8 bytes big-endian with the sign bit flipped (two's complement), so
  -2**63 .. 2**63-1 sort numerically;
- str: UTF-8 (whose byte order is code-point order), every 0x00 escaped as
  0x00 0xFF, then a 0x00 0x00 terminator; bytes: the same without UTF-8.

The terminator makes an encoded key self-delimiting, so an alternate-key index
stores ``encode(alt value) + encode(primary key)`` and still sorts by alt value
first, then primary key (C helpers compare with memcmp only).
"""
from __future__ import annotations

from ..errors import WrongTypeError

_FLIP = 1 << 63
_MIN, _MAX = -(1 << 63), (1 << 63) - 1

KEY_TYPES = ("int", "str", "bytes")


def encode_int(v: int) -> bytes:
    return (v + _FLIP).to_bytes(8, "big")


def decode_int(b: bytes) -> int:
    return int.from_bytes(b[:8], "big") - _FLIP


def encode_str(v: str) -> bytes:
    return v.encode("utf-8").replace(b"\x00", b"\x00\xff") + b"\x00\x00"


def decode_str(b: bytes) -> str:
    end = b.find(b"\x00\x00")
    return b[:end].replace(b"\x00\xff", b"\x00").decode("utf-8")


def encode_bytes(v: bytes) -> bytes:
    return bytes(v).replace(b"\x00", b"\x00\xff") + b"\x00\x00"


def decode_bytes(b: bytes) -> bytes:
    end = b.find(b"\x00\x00")
    return b[:end].replace(b"\x00\xff", b"\x00")


class KeyCodec:
    """Encoder/decoder for one key type, with type checks that say where."""

    __slots__ = ("type_name", "where", "_check", "encode_raw", "decode", "width")

    def __init__(self, type_name: str, where: str) -> None:
        if type_name not in KEY_TYPES:
            raise ValueError(f"{where}: key type must be one of {', '.join(KEY_TYPES)}")
        self.type_name = type_name
        self.where = where
        if type_name == "int":
            self.encode_raw, self.decode, self.width = encode_int, decode_int, 8
        elif type_name == "str":
            self.encode_raw, self.decode, self.width = encode_str, decode_str, None
        else:
            self.encode_raw, self.decode, self.width = encode_bytes, decode_bytes, None

    def encode(self, v) -> bytes:
        t = self.type_name
        if t == "int":
            if type(v) is not int:  # bool is not a key
                raise WrongTypeError(f"{self.where}: key must be an int, not {type(v).__name__}",
                                     where=self.where, value=repr(v))
            if not _MIN <= v <= _MAX:
                raise WrongTypeError(f"{self.where}: int key {v} is outside the signed 64-bit range",
                                     where=self.where)
            return (v + _FLIP).to_bytes(8, "big")
        if t == "str":
            if type(v) is not str:
                raise WrongTypeError(f"{self.where}: key must be a str, not {type(v).__name__}",
                                     where=self.where, value=repr(v))
            try:
                return encode_str(v)
            except UnicodeEncodeError:
                raise WrongTypeError(f"{self.where}: key is a str that UTF-8 cannot encode (a lone surrogate)",
                                     where=self.where, value=repr(v)) from None
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise WrongTypeError(f"{self.where}: key must be bytes, not {type(v).__name__}",
                                 where=self.where, value=repr(v))
        return encode_bytes(bytes(v))

    def split(self, composite: bytes) -> tuple[bytes, bytes]:
        """Split ``encode(x) + rest`` into its two parts."""
        if self.width:
            return composite[: self.width], composite[self.width:]
        end = composite.find(b"\x00\x00") + 2
        return composite[:end], composite[end:]
