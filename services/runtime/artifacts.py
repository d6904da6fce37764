"""The content-addressed artifact store: adapters, datasets, reports and base weights, named by sha256.

A blob lives at `<root>/sha256/<first two hex>/<digest>`; its URI is that full fsspec URL, so any
process (or a trainer on another machine reading s3://...) can fetch it without knowing the root,
and the name itself says which digest the content must have. A directory (a peft adapter, a base
model: safetensors plus json) is stored as one blob per file plus a manifest blob listing them;
the manifest's URI and digest stand for the directory.

Weights are accepted only as safetensors: pickle-based formats (.bin, .pt, .ckpt ...) run code on
load, so they are refused by suffix and by content, whatever name they come under.

A store reads only its own blobs. URIs arrive from outside (an `adapter.registered` event, a
registration request), and fsspec would open any of them: a local file (`file:///etc/passwd`),
another bucket, a chained cache URL. So every read first checks that the URI names a blob of this
store (same filesystem protocol, same root, `sha256/<xx>/<digest>` under it) and then reads it
through the store's own filesystem, never one built from the URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from services.runtime.errors import FlywheelError
from services.runtime.paths import PathOutsideRoot, under

if TYPE_CHECKING:
    from services.runtime.settings import FlywheelSettings

MANIFEST_FORMAT = "flywheel.directory/v1"
# Manifests are written with sorted keys, so they all begin alike; a cheap sniff before parsing.
MANIFEST_PREFIX = b'{"files":'
CHUNK = 4 * 1024 * 1024

# kind -> file suffixes it may be stored under. Weights are safetensors and nothing else.
KINDS: dict[str, tuple[str, ...]] = {
    "safetensors": (".safetensors",),
    "json": (".json",),
    "jsonl": (".jsonl",),
    "text": (".txt", ".md", ".jinja", ".html", ".csv"),
    "manifest": (),
}
# Where a blob lives below the store's root; the digest's first two hex digits name its folder.
BLOB_PATH = re.compile(r"sha256/([0-9a-f]{2})/(\1[0-9a-f]{62})")
REFUSED_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".pkl",
    ".pickle",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".npy",
    ".npz",
    ".joblib",
    ".gguf",
)


class ArtifactError(FlywheelError):
    """An artifact could not be stored or loaded."""


class ArtifactRejected(ArtifactError):
    """The content is of a refused kind (a pickle, a non-safetensors weight file) or malformed."""


class ArtifactOutsideStore(ArtifactRejected):
    """The URI names something other than a blob of the configured artifact store."""


class ArtifactIntegrityError(ArtifactError):
    """Stored content does not have the digest it was asked for: tampered or corrupt."""


class ArtifactNotFound(ArtifactError):
    """No artifact at that URI."""


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact is and what it must hash to."""

    uri: str
    sha256: str
    size: int


def digest_of_file(path: Path) -> str:
    """sha256 of a local file, read in chunks."""
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def kind_for(name: str) -> str:
    """The kind a file is stored as, from its name; refused names raise ArtifactRejected."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise ArtifactRejected(
            f"{name}: {suffix} files are refused; weights are stored as safetensors only (convert with safetensors.torch.save_file)"
        )
    for kind, suffixes in KINDS.items():
        if suffix in suffixes:
            return kind
    raise ArtifactRejected(
        f"{name}: unsupported file type {suffix or '(no suffix)'}; accepted: {', '.join(s for group in KINDS.values() for s in group)}"
    )


def check_content(head: bytes, kind: str, *, size: int, name: str = "artifact") -> None:
    """Refuse pickles and zip archives (torch.save) under any name, and malformed safetensors."""
    if kind not in KINDS:
        raise ArtifactRejected(f"{name}: unknown artifact kind {kind!r}; choose one of {', '.join(KINDS)}")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ArtifactRejected(f"{name}: content is a Python pickle; refused (store weights as safetensors)")
    if head[:4] == b"PK\x03\x04":
        raise ArtifactRejected(
            f"{name}: content is a zip archive (torch.save format); refused (store weights as safetensors)"
        )
    if kind == "safetensors":
        if size < 8:
            raise ArtifactRejected(f"{name}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > size - 8 or len(head) < 8 + min(header_len, 1):
            raise ArtifactRejected(f"{name}: not a safetensors file (header length {header_len} exceeds the file)")
        header = head[8 : 8 + header_len]
        if len(header) == header_len:
            try:
                parsed = json.loads(header)
            except ValueError:
                raise ArtifactRejected(f"{name}: not a safetensors file (header is not JSON)") from None
            if not isinstance(parsed, dict):
                raise ArtifactRejected(f"{name}: not a safetensors file (header is not a JSON object)")


class ArtifactStore:
    """Content-addressed blobs under `root`, a local directory or any fsspec URL (s3://bucket/prefix)."""

    def __init__(self, root: str | Path) -> None:
        root_text = str(root)
        self._fs, path = fsspec.core.url_to_fs(root_text)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._root = path.rstrip("/")
        self._protocols = (self._fs.protocol,) if isinstance(self._fs.protocol, str) else tuple(self._fs.protocol)
        self._protocol = "file" if self._local else self._protocols[0]

    @property
    def root(self) -> str:
        return self._url(self._root)

    def _url(self, path: str) -> str:
        return f"{self._protocol}://{path}" if not self._local else Path(path).as_uri()

    def _blob_path(self, digest: str) -> str:
        return f"{self._root}/sha256/{digest[:2]}/{digest}"

    def uri_for(self, digest: str) -> str:
        """The URI a blob with this digest has in this store."""
        return self._url(self._blob_path(digest))

    def locate(self, uri: str) -> str:
        """The path, on this store's filesystem, of the blob `uri` names; ArtifactOutsideStore for anything else."""
        refused = f"artifact URI {uri[:300]!r} is outside the artifact store {self.root}"
        if "::" in uri:
            raise ArtifactOutsideStore(f"{refused}: chained URLs are not accepted")
        protocol, _ = fsspec.core.split_protocol(uri)
        if (protocol or "file") not in self._protocols:
            raise ArtifactOutsideStore(f"{refused}: {protocol or 'file'}:// is not this store's filesystem")
        path = self._fs._strip_protocol(uri)  # noqa: SLF001 - fsspec's documented way to turn a URL into this filesystem's path
        root = self._root
        if self._local:
            # Resolved, so `..`, and symlinks planted in the store, are judged by where they lead.
            path, root = os.path.realpath(path), os.path.realpath(root)
        relative = path[len(root) + 1 :] if path.startswith(root + "/") else None
        if relative is None or not BLOB_PATH.fullmatch(relative):
            raise ArtifactOutsideStore(f"{refused}: only its own blobs (<root>/sha256/<xx>/<digest>) are read")
        return f"{self._root}/{relative}"

    def check(self, uri: str) -> None:
        """Refuse a URI that does not name a blob of this store, before it is remembered or passed on."""
        self.locate(uri)

    # ---------------------------------------------------------------------------------- write

    def put_bytes(self, data: bytes, *, kind: str) -> ArtifactRef:
        """Store bytes of a given kind; storing the same content twice is one blob."""
        check_content(data[: 1 << 20], kind, size=len(data))
        digest = hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if not self._fs.exists(path):
            if self._local:
                self._write_local_atomically(path, iter([data]))
            else:
                self._fs.pipe_file(path, data)
        return ArtifactRef(uri=self._url(path), sha256=digest, size=len(data))

    def put_file(self, path: str | Path) -> ArtifactRef:
        """Store one local file; its kind comes from its suffix (pickles and .bin weights are refused)."""
        source = Path(path)
        if not source.is_file():
            raise ArtifactNotFound(f"{source}: no such file")
        kind = kind_for(source.name)
        size = source.stat().st_size
        with source.open("rb") as handle:
            check_content(handle.read(1 << 20), kind, size=size, name=source.name)
        digest = digest_of_file(source)
        target = self._blob_path(digest)
        if not self._fs.exists(target):
            if self._local:
                self._write_local_atomically(target, _chunks(source))
            else:
                self._fs.put_file(str(source), target)
        return ArtifactRef(uri=self._url(target), sha256=digest, size=size)

    def put_directory(self, directory: str | Path) -> ArtifactRef:
        """Store every file of a directory (safetensors, json, text) and a manifest; the manifest's ref names the directory."""
        base = Path(directory)
        if not base.is_dir():
            raise ArtifactNotFound(f"{base}: no such directory")
        files = sorted(
            p
            for p in base.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)
        )
        if not files:
            raise ArtifactRejected(f"{base}: directory is empty")
        for file in files:  # refuse before storing anything, so a refused directory leaves no orphans
            kind_for(str(file.relative_to(base)))
        entries = {}
        for file in files:
            ref = self.put_file(file)
            entries[file.relative_to(base).as_posix()] = {"sha256": ref.sha256, "size": ref.size}
        manifest = json.dumps(
            {"format": MANIFEST_FORMAT, "files": entries}, sort_keys=True, separators=(",", ":")
        ).encode()
        return self.put_bytes(manifest, kind="manifest")

    def _write_local_atomically(self, path: str, chunks: Iterator[bytes]) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A reader never sees a half-written blob: write beside it, then rename into place.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------------------------------- read

    def get_bytes(self, uri: str | ArtifactRef, expected_sha256: str | None = None) -> bytes:
        """Read a blob and verify it against its digest; a mismatch raises ArtifactIntegrityError."""
        uri, expected = _expected(uri, expected_sha256)
        path = self.locate(uri)
        try:
            data: bytes = self._fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact at {uri}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ArtifactIntegrityError(
                f"artifact {uri} has sha256 {actual}, expected {expected}: tampered or corrupt; refusing to use it"
            )
        return data

    def materialize(
        self,
        ref_or_uri: str | ArtifactRef,
        expected_sha256: str | None = None,
        into_dir: str | Path = ".",
        *,
        name: str | None = None,
    ) -> Path:
        """Copy an artifact into a local directory, verifying every digest.

        A directory manifest materializes as its files under `into_dir` (returned); a single blob as
        `into_dir/<name or digest>` (returned). Nothing unverified is left behind on a mismatch.
        """
        uri, expected = _expected(ref_or_uri, expected_sha256)
        self.locate(uri)
        target_dir = Path(into_dir)
        target_dir.mkdir(parents=True, exist_ok=True)
        manifest = _as_manifest(self.get_bytes(uri, expected)) if self._head(uri).startswith(MANIFEST_PREFIX) else None
        if manifest is None:
            target = self._target(target_dir, name or expected, uri)
            self._copy_verified(uri, expected, target)
            return target
        for relative, entry in manifest["files"].items():
            target = self._target(target_dir, relative, uri)
            kind_for(relative)
            digest = entry["sha256"]
            self._copy_verified(self.uri_for(digest), digest, target)
        return target_dir

    def manifest(
        self, ref_or_uri: str | ArtifactRef, expected_sha256: str | None = None
    ) -> dict[str, dict[str, object]] | None:
        """The files of a directory artifact (path -> sha256, size), or None for a single blob."""
        uri, expected = _expected(ref_or_uri, expected_sha256)
        parsed = _as_manifest(self.get_bytes(uri, expected))
        return None if parsed is None else parsed["files"]

    def exists(self, ref_or_uri: str | ArtifactRef) -> bool:
        """Whether this store holds the blob; a URI outside the store raises ArtifactOutsideStore."""
        uri = ref_or_uri.uri if isinstance(ref_or_uri, ArtifactRef) else ref_or_uri
        return bool(self._fs.exists(self.locate(uri)))

    @staticmethod
    def _target(directory: Path, relative: str, uri: str) -> Path:
        try:
            return under(directory, relative)
        except PathOutsideRoot as error:
            raise ArtifactRejected(f"artifact {uri} names a path outside the target directory: {error}") from None

    def _head(self, uri: str) -> bytes:
        path = self.locate(uri)
        try:
            with self._fs.open(path, "rb") as handle:
                head: bytes = handle.read(len(MANIFEST_PREFIX))
                return head
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact at {uri}") from None

    def _copy_verified(self, uri: str, expected: str, target: Path) -> None:
        path = self.locate(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        sha = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, self._fs.open(path, "rb") as source:
                while chunk := source.read(CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
            if sha.hexdigest() != expected:
                raise ArtifactIntegrityError(
                    f"artifact {uri} has sha256 {sha.hexdigest()}, expected {expected}: tampered or corrupt; refusing to use it"
                )
            os.replace(tmp, target)
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact at {uri}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _expected(ref_or_uri: str | ArtifactRef, expected_sha256: str | None) -> tuple[str, str]:
    """The URI and the digest its content must have: the name is the digest, and a caller's expectation must agree."""
    expected: str | None
    if isinstance(ref_or_uri, ArtifactRef):
        uri, expected = ref_or_uri.uri, expected_sha256 or ref_or_uri.sha256
    else:
        uri, expected = ref_or_uri, expected_sha256
    named = uri.rstrip("/").rsplit("/", 1)[-1]
    if expected is None:
        expected = named
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ArtifactError(f"{expected!r} is not a sha256 hex digest (artifact {uri})")
    if named != expected:
        raise ArtifactIntegrityError(
            f"artifact {uri} is named for sha256 {named}, but {expected} was expected; refusing to use it"
        )
    return uri, expected


def _as_manifest(data: bytes) -> dict[str, Any] | None:
    if not data.startswith(MANIFEST_PREFIX):
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if isinstance(parsed, dict) and parsed.get("format") == MANIFEST_FORMAT and isinstance(parsed.get("files"), dict):
        return parsed
    return None


def default_artifact_root(home: Path) -> Path:
    """`<FLYWHEEL_HOME>/artifacts`, where the store lives unless a URL is configured."""
    return home / "artifacts"


def configured_artifact_store(settings: FlywheelSettings) -> ArtifactStore:
    """The one store of every service and command of a home: FLYWHEEL_ARTIFACT_ROOT, else `<FLYWHEEL_HOME>/artifacts`."""
    return ArtifactStore(settings.artifact_root or default_artifact_root(settings.home))
