"""The vision-engine cache: one folder per built artefact, keyed by everything that makes an engine valid.

Layout under the cache root (``TRT_CACHE_PATH``, default ``$RTP_MM_CACHE_DIR/trt`` = ``~/.cache/rtp_mm/trt``)::

    <model_type>-<backend>-<key digest[:16]>/
        manifest.json      # the key fields, the export report, the measured error, build time, file hashes
        vision.onnx        # always (fp32; the onnxruntime backend runs it, TensorRT parses it or its typed copy)
        vision.<prec>.onnx # the graph TensorRT parsed when the precision is not fp32 (strongly typed build)
        vision.engine      # the TensorRT plan (backend "tensorrt" only)

An engine is valid only for the exact TensorRT build, GPU model and compute capability, precision, batch profile, vision
weights and export code it was built with (TensorRT plans break silently across any of these: peers.md §2F).
``EngineKey`` holds all of them; the folder name is a digest of the whole key, so a lookup is an exact match and a
mismatched engine is never loaded. On a miss ``EngineCache.lookup`` compares the key with the cached manifests of the
same model type and says which fields changed, for the start-up log.

Entries are written into a temporary folder and renamed into place, so a crash mid-build leaves no half entry; the
manifest records the sha256 of every file, and a file that no longer matches makes the entry a miss ("corrupt").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
# Bump when the exported graph of any encoder changes meaning (export code, not weights): old entries stop matching.
EXPORT_FORMAT_VERSION = 1


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of the visual stack: name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything an artefact depends on. ``tensorrt_version``/``gpu_name``/``compute_capability`` are empty for the
    onnxruntime backend (its ONNX file runs anywhere)."""

    model_type: str
    backend: str  # "tensorrt" | "onnxruntime"
    weights_sha256: str
    pixel_shape: tuple[int, int, int]
    export_options: Mapping[str, Any]
    precision: str  # "fp32" | "fp16" | "bf16"
    batch_profile: tuple[int, int, int]  # min, opt, max
    tensorrt_version: str = ""
    gpu_name: str = ""
    compute_capability: str = ""
    export_format_version: int = EXPORT_FORMAT_VERSION

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["export_options"] = dict(self.export_options)
        d["pixel_shape"] = list(self.pixel_shape)
        d["batch_profile"] = list(self.batch_profile)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineKey:
        names = cls.__dataclass_fields__
        values = {k: v for k, v in d.items() if k in names}
        values["pixel_shape"] = tuple(values["pixel_shape"])
        values["batch_profile"] = tuple(values["batch_profile"])
        return cls(**values)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def folder_name(self) -> str:
        return f"{self.model_type}-{self.backend}-{self.digest()[:16]}"


def describe_changes(cached: EngineKey, now: EngineKey) -> list[str]:
    """Human-readable differences, e.g. "tensorrt_version '10.3.0' -> '10.5.0'" (the cached value first)."""
    old, new = cached.as_dict(), now.as_dict()
    changes = []
    for name in new:
        if old.get(name) != new[name]:
            if name == "weights_sha256":
                changes.append(f"vision weights changed (sha256 {old[name][:12]}… -> {new[name][:12]}…)")
            else:
                changes.append(f"{name} {old.get(name)!r} -> {new[name]!r}")
    return changes


@dataclass(frozen=True)
class Manifest:
    """One cache entry. ``files`` maps each file name in the entry's folder to its sha256."""

    key: EngineKey
    files: Mapping[str, str]
    export: Mapping[str, Any]  # the ONNX export report (size, export time, onnxruntime check per batch)
    measured: Mapping[str, Any] = field(default_factory=dict)  # backend vs eager torch: max_abs_err, cosine
    build_seconds: float = 0.0
    created: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.as_dict(),
            "files": dict(self.files),
            "export": dict(self.export),
            "measured": dict(self.measured),
            "build_seconds": self.build_seconds,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        return cls(
            key=EngineKey.from_dict(d["key"]),
            files=dict(d["files"]),
            export=dict(d.get("export", {})),
            measured=dict(d.get("measured", {})),
            build_seconds=float(d.get("build_seconds", 0.0)),
            created=str(d.get("created", "")),
        )


@dataclass(frozen=True)
class Lookup:
    """The cache's answer: ``folder``/``manifest`` on a hit; on a miss, ``reasons`` says why (for the log)."""

    folder: Path | None
    manifest: Manifest | None
    reasons: tuple[str, ...] = ()

    @property
    def hit(self) -> bool:
        return self.manifest is not None


class EngineCache:
    """Invariant: every folder under ``root`` named like an entry holds a complete entry (atomic rename on store)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entries(self) -> list[tuple[Path, Manifest]]:
        found = []
        if not self.root.is_dir():
            return found
        for folder in sorted(self.root.iterdir()):
            manifest = _read_manifest(folder)
            if manifest is not None:
                found.append((folder, manifest))
        return found

    def lookup(self, key: EngineKey) -> Lookup:
        folder = self.root / key.folder_name()
        manifest = _read_manifest(folder)
        if manifest is not None and manifest.key == key:
            broken = [name for name, digest in manifest.files.items() if not _file_matches(folder / name, digest)]
            if not broken:
                return Lookup(folder, manifest)
            return Lookup(None, None, (f"cached entry {folder} is corrupt: {', '.join(broken)} changed or missing",))
        same_kind = [m for _, m in self.entries() if (m.key.model_type, m.key.backend) == (key.model_type, key.backend)]
        if not same_kind:
            return Lookup(None, None, (f"no cached {key.backend} entry for {key.model_type} under {self.root}",))
        closest = min(same_kind, key=lambda m: len(describe_changes(m.key, key)))
        return Lookup(None, None, tuple(describe_changes(closest.key, key)))

    def store(
        self,
        key: EngineKey,
        files: Mapping[str, Path],
        export: Mapping[str, Any],
        measured: Mapping[str, Any],
        build_seconds: float,
    ) -> tuple[Path, Manifest]:
        """Copy ``files`` (path inside the entry, e.g. ``onnx/vision.onnx`` -> source path) into a new entry and write
        its manifest, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / key.folder_name()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            digests = {}
            for name, source in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
                digests[name] = file_sha256(tmp / name)
            manifest = Manifest(
                key=key,
                files=digests,
                export=dict(export),
                measured=dict(measured),
                build_seconds=round(build_seconds, 3),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            (tmp / MANIFEST).write_text(json.dumps(manifest.as_dict(), indent=2, sort_keys=True) + "\n")
            if final.exists():  # a stale or corrupt entry with the same key (a matching one would have been a hit)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, manifest


def _read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: treated as absent, replaced on the next store


def _file_matches(path: Path, digest: str) -> bool:
    return path.is_file() and file_sha256(path) == digest
