"""The wire protocol: round trips, every error code, fuzzed payloads, topics, views requests."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from edge import protocol as P
from edge.protocol import CODES, Chunk, Limits, ProtocolError
from edge.topics import STREAM_KINDS, Topics, parse_views_request

LEADS = ["I", "II", "V1", "V4R", "120:45"]


def make_chunk(n_leads=5, n=125, seed=0, scale=1.0) -> Chunk:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((n_leads, n)) * scale).astype(np.float32)  # (L, N) mV
    return Chunk(seq=7, t0_ns=1_700_000_000_123_456_789, fs=500.0, leads=LEADS[:n_leads], data=data,
                 sent_ns=1_700_000_000_200_000_000)


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    assert str(info.value)  # always a sentence for a person
    return info.value.code


def patched(payload: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(payload)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# ----------------------------------------------------------------------------- round trips

def test_float32_round_trip_is_bit_exact():
    c = make_chunk()
    c.data[0, :3] = [np.float32(1e-30), np.float32(-0.0), np.float32(3.4e38)]
    d = P.decode(P.encode(c, "float32"))
    assert d.data.dtype == np.float32 and d.data.shape == (5, 125)
    assert d.data.tobytes() == c.data.tobytes()
    assert (d.seq, d.t0_ns, d.sent_ns, d.fs, d.leads) == (c.seq, c.t0_ns, c.sent_ns, c.fs, c.leads)
    assert d.quality == ["ok"] * 5


@pytest.mark.parametrize("scale", [0.001, 0.0025, 0.004882812])
def test_int16_round_trip_within_half_a_count(scale):
    c = make_chunk(scale=2.0)
    d = P.decode(P.encode(c, "int16", scale_mv=scale))
    s = np.float32(scale)
    err = np.abs(d.data.astype(np.float64) - c.data)
    assert err.max() <= s / 2 + 1e-6 * np.abs(c.data).max()
    assert d.quality == ["ok"] * 5


def test_int16_default_scale_is_one_microvolt_and_rounds_to_nearest():
    c = make_chunk(n_leads=1, n=4)
    c.data[0] = [0.0014, 0.0016, -0.0026, 1.0]  # mV
    payload = P.encode(c)
    counts = np.frombuffer(payload[-8:], dtype="<i2")
    assert counts.tolist() == [1, 2, -3, 1000]
    assert struct.unpack_from("<f", payload, 32)[0] == np.float32(0.001)


def test_int16_clipping_marks_the_lead_saturated():
    c = make_chunk(n_leads=3)
    c.quality = ["ok", "ok", "missing"]
    c.data[1, 10] = 40.0  # 40 mV at 1 µV per count is beyond int16
    c.data[2, 10] = -40.0
    d = P.decode(P.encode(c))
    assert d.quality == ["ok", "saturated", "missing"]
    assert d.data[1, 10] == pytest.approx(32.767)
    assert d.data[2, 10] == pytest.approx(-32.768)
    assert c.quality == ["ok", "ok", "missing"]  # the caller's chunk is untouched
    assert P.decode(P.encode(c, scale_mv=0.01)).quality == ["ok", "ok", "missing"]


def test_json_round_trip_is_exact_and_has_the_documented_fields():
    c = make_chunk()
    c.quality = ["ok", "flat", "saturated", "missing", "masked"]
    doc = json.loads(P.to_json(c))
    assert set(doc) == {"v", "seq", "t0_ns", "sent_ns", "fs", "units", "leads", "data"}
    assert doc["v"] == 1 and doc["units"] == "mV"
    assert doc["leads"][0] == {"label": "I", "mdc": 131329, "quality": "ok"}
    assert len(doc["data"]) == 5 and len(doc["data"][0]) == 125
    d = P.from_json(P.to_json(c))
    assert d.data.tobytes() == c.data.tobytes() and d.quality == c.quality
    assert P.decode_any(P.to_json(c)).leads == LEADS
    assert P.decode_any(P.encode(c)).leads == LEADS


def test_mdc_codes_are_lead_potentials():
    c = make_chunk()
    # MDC_ECG_ELEC_POTL_I, _II, _V1, _V4R; nothing for an arbitrary direction
    assert c.mdc_codes() == [131329, 131330, 131331, 131340, 0]
    payload = P.encode(c)
    assert struct.unpack_from("<I", payload, 42)[0] == 131329


def test_layout_matches_the_documentation():
    c = make_chunk(n_leads=2, n=3)
    b = P.encode(c, "float32")
    assert b[:4] == b"ECGP" and b[4] == 1 and b[5] == 1
    header_len = struct.unpack_from("<H", b, 6)[0]
    assert header_len == 42 + (6 + 1) + (6 + 2)
    seq, t0, sent, fs, scale, n_leads, n = struct.unpack_from("<IqqffHI", b, 8)
    assert (seq, t0, sent, fs, scale, n_leads, n) == (7, c.t0_ns, c.sent_ns, 500.0, 1.0, 2, 3)
    samples = np.frombuffer(b, "<f4", offset=header_len).reshape(3, 2)  # sample-major
    assert np.array_equal(samples.T, c.data)
    assert len(b) == header_len + 3 * 2 * 4


def test_chunk_properties():
    c = make_chunk(n=250)
    assert c.n_samples == 250 and c.duration_s == 0.5


def test_encode_rejects_malformed_chunks_as_value_errors():
    bad = [
        dict(data=np.zeros((4, 10), np.float32)),  # shape disagrees with leads
        dict(data=np.full((5, 10), np.nan, np.float32)),
        dict(leads=["I", "I", "V1", "V2", "V3"]),
        dict(leads=["I", "", "V1", "V2", "V3"]),
        dict(leads=["I", "x" * 33, "V1", "V2", "V3"]),
        dict(quality=["ok", "bad", "ok", "ok", "ok"]),
        dict(seq=2**32),
        dict(t0_ns=1.5),
        dict(fs=float("nan")),
    ]
    for change in bad:
        c = make_chunk()
        for k, v in change.items():
            setattr(c, k, v)
        with pytest.raises(ValueError):
            P.encode(c)
    with pytest.raises(ValueError, match="sample_format"):
        P.encode(make_chunk(), "int8")
    with pytest.raises(ValueError, match="scale_mv"):
        P.encode(make_chunk(), scale_mv=0)


# ----------------------------------------------------------------------------- every error code

def test_every_error_code_is_reachable():
    good = P.encode(make_chunk(), "float32")
    good16 = P.encode(make_chunk())
    seen = {
        code_of(P.decode, good[:20]),                                          # truncated
        code_of(P.decode, b"XXXX" + good[4:]),                                 # bad_magic
        code_of(P.decode, patched(good, 5, "<B", 3)),                          # bad_header
        code_of(P.decode, patched(good, 28, "<f", 10.0)),                      # bad_fs
        code_of(P.decode, good + b"\0\0\0\0"),                                 # bad_length
        code_of(P.decode, good, Limits(max_bytes=100)),                        # too_large
        code_of(P.decode, good[:-4] + struct.pack("<f", float("nan"))),        # non_finite
        code_of(P.decode, good.replace(b"\x02V1", b"\x02\xff\xfe")),           # bad_label
        code_of(P.decode, good.replace(b"\x02II", b"\x02V1")),                 # duplicate_lead
        code_of(P.from_json, b"{not json"),                                    # bad_json
        code_of(Topics().parse, "ecg/v1/bed1/p1/nope"),                        # bad_topic
        code_of(parse_views_request, b'{"views": ["V99"]}'),                 # bad_views
    }
    with pytest.raises(ProtocolError) as info:
        P.decode(patched(good16, 4, "<B", 2))
    assert info.value.code == "version"
    assert "version 2" in str(info.value) and "version 1 only" in str(info.value)
    assert seen | {"version"} == set(CODES)


@pytest.mark.parametrize("offset, fmt, value, code", [
    (6, "<H", 10, "bad_header"),          # header shorter than the fixed part
    (6, "<H", 60_000, "truncated"),       # header past the payload
    (6, "<H", 43, "bad_header"),          # lead table cut inside an entry
    (6, "<H", 100, "bad_header"),         # lead table shorter than the header says
    (28, "<f", float("inf"), "bad_fs"),
    (28, "<f", 6000.0, "bad_fs"),
    (32, "<f", 0.0, "bad_header"),
    (32, "<f", -1.0, "bad_header"),
    (32, "<f", float("nan"), "bad_header"),
    (32, "<f", 3e38, "non_finite"),       # counts x scale overflows float32
    (36, "<H", 0, "bad_header"),
    (36, "<H", 33, "too_large"),
    (40 - 2, "<I", 0, "bad_header"),
    (38, "<I", 9000, "too_large"),
    (38, "<I", 124, "bad_length"),
    (42 + 4, "<B", 9, "bad_header"),      # unknown quality code
    (42 + 5, "<B", 0, "bad_label"),       # empty label
    (42 + 5, "<B", 33, "bad_label"),      # label longer than 32 bytes
])
def test_header_fields_are_checked(offset, fmt, value, code):
    assert code_of(P.decode, patched(P.encode(make_chunk()), offset, fmt, value)) == code


def test_json_errors():
    good = json.loads(P.to_json(make_chunk(n_leads=2, n=4)))

    def variant(**change):
        doc = dict(good, **change)
        return json.dumps(doc).encode()

    cases = [
        (b"[1, 2]", "bad_json"),
        (b"\xff{", "bad_json"),
        (b"{" * 100_000, "bad_json"),
        (variant(v=2), "version"),
        (variant(v="1"), "version"),
        (variant(units="uV"), "bad_json"),
        (variant(seq=-1), "bad_json"),
        (variant(seq=True), "bad_json"),
        (variant(t0_ns=2**63), "bad_json"),
        (variant(fs=20), "bad_fs"),
        (variant(fs="500"), "bad_json"),
        (variant(leads=[]), "bad_json"),
        (variant(leads=["I", "II"]), "bad_json"),
        (variant(leads=[{"label": "I"}, {"label": "I"}]), "duplicate_lead"),
        (variant(leads=[{"label": "I"}, {"label": 3}]), "bad_label"),
        (variant(leads=[{"label": "I"}, {"label": "II", "quality": "good"}]), "bad_json"),
        (variant(leads=[{"label": str(i)} for i in range(33)]), "too_large"),
        (variant(data=[[1, 2, 3, 4]]), "bad_length"),
        (variant(data=[[1, 2, 3, 4], [1, 2, 3]]), "bad_length"),
        (variant(data=[[], []]), "bad_length"),
        (variant(data=[["1", 2, 3, 4], [1, 2, 3, 4]]), "bad_json"),
        (variant(data=[[1e39, 2, 3, 4], [1, 2, 3, 4]]), "non_finite"),
        (variant(data=[[10**400, 2, 3, 4], [1, 2, 3, 4]]), "non_finite"),
        (variant(data=[[0] * 9000, [0] * 9000]), "too_large"),
        (json.dumps(dict(good, data=[[float("nan"), 2, 3, 4], [1, 2, 3, 4]])).encode(), "non_finite"),
    ]
    for payload, code in cases:
        assert code_of(P.from_json, payload) == code, payload[:80]
    missing = dict(good)
    del missing["t0_ns"]
    assert code_of(P.from_json, json.dumps(missing).encode()) == "bad_json"
    assert P.from_json(variant(sent_ns=0, units="mV")).sent_ns == 0


def test_protocol_error_pickles_with_its_code():
    err = pickle.loads(pickle.dumps(ProtocolError("bad_fs", "too slow")))
    assert err.code == "bad_fs" and str(err) == "too slow"


# ----------------------------------------------------------------------------- fuzzing

def _decode_or_protocol_error(fn, payload):
    try:
        fn(payload)
    except ProtocolError as exc:
        assert exc.code in CODES
    # anything else propagates and fails the test


def test_fuzz_random_bytes_raise_only_protocol_errors():
    rng = np.random.default_rng(1234)
    for _ in range(3000):
        n = int(rng.integers(0, 300))
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if rng.random() < 0.5:  # get past the magic and version checks too
            payload = b"ECGP\x01" + payload
        _decode_or_protocol_error(P.decode, payload)
        _decode_or_protocol_error(P.decode_any, payload)
        _decode_or_protocol_error(P.from_json, b"{" + payload)
        _decode_or_protocol_error(parse_views_request, payload)


def test_fuzz_truncated_and_mutated_chunks_raise_only_protocol_errors():
    rng = np.random.default_rng(99)
    payloads = [P.encode(make_chunk(seed=s), f) for s in range(3) for f in ("int16", "float32")]
    payloads += [P.to_json(make_chunk(n_leads=2, n=5, seed=s)) for s in range(3)]
    for payload in payloads:
        for cut in range(len(payload)):  # every truncation
            if payload[:1] == b"{":
                _decode_or_protocol_error(P.from_json, payload[:cut])
            else:
                _decode_or_protocol_error(P.decode, payload[:cut])
        for _ in range(400):  # a few random bytes flipped, mostly in the header
            b = bytearray(payload)
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(0, min(len(b), 120) if rng.random() < 0.8 else len(b)))
                b[i] = int(rng.integers(0, 256))
            _decode_or_protocol_error(P.decode_any, bytes(b))


# ----------------------------------------------------------------------------- views requests

def test_views_request():
    assert parse_views_request(b'{"views": ["V7", "v8", "120:45"]}') == ["V7", "V8", "120:45"]
    assert parse_views_request(b"") == []
    assert parse_views_request(b'{"views": []}') == []
    bad = [b"V7,V8", b'{"views": "V7"}', b'{"views": ["V7", "V7"]}', b'{"views": ["V7"], "x": 1}',
           b'{"views": [7]}', b'{"views": ["200:0"]}', b'["V7"]', b"\xff",
           json.dumps({"views": [f"{i}:0" for i in range(33)]}).encode(),
           json.dumps({"views": ["1.00000000000000000000000000001:0"]}).encode(),
           b" " * 5000]
    for payload in bad:
        assert code_of(parse_views_request, payload) == "bad_views", payload[:40]


# ----------------------------------------------------------------------------- topics

def test_topics_build_and_parse():
    t = Topics()
    assert t.raw("bed1", "p1") == "ecg/v1/bed1/p1/raw"
    assert t.virtual("bed1", "p1") == "ecg/v1/bed1/p1/virtual"
    assert t.views("bed1", "p1") == "ecg/v1/bed1/p1/views"
    assert t.calibration("bed1", "p1") == "ecg/v1/bed1/p1/calibration"
    assert t.status("bed1", "p1") == "ecg/v1/bed1/p1/status"
    assert t.daemon_status("edge-1") == "ecg/v1/_daemon/edge-1/status"
    assert t.health("edge-1") == "ecg/v1/_daemon/edge-1/health"
    assert t.errors("edge-1") == "ecg/v1/_daemon/edge-1/errors"
    assert t.pattern("raw") == "ecg/v1/+/+/raw"
    for kind in STREAM_KINDS:
        assert t.parse(getattr(t, kind)("ICU-3.bed_12", "p-0042")) == ("ICU-3.bed_12", "p-0042", kind)
    assert Topics("site/a").parse("site/a/m/p/raw") == ("m", "p", "raw")


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "_daemon", "x" * 65, "bed 1", "é", ".", "..", ".x", 3])
def test_topic_builders_refuse_bad_ids(bad_id):
    with pytest.raises(ValueError):
        Topics().raw(bad_id, "p1")
    with pytest.raises(ValueError):
        Topics().raw("m1", bad_id)
    if bad_id != "_daemon":
        with pytest.raises(ValueError):
            Topics().health(bad_id)


@pytest.mark.parametrize("topic", [
    "ecg/v1/bed1/p1", "ecg/v1/bed1/p1/raw/extra", "ecg/v2/bed1/p1/raw", "ecg/v1/+/p1/raw",
    "ecg/v1/bed1/#", "ecg/v1/_daemon/edge-1/status", "ecg/v1/bed1/p1/health", "ecg/v1//p1/raw",
    "ecg/v1/bed 1/p1/raw", "ecg/v1/../p1/raw", "ecg/v1bed1/p1/raw", "", None,
])
def test_topic_parse_refuses(topic):
    assert code_of(Topics().parse, topic) == "bad_topic"


@pytest.mark.parametrize("prefix", ["", "/ecg", "ecg/", "ecg//v1", "ecg/+", "ecg/#"])
def test_topic_prefix_is_checked(prefix):
    with pytest.raises(ValueError):
        Topics(prefix)
    with pytest.raises(ValueError):
        Topics().pattern("health")
