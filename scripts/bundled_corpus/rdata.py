"""Reader for R's lazy-load databases (``<name>.rdx`` index + ``<name>.rdb`` records).

The records are R objects in R's XDR serialization format (versions 2 and 3); this reads the
subset that data packages use (vectors, pairlists, symbols, references, environments as
placeholders).  R itself is not on the machines this runs on, so it is read in Python.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib

from .text import BuildError


class _RUnserializer:
    """Minimal reader for R's XDR serialization format (versions 2 and 3)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise BuildError("R serialization: only XDR format is supported")
        self.data = data
        self.pos = 2
        self.refs: list = []
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            n = self.int()
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        typ = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if typ == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if typ in (254, 253, 252, 251, 250, 242, 241):  # NILVALUE, envs, ...
            return None
        if typ in (249, 248, 247):  # NAMESPACE, PACKAGE, PERSIST
            self.int()
            n = self.int()
            value = ("persist", [self.item() for _ in range(n)])
            self.refs.append(value)
            return value
        if typ == 1:  # SYMSXP
            value = ("sym", self.item())
            self.refs.append(value)
            return value
        if typ == 4:  # ENVSXP
            value = {"env": True}
            self.refs.append(value)
            self.int()
            for _ in range(4):
                self.item()
            return value
        if typ in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return ("pair", tag, car, cdr, attr)
        if typ == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            latin1 = flags & (1 << 14) and not flags & (1 << 15)
            return raw.decode("latin-1" if latin1 else "utf-8")
        if typ in (10, 13, 14, 15, 16, 19, 20, 24):
            n = self.int()
            if n == -1:
                n = (self.int() << 32) + self.int()
            if typ in (10, 13):
                value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            elif typ == 14:
                value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            elif typ == 15:
                value = list(struct.unpack_from(f">{2 * n}d", self.data, self.pos))
                self.pos += 16 * n
            elif typ == 24:
                value = self.data[self.pos : self.pos + n]
                self.pos += n
            else:
                value = [self.item() for _ in range(n)]
            attr = self.item() if has_attr else None
            return ("vec", typ, value, attr)
        raise BuildError(f"R serialization: unsupported SEXP type {typ}")


def _r_names(attr) -> list[str]:
    while attr is not None:
        _, tag, car, cdr, _ = attr
        if tag == ("sym", "names"):
            return car[2]
        attr = cdr
    return []


def _r_blob(data: bytes) -> bytes:
    """One lazy-load record: 4-byte length, then zlib (or Z/2/0-tagged xz/bzip2/raw)."""
    kind = data[4:5]
    if kind == b"Z":
        return lzma.decompress(data[5:])
    if kind == b"2":
        import bz2

        return bz2.decompress(data[5:])
    if kind == b"0":
        return data[5:]
    return zlib.decompress(data[4:])


def read_r_lazyload(prefix: str) -> dict[str, object]:
    with open(prefix + ".rdx", "rb") as fh:
        index = _RUnserializer(gzip.decompress(fh.read())).item()
    with open(prefix + ".rdb", "rb") as fh:
        db = fh.read()
    top = dict(zip(_r_names(index[3]), index[2], strict=True))
    variables = top["variables"]
    result = {}
    for name, ref in zip(_r_names(variables[3]), variables[2], strict=True):
        offset, length = ref[2]
        result[name] = _RUnserializer(_r_blob(db[offset : offset + length])).item()
    return result
