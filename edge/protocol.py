"""The wire format of ECG chunks (see docs/wire-protocol.md; the topic tree and the views
request are edge/topics.py).

A chunk is a short run of samples of several leads. On the wire it is one MQTT payload,
binary and little-endian (version 1):

    offset size  type     field
    0      4     bytes    magic b"ECGP"
    4      1     u8       version = 1
    5      1     u8       flags: bit 0 set = float32 samples, clear = int16; bits 1-7 are 0
    6      2     u16      header length H: bytes from offset 0 to the first sample
    8      4     u32      seq, per (monitor, patient) stream, wraps at 2**32
    12     8     i64      t0_ns: UTC nanoseconds of the first sample
    20     8     i64      sent_ns: wall clock (ns) when the ORIGIN raw chunk was published; 0 = unknown
    28     4     f32      fs: sample rate, Hz
    32     4     f32      scale_mv: millivolts per int16 count (1.0 in float32 chunks)
    36     2     u16      n_leads L
    38     4     u32      n_samples N
    42           lead table, L entries of 6 + len(label) bytes:
                   u32 mdc        IEEE 11073-10101 MDC code of the lead, 0 where none
                   u8  quality    index into QUALITY
                   u8  label_len  1..32
                   label          UTF-8, unique within the chunk
    H            samples, sample-major: N rows of L values (int16 or float32), so
                 value i of lead j sits at H + (i*L + j) * size

The payload ends exactly after the samples. ``mdc`` is for consumers outside this project;
receivers here derive codes from the labels (``Chunk.mdc_codes``). A chunk of the same
fields in JSON (``to_json``) exists for debugging and hand-written tests.

``decode``/``from_json`` take untrusted bytes: they raise ProtocolError, and nothing else,
for anything malformed, each with a short ``code`` (see CODES) and a sentence saying what
was wrong. ``encode``/``to_json`` take this program's own chunks: a malformed chunk there
is a bug and raises ValueError.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from panorama.errors import PanoramaError
from panorama.geometry import resolve_view

__all__ = ["PROTOCOL_VERSION", "CONTENT_TYPE_BINARY", "CONTENT_TYPE_JSON", "QUALITY", "CODES",
           "ProtocolError", "Limits", "Chunk", "encode", "decode", "to_json", "from_json",
           "decode_any"]

PROTOCOL_VERSION = 1
CONTENT_TYPE_BINARY = "application/vnd.panorama.ecg-chunk"  # MQTT v5 content type
CONTENT_TYPE_JSON = "application/json"
QUALITY = ("ok", "flat", "saturated", "missing", "masked")  # wire codes 0..4
CODES = ("truncated", "bad_magic", "version", "bad_header", "bad_fs", "bad_length", "too_large",
         "non_finite", "bad_label", "duplicate_lead", "bad_json", "bad_topic", "bad_views")

MAGIC = b"ECGP"
FLAG_FLOAT32 = 0x01
MAX_LABEL_BYTES = 32
DEFAULT_SCALE_MV = 0.001  # 1 µV per count
MAX_VIEWS_REQUEST_BYTES = 4096
_HEADER = struct.Struct("<4sBBHIqqffHI")  # the fixed part, offsets 0..41
_LEAD = struct.Struct("<IBB")  # mdc, quality, label_len
_SAMPLE = {False: np.dtype("<i2"), True: np.dtype("<f4")}  # keyed by the float32 flag
_I64 = (-(2**63), 2**63 - 1)


class ProtocolError(PanoramaError):
    """A payload or topic that does not follow the wire protocol. ``code`` is one of CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return type(self), (self.code, str(self))


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; anything beyond is refused with code "too_large" or "bad_fs"."""

    max_bytes: int = 262_144
    max_leads: int = 32
    max_samples: int = 8192  # per chunk
    min_fs: float = 50.0
    max_fs: float = 5000.0


@dataclass
class Chunk:
    seq: int  # u32 sequence number per (monitor, patient) stream, wraps at 2**32
    t0_ns: int  # UTC ns of the first sample
    fs: float  # Hz
    leads: list[str]  # labels: "I", "V4R", "120:45" ...
    data: np.ndarray  # (n_leads, n_samples) float32, mV
    quality: list[str] | None = None  # per lead, from QUALITY; None = all "ok"
    sent_ns: int = 0  # wall-clock ns when the ORIGIN raw chunk was published (latency); 0 unknown

    @property
    def n_samples(self) -> int:
        return int(np.shape(self.data)[-1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs

    def mdc_codes(self) -> list[int]:
        """IEEE 11073-10101 codes of what each lead carries, MDC_ECG_ELEC_POTL_<lead> (the
        lead's potential, as FHIR's and IHE's waveform observations name it: 131329 for
        lead I), 0 where a lead has none (arbitrary directions, unknown labels)."""
        return [_mdc(label) for label in self.leads]


# MDC_ECG_ELEC_POTL_x = MDC_ECG_LEAD_x + 256 (I: 2:1 → 2:257 = 131329; V1: 2:3 → 2:259)
MDC_ELEC_POTL_OFFSET = 256


def _mdc(label: str) -> int:
    try:
        code = resolve_view(label).mdc_code
    except ValueError:
        return 0
    return code + MDC_ELEC_POTL_OFFSET if code else 0


# ----------------------------------------------------------------------------- encode

def _check_chunk(chunk: Chunk) -> tuple[np.ndarray, list[str]]:
    """The chunk's data as float32 (L, N) and its quality list; ValueError for a malformed chunk."""
    data = np.asarray(chunk.data)
    if data.ndim != 2 or data.shape[0] != len(chunk.leads) or data.shape[1] == 0:
        raise ValueError(f"chunk data must be (n_leads={len(chunk.leads)}, n_samples>0), got {data.shape}")
    if len(chunk.leads) == 0 or len(chunk.leads) > 0xFFFF:
        raise ValueError(f"a chunk needs 1..65535 leads, got {len(chunk.leads)}")
    for label in chunk.leads:
        _check_label(label, ValueError)
    if len(set(chunk.leads)) != len(chunk.leads):
        raise ValueError(f"lead labels repeat: {chunk.leads}")
    quality = list(chunk.quality) if chunk.quality is not None else ["ok"] * len(chunk.leads)
    if len(quality) != len(chunk.leads) or any(q not in QUALITY for q in quality):
        raise ValueError(f"quality must give one of {QUALITY} per lead, got {chunk.quality}")
    if not (isinstance(chunk.seq, (int, np.integer)) and 0 <= chunk.seq < 2**32):
        raise ValueError(f"seq must lie in [0, 2**32), got {chunk.seq}")
    for name in ("t0_ns", "sent_ns"):
        value = getattr(chunk, name)
        if not (isinstance(value, (int, np.integer)) and _I64[0] <= value <= _I64[1]):
            raise ValueError(f"{name} must be an integer that fits a signed 64 bits, got {value!r}")
    if not (math.isfinite(chunk.fs) and chunk.fs > 0 and math.isfinite(np.float32(chunk.fs))):
        raise ValueError(f"fs must be a positive number of Hz that fits float32, got {chunk.fs}")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError("chunk data holds NaN or infinity; send zeros and mark the lead 'missing'")
    return data, quality


def _check_label(label, error):
    if not isinstance(label, str) or not label or not label.isprintable() or label != label.strip():
        raise error(f"lead label {label!r} must be non-empty printable text without outer spaces")
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        raise error(f"lead label {label!r} is longer than {MAX_LABEL_BYTES} UTF-8 bytes")


def encode(chunk: Chunk, sample_format: str = "int16", scale_mv: float | None = None) -> bytes:
    """The binary form. int16 stores round(mV / scale_mv) (default scale 0.001 mV, 1 µV per
    count), clips to the int16 range and marks clipped leads that were "ok" as "saturated";
    float32 stores the mV values themselves (bit-exact) and ignores scale_mv."""
    if sample_format not in ("int16", "float32"):
        raise ValueError(f"sample_format must be 'int16' or 'float32', got {sample_format!r}")
    data, quality = _check_chunk(chunk)
    is_float = sample_format == "float32"
    if is_float:
        scale = 1.0
        samples = data.T.astype("<f4")  # (N, L)
    else:
        scale = DEFAULT_SCALE_MV if scale_mv is None else float(scale_mv)
        if not (math.isfinite(scale) and scale > 0) or np.float32(scale) == 0:
            raise ValueError(f"scale_mv must be a positive number of mV per count, got {scale_mv}")
        counts = np.rint(data.astype(np.float64) / np.float64(np.float32(scale)))
        clipped = ((counts < -32768) | (counts > 32767)).any(axis=1)
        quality = ["saturated" if c and q == "ok" else q for c, q in zip(clipped, quality)]
        samples = np.clip(counts, -32768, 32767).T.astype("<i2")
    table = bytearray()
    for label, mdc, q in zip(chunk.leads, chunk.mdc_codes(), quality):
        raw = label.encode("utf-8")
        table += _LEAD.pack(mdc, QUALITY.index(q), len(raw)) + raw
    header_len = _HEADER.size + len(table)
    if header_len > 0xFFFF:
        raise ValueError("lead table too long for the u16 header length")
    n_leads, n_samples = data.shape
    header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, FLAG_FLOAT32 if is_float else 0, header_len,
                          chunk.seq, chunk.t0_ns, chunk.sent_ns, chunk.fs, scale, n_leads, n_samples)
    return header + bytes(table) + samples.tobytes()


# ----------------------------------------------------------------------------- decode

def decode(payload: bytes, limits: Limits = Limits()) -> Chunk:
    """A chunk from its binary form; ProtocolError (and nothing else) for anything malformed."""
    buf = memoryview(payload).cast("B")
    if len(buf) > limits.max_bytes:
        raise ProtocolError("too_large", f"chunk of {len(buf)} bytes exceeds the limit of {limits.max_bytes}")
    if len(buf) < _HEADER.size:
        raise ProtocolError("truncated", f"chunk of {len(buf)} bytes is shorter than the {_HEADER.size}-byte header")
    (magic, version, flags, header_len, seq, t0_ns, sent_ns, fs, scale,
     n_leads, n_samples) = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError("bad_magic", f"payload starts with {bytes(magic)!r}, not the chunk magic {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"chunk is protocol version {version}; this receiver supports "
                                       f"version {PROTOCOL_VERSION} only")
    if flags & ~FLAG_FLOAT32:
        raise ProtocolError("bad_header", f"unknown flag bits set: 0x{flags:02x}")
    if not (math.isfinite(fs) and limits.min_fs <= fs <= limits.max_fs):
        raise ProtocolError("bad_fs", f"sample rate {fs} Hz lies outside [{limits.min_fs:g}, {limits.max_fs:g}] Hz")
    if not (math.isfinite(scale) and scale > 0):
        raise ProtocolError("bad_header", f"scale_mv must be a positive finite number, got {scale}")
    if n_leads == 0 or n_samples == 0:
        raise ProtocolError("bad_header", f"chunk declares {n_leads} leads and {n_samples} samples; both must be > 0")
    if n_leads > limits.max_leads:
        raise ProtocolError("too_large", f"{n_leads} leads exceed the limit of {limits.max_leads}")
    if n_samples > limits.max_samples:
        raise ProtocolError("too_large", f"{n_samples} samples exceed the limit of {limits.max_samples} per chunk")
    if header_len < _HEADER.size:
        raise ProtocolError("bad_header", f"header length {header_len} is shorter than the fixed {_HEADER.size} bytes")
    if header_len > len(buf):
        raise ProtocolError("truncated", f"header length {header_len} runs past the {len(buf)}-byte payload")
    labels, quality = _read_lead_table(buf[:header_len], n_leads)
    dtype = _SAMPLE[bool(flags & FLAG_FLOAT32)]
    expected = n_samples * n_leads * dtype.itemsize
    if len(buf) - header_len != expected:
        raise ProtocolError("bad_length", f"{n_leads} leads x {n_samples} samples x {dtype.itemsize} bytes = "
                                          f"{expected} bytes of samples expected, {len(buf) - header_len} present")
    samples = np.frombuffer(buf, dtype=dtype, offset=header_len).reshape(n_samples, n_leads)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge scale overflows: caught below
        if dtype.kind == "i":  # counts x scale in float64, rounded once to float32
            data = (samples.T.astype(np.float64) * np.float64(scale)).astype(np.float32)  # (L, N)
        else:
            data = np.ascontiguousarray(samples.T, dtype=np.float32)  # (L, N)
            if scale != 1.0:
                data = data * np.float32(scale)
    if not np.isfinite(data).all():
        raise ProtocolError("non_finite", "chunk samples hold NaN or infinity")
    return Chunk(seq=seq, t0_ns=t0_ns, fs=float(fs), leads=labels, data=data, quality=quality, sent_ns=sent_ns)


def _read_lead_table(table: memoryview, n_leads: int) -> tuple[list[str], list[str]]:
    labels, quality, pos = [], [], _HEADER.size
    for i in range(n_leads):
        if pos + _LEAD.size > len(table):
            raise ProtocolError("bad_header", f"lead table ends inside entry {i} of {n_leads}")
        _mdc_code, q, size = _LEAD.unpack_from(table, pos)
        pos += _LEAD.size
        if q >= len(QUALITY):
            raise ProtocolError("bad_header", f"lead {i} has unknown quality code {q}")
        if size == 0 or size > MAX_LABEL_BYTES:
            raise ProtocolError("bad_label", f"lead {i} label is {size} bytes; labels are 1..{MAX_LABEL_BYTES} bytes")
        if pos + size > len(table):
            raise ProtocolError("bad_header", f"lead table ends inside the label of lead {i}")
        try:
            label = bytes(table[pos:pos + size]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_label", f"lead {i} label is not valid UTF-8") from None
        _check_label(label, lambda msg: ProtocolError("bad_label", msg))
        pos += size
        if label in labels:
            raise ProtocolError("duplicate_lead", f"lead {label!r} appears more than once")
        labels.append(label)
        quality.append(QUALITY[q])
    if pos != len(table):
        raise ProtocolError("bad_header", f"header length says {len(table)} bytes but the lead table ends at {pos}")
    return labels, quality


# ----------------------------------------------------------------------------- JSON

def to_json(chunk: Chunk) -> bytes:
    """The debugging form: the same fields, samples as mV numbers per lead (float32 exact)."""
    data, quality = _check_chunk(chunk)
    doc = {"v": PROTOCOL_VERSION, "seq": chunk.seq, "t0_ns": chunk.t0_ns, "sent_ns": chunk.sent_ns,
           "fs": float(chunk.fs), "units": "mV",
           "leads": [{"label": label, "mdc": mdc, "quality": q}
                     for label, mdc, q in zip(chunk.leads, chunk.mdc_codes(), quality)],
           "data": data.astype(np.float64).tolist()}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _reject_constant(name):
    raise ProtocolError("non_finite", f"JSON chunk holds {name}; samples must be finite numbers")


def from_json(payload: bytes, limits: Limits = Limits()) -> Chunk:
    """A chunk from its JSON form; ProtocolError (and nothing else) for anything malformed."""
    if len(payload) > limits.max_bytes:
        raise ProtocolError("too_large", f"chunk of {len(payload)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        doc = json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError("bad_json", f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("bad_json", "JSON chunk must be an object")
    missing = {"v", "seq", "t0_ns", "fs", "leads", "data"} - doc.keys()
    if missing:
        raise ProtocolError("bad_json", f"JSON chunk lacks {', '.join(sorted(missing))}")
    if not _is_int(doc["v"]) or doc["v"] != PROTOCOL_VERSION:
        raise ProtocolError("version", f"chunk is protocol version {doc['v']!r}; this receiver supports "
                                       f"version {PROTOCOL_VERSION} only")
    if doc.get("units", "mV") != "mV":
        raise ProtocolError("bad_json", f"units must be 'mV', got {doc.get('units')!r}")
    seq, t0_ns, sent_ns = doc["seq"], doc["t0_ns"], doc.get("sent_ns", 0)
    for name, value, lo, hi in (("seq", seq, 0, 2**32 - 1), ("t0_ns", t0_ns, *_I64), ("sent_ns", sent_ns, *_I64)):
        if not _is_int(value) or not lo <= value <= hi:
            raise ProtocolError("bad_json", f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    fs = doc["fs"]
    if not _is_number(fs):
        raise ProtocolError("bad_json", f"fs must be a number of Hz, got {fs!r}")
    if not limits.min_fs <= fs <= limits.max_fs:
        raise ProtocolError("bad_fs", f"sample rate {fs!r} Hz lies outside [{limits.min_fs:g}, {limits.max_fs:g}] Hz")
    leads, data = doc["leads"], doc["data"]
    if not isinstance(leads, list) or not leads:
        raise ProtocolError("bad_json", "leads must be a non-empty list")
    if len(leads) > limits.max_leads:
        raise ProtocolError("too_large", f"{len(leads)} leads exceed the limit of {limits.max_leads}")
    labels, quality = [], []
    for i, lead in enumerate(leads):
        if not isinstance(lead, dict) or "label" not in lead:
            raise ProtocolError("bad_json", f"lead {i} must be an object with a label")
        label, q = lead["label"], lead.get("quality", "ok")
        _check_label(label, lambda msg: ProtocolError("bad_label", msg))
        if label in labels:
            raise ProtocolError("duplicate_lead", f"lead {label!r} appears more than once")
        if q not in QUALITY:
            raise ProtocolError("bad_json", f"lead {label!r} quality {q!r} is not one of {QUALITY}")
        labels.append(label)
        quality.append(q)
    if not isinstance(data, list) or len(data) != len(labels) or not all(isinstance(r, list) for r in data):
        raise ProtocolError("bad_length", f"data must be {len(labels)} lists, one per lead")
    n = len(data[0])
    if n == 0 or any(len(r) != n for r in data):
        raise ProtocolError("bad_length", "every lead needs the same, non-zero number of samples")
    if n > limits.max_samples:
        raise ProtocolError("too_large", f"{n} samples exceed the limit of {limits.max_samples} per chunk")
    if not all(_is_number(x) for r in data for x in r):
        raise ProtocolError("bad_json", "samples must be numbers")
    try:
        with np.errstate(over="ignore"):
            arr = np.array(data, dtype=np.float64).astype(np.float32)
    except OverflowError:
        arr = np.array([np.inf], dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ProtocolError("non_finite", "samples must be finite numbers that fit float32")
    return Chunk(seq=seq, t0_ns=t0_ns, fs=float(fs), leads=labels, data=arr, quality=quality, sent_ns=sent_ns)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def decode_any(payload: bytes, limits: Limits = Limits()) -> Chunk:
    """JSON when the payload starts with b"{", the binary form otherwise."""
    return from_json(payload, limits) if bytes(payload[:1]) == b"{" else decode(payload, limits)
