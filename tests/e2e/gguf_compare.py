"""GGUF files compared key by key and tensor by tensor (tests/e2e/test_gguf.py,
scripts/bench_gguf.py): a header parser in plain Python, independent of gguf-py, that keeps
each value's byte span, so a difference is reported with the key or tensor it is in and its
first differing byte.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

# --------------------------------------------------------------------------------------
# The metadata keys lorafs's GGUF may differ in from the converter's, and why. Only keys
# that name where the file came from: the converter derives them from the name of the
# directory it converts (gguf-py's Metadata.load -> get_model_id_components on the
# directory name), which for a materialized copy is a name the user chose and for a mount
# the mount point; lorafs cannot know either when it builds the header. Every other key
# must be equal in type, value and order. (general.size_label is not an exception: the
# converter computes it from the parameter count, "144K", even for a directory named
# "Acme-Llama-7B-Instruct-v1.5".) When the model card (README.md) gives these keys, they
# are equal: test_gguf.py's model-card tests check them apart from this list.
GGUF_KEY_EXCEPTIONS = frozenset(
    {
        "general.name",  # the directory name, e.g. "Materialized" or "Mnt"
        "general.basename",  # parsed from the directory name when it looks like "Org-Base-7B-v1"
        "general.finetune",  # idem ("...-Instruct", "...-chat")
        "general.version",  # idem ("v1.5")
    }
)


# --------------------------------------------------------------------------------------
# GGUF files, parsed in plain Python (independent of gguf-py, with byte spans for reports)

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
GGML_TYPES = {0: "F32", 1: "F16", 8: "Q8_0", 30: "BF16"}


@dataclasses.dataclass
class GgufKey:
    name: str
    vtype: int  # GGUF value type; arrays as (9, element type)
    start: int  # file offset of the value (after the key name and type)
    end: int
    value: object  # decoded (arrays: a list)


@dataclasses.dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (the contiguous dimension) first
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int = 0  # up to the next tensor's offset or the file's end (padding included)


@dataclasses.dataclass
class Gguf:
    path: Path
    version: int
    keys: list[GgufKey]
    tensors: list[GgufTensor]
    data_start: int
    size: int

    def key(self, name):
        return next((k for k in self.keys if k.name == name), None)

    def value(self, name, default=None):
        k = self.key(name)
        return default if k is None else k.value


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="surrogateescape")

    def value(self, vtype):
        if vtype in _SCALARS:
            return vtype, self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return vtype, self.string()
        if vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            items = [self.value(etype)[1] for _ in range(n)]
            return (vtype, etype), items
        raise ValueError(f"unknown GGUF value type {vtype} at offset {self.pos}")


def parse_gguf(path: Path) -> Gguf:
    """The header of a GGUF file (v2/v3): keys in file order with their value spans,
    tensor infos, and where the data section starts."""
    data = Path(path).read_bytes()
    c = _Cursor(memoryview(data))
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r})")
    c.pos = 4
    version, n_tensors, n_keys = c.take("<I"), c.take("<Q"), c.take("<Q")
    keys = []
    for _ in range(n_keys):
        name = c.string()
        vtype = c.take("<I")
        start = c.pos
        vtype, value = c.value(vtype)
        keys.append(GgufKey(name, vtype, start, c.pos, value))
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
        tensors.append(GgufTensor(name, dims, c.take("<I"), c.take("<Q")))
    alignment = next((k.value for k in keys if k.name == "general.alignment"), 32)
    data_start = -(-c.pos // alignment) * alignment
    ends = sorted({t.offset for t in tensors} | {len(data) - data_start})
    for t in tensors:
        t.nbytes = next(e for e in ends if e > t.offset) - t.offset
    return Gguf(Path(path), version, keys, tensors, data_start, len(data))


def _show(v, limit=120):
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + f"... ({len(v) if hasattr(v, '__len__') else '?'} items)"


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo < n:  # by chunks, then byte by byte
        hi = min(lo + 65536, n)
        if a[lo:hi] != b[lo:hi]:
            return next(i for i in range(lo, hi) if a[i] != b[i])
        lo = hi
    return n


def _key_difference(name, ka: GgufKey, kb: GgufKey) -> str | None:
    if ka.vtype != kb.vtype:
        return f"key {name}: value type {ka.vtype} (got) vs {kb.vtype} (converter)"
    if ka.value == kb.value:
        return None
    if isinstance(ka.value, list):
        i = next((i for i, (x, y) in enumerate(zip(ka.value, kb.value)) if x != y), min(len(ka.value), len(kb.value)))
        got = ka.value[i] if i < len(ka.value) else "<end>"
        want = kb.value[i] if i < len(kb.value) else "<end>"
        return (
            f"key {name}: arrays of {len(ka.value)} (got) and {len(kb.value)} (converter) items differ first at "
            f"item {i}: {got!r} vs {want!r}"
        )
    return f"key {name}: {_show(ka.value)} (got) vs {_show(kb.value)} (converter)"


def gguf_differences(got_path: Path, want_path: Path, exceptions=GGUF_KEY_EXCEPTIONS):
    """Compare lorafs's GGUF (got) with the converter's (want).

    Returns (problems, excepted): `problems` lists every difference outside the exceptions,
    one line each, naming the key or tensor and the first differing byte offset;
    `excepted` maps each exception key whose presence or value differs to (got, want)."""
    got, want = parse_gguf(got_path), parse_gguf(want_path)
    problems = []
    if got.version != want.version:
        problems.append(f"GGUF version {got.version} (got) vs {want.version} (converter)")

    # --- metadata: the same keys in the same order, apart from the exceptions
    gk = [k for k in got.keys if k.name not in exceptions]
    wk = [k for k in want.keys if k.name not in exceptions]
    names_g, names_w = [k.name for k in gk], [k.name for k in wk]
    if names_g != names_w:
        i = next((i for i, (a, b) in enumerate(zip(names_g, names_w)) if a != b), min(len(names_g), len(names_w)))
        problems.append(
            f"metadata keys differ first at position {i} (exceptions left out): "
            f"{names_g[i] if i < len(names_g) else '<end>'} (got) vs {names_w[i] if i < len(names_w) else '<end>'} "
            f"(converter); only in got: {sorted(set(names_g) - set(names_w))}, "
            f"only in converter: {sorted(set(names_w) - set(names_g))}"
        )
    by_name = {k.name: k for k in gk}
    got_bytes, want_bytes = Path(got_path).read_bytes(), Path(want_path).read_bytes()
    for kw in wk:
        kg = by_name.get(kw.name)
        if kg is None:
            continue
        if got_bytes[kg.start : kg.end] != want_bytes[kw.start : kw.end]:
            d = first_difference(got_bytes[kg.start : kg.end], want_bytes[kw.start : kw.end])
            why = _key_difference(kw.name, kg, kw) or f"key {kw.name}: same value, different encoding"
            problems.append(f"{why} [first differing byte {d} of the value: offset {kg.start + d} in got, {kw.start + d} in converter]")
    excepted = {}
    for name in sorted(exceptions):
        a, b = got.value(name), want.value(name)
        if a != b:
            excepted[name] = (a, b)

    # --- tensors: names, order, types, shapes, offsets, bytes
    tg = [(t.name, t.ggml_type, t.shape, t.offset) for t in got.tensors]
    tw = [(t.name, t.ggml_type, t.shape, t.offset) for t in want.tensors]
    if [t[0] for t in tg] != [t[0] for t in tw]:
        names_g, names_w = [t[0] for t in tg], [t[0] for t in tw]
        i = next((i for i, (a, b) in enumerate(zip(names_g, names_w)) if a != b), min(len(names_g), len(names_w)))
        problems.append(
            f"tensor list differs first at position {i}: {names_g[i] if i < len(names_g) else '<end>'} (got) vs "
            f"{names_w[i] if i < len(names_w) else '<end>'} (converter); {len(names_g)} vs {len(names_w)} tensors"
        )
    wmap = {t.name: t for t in want.tensors}
    for t in got.tensors:
        w = wmap.get(t.name)
        if w is None:
            continue
        if (t.ggml_type, t.shape, t.offset) != (w.ggml_type, w.shape, w.offset):
            problems.append(
                f"tensor {t.name}: type {GGML_TYPES.get(t.ggml_type, t.ggml_type)} shape {t.shape} offset {t.offset} (got) vs "
                f"type {GGML_TYPES.get(w.ggml_type, w.ggml_type)} shape {w.shape} offset {w.offset} (converter)"
            )
            continue
        a = got_bytes[got.data_start + t.offset : got.data_start + t.offset + t.nbytes]
        b = want_bytes[want.data_start + w.offset : want.data_start + w.offset + w.nbytes]
        if a != b:
            d = first_difference(a, b)
            where = f"byte {d} of {len(b)}"
            if t.ggml_type == 8:
                where += f" (Q8_0 block {d // 34}, {'scale' if d % 34 < 2 else f'quant {d % 34 - 2}'})"
            problems.append(f"tensor {t.name} ({GGML_TYPES.get(t.ggml_type, t.ggml_type)}, {t.shape}): data differ at {where}")
    if not problems and got_bytes[got.data_start :] != want_bytes[want.data_start :]:
        d = first_difference(got_bytes[got.data_start :], want_bytes[want.data_start :])
        problems.append(f"data sections differ at byte {d} (padding?) of {len(want_bytes) - want.data_start}")
    return problems, excepted


def format_differences(got: Path, want: Path, problems, limit=25) -> str:
    lines = [f"{got} differs from the converter's {want} in {len(problems)} place(s):"]
    lines += ["  " + p for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
