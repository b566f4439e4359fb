"""Signed update manifests for fleet device-calibration updates.

An update is one checkpoint (a Stage II device-calibrated model, or any model this code
reads) and a manifest that says what it is and whom it is for. The manifest is signed with
the fleet operator's Ed25519 key; a device holds only the public key and trusts nothing
the key did not sign (the scheme hawkBit, Mender, AWS IoT Jobs and TUF agree on):

    {"manifest": {...}, "signature": base64(Ed25519(canonical JSON of manifest)), "key_id": ...}

    manifest = {
      "schema": "panorama-fleet-update/1",
      "version": 7,                              only ever increases (a lower one is a rollback attack)
      "created": "...Z", "expires": "...Z",      an expired manifest is refused (a freeze attack)
      "target": {"groups": ["canary", "ward-3"], "device_models": ["monitor-x"], "checkpoint_format": "1"},
      "artifact": {"name": "model.safetensors", "size": N, "sha256": file hash,
                   "model_sha256": the checkpoint's own content hash,
                   "chunk_bytes": 65536, "chunks": [sha256 of each]},   absent: one message
      "golden": {...},                           what the model must draw on a fixed recording
      "notes": "..."}

The golden check is the device's dry-run: before an update is installed, the device loads
the checkpoint and draws four views of a fixed synthetic recording, which must match what
the operator's machine drew at packing time within ``tolerance_uv``. A checkpoint that loads
but computes something else on this device's code (another model revision, a broken
kernel) is refused there, not found out at a patient's bedside.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from panorama import checkpoint
from panorama.errors import UpdateError
from panorama.files import file_sha256
from panorama.geometry import STANDARD_12, resolve_views, unit_vector
from panorama.records import MODEL_FS

from .topics import CHUNK_BYTES, MIN_CHUNK_BYTES, check_group, is_sha256

SCHEMA = "panorama-fleet-update/1"  # the artifact in one message
SCHEMA_CHUNKED = "panorama-fleet-update/2"  # in chunks: an agent that reads only /1 refuses it (REJECTED, the
SCHEMAS = (SCHEMA, SCHEMA_CHUNKED)          # version not used up) rather than waiting for a file never sent whole
ARTIFACT_NAME = "model.safetensors"
GOLDEN_INPUTS = ["I", "II", "V3"]
GOLDEN_VIEWS = ["V2", "V7", "V4R", "120:45"]
GOLDEN_SECONDS, GOLDEN_EVERY = 2.0, 10  # 2 s drawn, every 10th sample kept: 4 × 100 values
MAX_EXPIRY_DAYS = 3650  # a manifest that never expires could be replayed to a device forever
GOLDEN_TOLERANCE_UV = 5.0  # float32 on another CPU or CUDA differs by ~0.01 µV; a different model by far more


# ----------------------------------------------------------------------------- keys

def generate_keys(folder: Path) -> tuple[Path, Path]:
    """An Ed25519 key pair in ``folder``: ``fleet.key`` (private, mode 0600: the operator's
    alone) and ``fleet.pub`` (install it on every device). Refuses to overwrite a key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "fleet.key", folder / "fleet.pub"
    for p in (private, public):
        if p.exists():
            raise UpdateError(f"{p} exists: a new key would orphan every device that trusts the old one; "
                              "choose another folder")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _load_key(path: Path, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UpdateError(f"cannot read key {path}: {exc.strerror}") from exc
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise UpdateError(f"{path} is not a PEM {'private' if private else 'public'} key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise UpdateError(f"{path} is not an Ed25519 key")
    return key


_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def trusted_keys(path: Path) -> dict:
    """The Ed25519 public keys in ``path`` by key id: one PEM key, or several one after the
    other (a trust file, for rotating the signing key: devices trust the old and the new key
    while updates move from one to the other). UpdateError for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UpdateError(f"cannot read key {path}: {exc.strerror}") from exc
    if b"PRIVATE KEY" in data:
        raise UpdateError(f"{path} holds a private key where a public key is wanted (fleet.pub, not fleet.key); "
                          "a private key never belongs on a device: one that was copied to one is leaked")
    blocks = _PEM_PUBLIC.findall(data)
    if not blocks:
        raise UpdateError(f"{path} holds no PEM public key")
    rest = _PEM_PUBLIC.sub(b"\n", data)
    if rest.strip():  # a damaged block would otherwise be skipped, and its key silently not trusted
        line = rest.lstrip().split(b"\n", 1)[0]
        where = data.find(line) if line else -1
        lineno = data.count(b"\n", 0, where) + 1
        at = f" at line {lineno}" if where >= 0 else ""
        raise UpdateError(f"{path} holds something besides whole PEM public keys{at} (a damaged or cut key?); "
                          "its content is not shown, as it may be secret")
    keys = {}
    for i, block in enumerate(blocks, 1):
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, TypeError) as exc:
            raise UpdateError(f"{path}: public key {i} is not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise UpdateError(f"{path}: public key {i} is not an Ed25519 key")
        keys[key_id(key)] = key
    return keys


def key_id(public_key) -> str:
    """The first 16 hex digits of the sha256 of the raw public key: names which key signed."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ----------------------------------------------------------------------------- manifests

def canonical(manifest: dict) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII (every value is a string,
    an integer or a list of them, so parsing and re-serialising gives the same bytes)."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _utc(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s) -> datetime:
    try:
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        raise UpdateError(f"time {s!r} is not YYYY-MM-DDTHH:MM:SSZ") from None


def build(model_path: Path, version: int, groups: list[str], device_models: list[str], expires_days: float = 30.0,
          notes: str = "", now: datetime | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """The manifest of ``model_path``: hashes, target, expiry and its golden outputs; the
    artifact split into chunks of ``chunk_bytes`` (0: sent as one message)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be a whole number ≥ 1, got {version!r}")
    if not device_models or not all(isinstance(m, str) and m.strip() for m in device_models):
        raise ValueError("name at least one device model the update is for (--device-model)")
    if not 0 < expires_days <= MAX_EXPIRY_DAYS:
        raise ValueError(f"expiry must be more than 0 and at most {MAX_EXPIRY_DAYS} days from now, "
                         f"got {expires_days} days")
    if chunk_bytes != 0 and not (isinstance(chunk_bytes, int) and chunk_bytes >= MIN_CHUNK_BYTES):
        raise ValueError(f"chunks must be at least {MIN_CHUNK_BYTES >> 10} KiB (or 0: the whole file in one "
                         f"message), got {chunk_bytes / 1024:g} KiB")
    if not groups:
        raise ValueError("name at least one group the update is for (--group)")
    for g in groups:
        check_group(g)
    model, meta = checkpoint.load(model_path)  # a clear CheckpointError for anything unreadable
    now = now or datetime.now(timezone.utc)
    data = Path(model_path).read_bytes()
    chunked = {} if not chunk_bytes else {
        "chunk_bytes": chunk_bytes,
        "chunks": [hashlib.sha256(data[i:i + chunk_bytes]).hexdigest() for i in range(0, len(data), chunk_bytes)]}
    return {
        "schema": SCHEMA_CHUNKED if chunked else SCHEMA, "version": version, "created": _utc(now),
        "expires": _utc(now + timedelta(days=expires_days)),
        "target": {"groups": sorted(set(groups)), "device_models": sorted(set(m.strip() for m in device_models)),
                   "checkpoint_format": checkpoint.FORMAT_VERSION},
        "artifact": {"name": ARTIFACT_NAME, "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "model_sha256": meta["sha256"],
                     "stage": str(meta.get("stage", "")), "device": str(meta.get("device", "")),
                     "calibrated_for": str(meta.get("device_id") or ""),  # the recording device (Stage II)
                     "validation_psnr_db": checkpoint.val_psnr(meta), **chunked},
        "golden": golden(model, meta),
        "notes": notes,
    }


def sign(manifest: dict, private_key_path: Path) -> bytes:
    """The signed envelope, as the bytes to publish."""
    key = _load_key(private_key_path, private=True)
    sig = key.sign(canonical(manifest))
    doc = {"manifest": manifest, "signature": base64.b64encode(sig).decode(), "key_id": key_id(key.public_key())}
    return json.dumps(doc, indent=1).encode()


def verify(envelope: bytes, public_key_path: Path) -> dict:
    """The manifest inside ``envelope`` if the trusted key signed it; UpdateError otherwise."""
    from cryptography.exceptions import InvalidSignature

    keys = trusted_keys(public_key_path)
    try:
        doc = json.loads(bytes(envelope).decode("utf-8"))
        manifest, sig = doc["manifest"], base64.b64decode(doc["signature"], validate=True)
        if not isinstance(manifest, dict):
            raise TypeError("manifest is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UpdateError(f"not a signed manifest envelope: {exc}") from None
    claimed = doc.get("key_id")
    # the key the envelope names, if trusted; else each trusted key (the key id is not signed)
    candidates = [keys[claimed]] if isinstance(claimed, str) and claimed in keys else list(keys.values())
    for key in candidates:
        try:
            key.verify(sig, canonical(manifest))
            break
        except InvalidSignature:
            continue
    else:
        trusted = ", ".join(keys)
        raise UpdateError(f"signature does not verify with the trusted key{'s' if len(keys) > 1 else ''} {trusted} "
                          f"(signed by key {claimed!r}, or altered after signing)") from None
    if manifest.get("schema") not in SCHEMAS:
        readable = " and ".join(map(repr, SCHEMAS))
        raise UpdateError(f"manifest schema {manifest.get('schema')!r}, this code reads {readable}")
    return manifest


def check_applicable(manifest: dict, group: str, device_model: str, newest_seen: int,
                     now: datetime | None = None) -> None:
    """Refuse a manifest that is not newer than ``newest_seen``, expired, or for someone else."""
    try:
        version, target, art = manifest["version"], manifest["target"], manifest["artifact"]
        expires = parse_time(manifest["expires"])
        models, fmt, groups = target["device_models"], target["checkpoint_format"], target["groups"]
        size, digest = int(art["size"]), str(art["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateError(f"manifest lacks or garbles a field: {exc}") from None
    if not isinstance(version, int) or version <= newest_seen:
        raise UpdateError(f"version {version} is not newer than {newest_seen}, the newest this device has "
                          "seen: refused (a replayed or rolled-back manifest)")
    if (now or datetime.now(timezone.utc)) >= expires:
        raise UpdateError(f"manifest expired at {manifest['expires']}")
    if group not in groups:
        raise UpdateError(f"manifest is for groups {groups}, this device is in {group!r}")
    if device_model not in models:
        raise UpdateError(f"manifest is for device models {models}, this device is {device_model!r}")
    if fmt != checkpoint.FORMAT_VERSION:
        raise UpdateError(f"checkpoint format {fmt!r}; this code reads {checkpoint.FORMAT_VERSION!r}")
    if size <= 0 or not is_sha256(digest):
        raise UpdateError("manifest's artifact has no size or no sha256 (64 lower-case hex digits)")
    chunk_plan(art)
    if chunked(art) != (manifest.get("schema") == SCHEMA_CHUNKED):
        raise UpdateError(f"manifest schema {manifest.get('schema')!r} does not match how its artifact travels "
                          f"({'in chunks' if chunked(art) else 'in one message'})")


def chunked(art: dict) -> bool:
    """Whether the manifest's artifact travels in chunks (else in one message)."""
    return "chunks" in art or "chunk_bytes" in art


def chunk_plan(art: dict) -> list[tuple[str | None, int]]:
    """How the manifest's artifact travels: (sha256, size) of each message, in order; one
    message with no hash of its own where the manifest names no chunks (the whole file's
    hash is checked once it is on disk). UpdateError for a plan that does not add up."""
    size = int(art["size"])
    if not chunked(art):
        return [(None, size)]
    n, hashes = art.get("chunk_bytes"), art.get("chunks")
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= MIN_CHUNK_BYTES and isinstance(hashes, list)
            and len(hashes) == -(-size // n) and all(is_sha256(h) for h in hashes)):
        count = len(hashes) if isinstance(hashes, list) else "no list of"
        raise UpdateError(f"manifest's artifact chunks do not add up: {count} hashes for {size} bytes in chunks "
                          f"of {n!r} bytes (at least {MIN_CHUNK_BYTES} each)")
    return [(h, min(n, size - i * n)) for i, h in enumerate(hashes)]


def split(art: dict, data: bytes) -> list[bytes]:
    """``data`` cut as the manifest's artifact travels (see ``chunk_plan``), each piece
    checked against the hash the manifest signed for it."""
    plan = chunk_plan(art)
    if len(data) != int(art["size"]):
        raise UpdateError(f"artifact is {len(data)} bytes, the manifest says {art['size']}")
    out, at = [], 0
    for i, (digest, n) in enumerate(plan):
        piece = data[at:at + n]
        if digest is not None and hashlib.sha256(piece).hexdigest() != digest:
            raise UpdateError(f"chunk {i} of the artifact differs from the hash its manifest signed")
        out.append(piece)
        at += n
    return out


def check_artifact(manifest: dict, path: Path) -> None:
    """The downloaded file is the one the manifest signed: size, then sha256."""
    art = manifest["artifact"]
    size = Path(path).stat().st_size
    if size != int(art["size"]):
        raise UpdateError(f"artifact is {size} bytes, the manifest says {art['size']}")
    digest = file_sha256(path)
    if digest != art["sha256"]:
        raise UpdateError(f"artifact sha256 {digest[:16]}… differs from the manifest's {art['sha256'][:16]}…")


# ----------------------------------------------------------------------------- golden dry-run

def golden_recording(seconds: float = GOLDEN_SECONDS) -> np.ndarray:
    """A fixed 12-lead recording (a heart vector turning through a beat-like cycle, seen
    along each lead's direction), (12, samples) mV: the same on every machine."""
    t = np.arange(int(round(seconds * MODEL_FS))) / MODEL_FS
    beat = 2 * np.pi * 1.2 * t
    qrs = np.exp(-((t % (1 / 1.2)) - 0.3) ** 2 / (2 * 0.012 ** 2))  # a narrow spike per beat
    heart = np.stack([np.sin(beat) + 1.2 * qrs, np.sin(2 * beat + 0.7) - 0.6 * qrs, 0.5 * np.cos(3 * beat)])
    views = resolve_views(list(STANDARD_12))
    return (np.stack([unit_vector(v.theta, v.phi) for v in views]) @ heart).astype(np.float32)


def _draw(model, meta) -> np.ndarray:
    from panorama.synth import Synthesizer

    x = golden_recording()
    names = list(STANDARD_12)
    rows = [names.index(n) for n in GOLDEN_INPUTS]
    out = Synthesizer(model, meta, "cpu")(x[rows], resolve_views(GOLDEN_INPUTS), resolve_views(GOLDEN_VIEWS))
    return out[:, ::GOLDEN_EVERY] * 1000.0  # µV


def golden(model, meta) -> dict:
    """The golden block of a manifest: the views drawn from the fixed recording, in 0.1 µV."""
    uv = _draw(model, meta)
    if not np.isfinite(uv).all():
        raise UpdateError("the model draws non-finite views of the golden recording (NaN weights?): not packed")
    return {"inputs": GOLDEN_INPUTS, "views": GOLDEN_VIEWS, "seconds": str(GOLDEN_SECONDS),
            "every": GOLDEN_EVERY, "tolerance_uv": str(GOLDEN_TOLERANCE_UV),
            "output_tenth_uv": np.round(uv * 10).astype(int).tolist()}


def dry_run(manifest: dict, path: Path) -> float:
    """Load the checkpoint and draw the golden views; their largest difference from the
    manifest's in µV. UpdateError when the file does not load, is another model than the
    manifest names, or draws other views."""
    from panorama.errors import CheckpointError

    try:
        model, meta = checkpoint.load(path)
    except CheckpointError as exc:
        raise UpdateError(f"dry-run: {exc}") from exc
    if meta["sha256"] != manifest["artifact"]["model_sha256"]:
        raise UpdateError("dry-run: the checkpoint's content hash is not the one the manifest names")
    g = manifest["golden"]
    if g.get("inputs") != GOLDEN_INPUTS or g.get("views") != GOLDEN_VIEWS or g.get("every") != GOLDEN_EVERY:
        raise UpdateError("dry-run: the manifest's golden block was made by another version of this code")
    want = np.asarray(g["output_tenth_uv"], dtype=np.float64) / 10
    got = _draw(model, meta)
    if want.shape != got.shape:
        raise UpdateError(f"dry-run: golden output of shape {want.shape}, the model draws {got.shape}")
    err = float(np.max(np.abs(got - want)))
    tol = float(g.get("tolerance_uv", GOLDEN_TOLERANCE_UV))
    if not err <= tol:
        raise UpdateError(f"dry-run: the model draws the golden views {err:.1f} µV away from the "
                          f"manifest's (tolerance {tol:g} µV)")
    return err
