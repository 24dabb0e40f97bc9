"""webdataset tars (`.tar`, `.tar.gz`, `.tgz`), read as streams, never extracted.

Members group by key as webdataset does (`dir/key.ext`); a sample needs one `.jpg/.jpeg/.png/.webp`
member and may have a `.cls` (ASCII integer label). Key = the webdataset key; as in webdataset, keys are
assumed unique across the tars of one source (a key repeated inside one tar is rejected). A tar that
breaks off (truncated or garbled) keeps the samples before the break; the sample being read at the break
is rejected with the reason. One tar is one part. Class names come from a `classes.txt` beside the
tars (`base.read_class_names`), as CIFAR-10's webdataset copy has.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from igpt_core.sources.base import MAX_BYTES, Reject, Sample, decoded

TAR_EXTS = (".tar", ".tar.gz", ".tgz")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TarPart:
    """One whole tar, read to its end."""

    source: str
    path: str
    name: str
    """The tar's name relative to the source root, used in rejects."""


def read_tar(part: TarPart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    """Every sample of the tar, in order; bad members, bad samples and the break of a cut tar as Rejects."""
    name = part.name
    try:
        fh = open(part.path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the with below
    except OSError as e:
        yield Reject(name, f"cannot open tar: {e}")
        return
    with fh:
        try:
            # Stream mode ('r|*'): one sequential pass, and a truncated tar still yields what precedes the break.
            archive = tarfile.open(fileobj=fh, mode="r|*", bufsize=1 << 16)  # noqa: SIM115 - fh owns the file
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            yield Reject(name, f"not a readable tar archive: {e}")
            return
        key: str | None = None
        members: dict[str, bytes] = {}
        seen: set[str] = set()
        broken: str | None = None
        while True:
            try:
                member = archive.next()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                broken = f"unreadable tar header at byte {archive.offset}: {e}"
                break
            archive.members = []  # type: ignore[attr-defined]  # stream mode keeps every TarInfo otherwise; nothing here looks back
            if member is None:
                broken = _tar_end_problem(fh, archive)
                break
            if member.isdir():
                continue
            if _unsafe_member(member.name):
                yield Reject(member.name, "unsafe member name (absolute path or '..'); skipped, never read")
                continue
            if not member.isfile():
                yield Reject(member.name, "not a regular file member (link or device); skipped")
                continue
            member_key, ext = _split_member(member.name)
            if not member_key or member_key.endswith("/"):
                yield Reject(member.name, "member name has no key before its extension")
                continue
            if member.size > MAX_BYTES:
                yield Reject(member.name, f"member is {member.size} bytes, over the limit of {MAX_BYTES}")
                continue
            if member_key != key:
                if key is not None:
                    yield _tar_sample(key, members, resolution, max_pixels)
                key, members = member_key, {}
                if member_key in seen:
                    key = None
                    yield Reject(member.name, f"key {member_key!r} appears again after other samples")
                    continue
                seen.add(member_key)
            if ext in members:
                yield Reject(member.name, "the sample already has this member; the first one is kept")
                continue
            try:
                extracted = archive.extractfile(member)
                assert extracted is not None
                members[ext] = extracted.read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                broken = f"member {member.name} cut off at byte {member.offset_data}: {e}"
                break
        if broken is None:
            if key is not None:
                yield _tar_sample(key, members, resolution, max_pixels)
        elif key is not None:
            yield Reject(key, f"tar {name} is truncated or corrupt ({broken}); this sample may be incomplete")
        else:
            yield Reject(f"{name}@{archive.offset}", f"tar {name} is truncated or corrupt ({broken})")


def _unsafe_member(name: str) -> bool:
    path = name.replace("\\", "/")
    return path.startswith("/") or ".." in path.split("/") or (len(path) > 1 and path[1] == ":")


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: key = directory + basename up to its first dot; ext = the rest, lowercased."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(key: str, members: dict[str, bytes], resolution: int, max_pixels: int) -> Sample | Reject:
    """One webdataset sample (its members by extension) as a Sample, or the Reject saying what is wrong."""
    found = [e for e in TAR_IMAGE_EXTS if e in members]
    if not found:
        exts = ", ".join("." + e for e in sorted(members)) or "none"
        return Reject(key, f"no .jpg/.jpeg/.png/.webp member in the sample (members: {exts})")
    if len(found) > 1:
        return Reject(key, f"several image members in one sample: {', '.join('.' + e for e in found)}")
    label = None
    if "cls" in members:
        text = members["cls"].strip()
        try:
            label = int(text)
        except ValueError:
            return Reject(key, f".cls is not an integer label: {members['cls'][:32]!r}")
        if label < 0:
            return Reject(key, f".cls label {label} is negative")
    return decoded(key, members[found[0]], label, resolution, max_pixels)


def _tar_end_problem(fh: Any, archive: tarfile.TarFile) -> str | None:
    """None when an uncompressed tar ends with its zero end-of-archive block where the members stop.

    tarfile stops quietly at a cut or garbled header after the first member; that silent loss is
    detected here for uncompressed tars (compressed ones report their cuts as decoder errors).
    """
    if getattr(archive.fileobj, "comptype", "tar") != "tar":
        return None
    block = os.pread(fh.fileno(), tarfile.BLOCKSIZE, archive.offset)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    return f"no end-of-archive block at byte {archive.offset} ({len(block)} bytes there)"
