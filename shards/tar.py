"""The tar and DALI-index contract of a shard: how a sample is laid out, written, indexed and read.

A shard ``<split>/NNNNNN.tar`` is a POSIX ustar archive. Each sample is three consecutive members, in
this order (``MEMBER_EXTS``): ``<key>.idx`` (the sample id, 4 bytes little-endian int32:
``encode_sample_id`` / ``decode_sample_id``), ``<key>.jpg`` (the source bytes; ``ingest --max-side``
re-encodes large ones) and ``<key>.json`` (the sample's metadata, at least ``SAMPLE_JSON_FIELDS``).
The bytes depend only on the samples (``TarBytes``): members have mtime 0, uid/gid 0, empty user/group
names and mode 0644, data is zero-padded to 512-byte blocks, and the archive ends with two zero blocks
(no padding to a 10 KiB record).

Its DALI index ``<split>/NNNNNN.idx`` is the text format of DALI's ``wds2idx`` tool, v1.2
(``DALI_INDEX_VERSION``): written by ``write_dali_index`` (from the tar) or ``format_dali_index`` (from
the offsets noted while building it), parsed by ``read_dali_index``.

Reading: ``iter_samples`` yields every sample of a shard and raises ``FormatError`` for a layout the
writer does not produce (``Dataset.iter_samples``, ``verify_shard``); ``ShardReader`` reads the JPEG
bytes of any sample by id at the offsets of the DALI index and reports a damaged sample as a value
(both loaders). ``verify_shard`` checks a shard and its index against the manifest (``ingest verify``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .format import FormatError, IngestError, ShardInfo, sample_key

#: members of one sample, in tar order
MEMBER_EXTS = ("idx", "jpg", "json")
#: what every ``<key>.json`` holds (the writer adds them to the adapter's ``Record.meta``)
SAMPLE_JSON_FIELDS = ("source_id", "rel_path", "width", "height")
#: the ``<key>.idx`` member: the sample id as a little-endian int32
SAMPLE_ID = struct.Struct("<i")
DALI_INDEX_VERSION = "v1.2"
#: what to do about a damaged shard or index
FIX_SHARD = "re-run `ingest` for this split (it rebuilds a shard and its index together)"

_WHITESPACE_RE = re.compile(r"\s")
_TAR_BLOCK = 512
_MAX_MEMBER_SIZE = 8**11 - 1  # 11 octal digits in a ustar size field


# ----------------------------------------------------------------------------------------- sample ids

def encode_sample_id(sample_id: int) -> bytes:
    """The ``<key>.idx`` member of a sample."""
    return SAMPLE_ID.pack(sample_id)


def decode_sample_id(data: bytes) -> int:
    """The ``<key>.idx`` member: the sample id as 4 bytes, little-endian int32."""
    if len(data) != SAMPLE_ID.size:
        raise ValueError(f"an .idx member holds 4 bytes (little-endian int32), got {len(data)}")
    return SAMPLE_ID.unpack(data)[0]


def sample_members(sample_id: int, jpeg: bytes, meta_json: bytes) -> list[tuple[str, bytes]]:
    """(member name, data) of one sample, in tar order (``MEMBER_EXTS``)."""
    key = sample_key(sample_id)
    return [(f"{key}.idx", encode_sample_id(sample_id)), (f"{key}.jpg", jpeg), (f"{key}.json", meta_json)]


# -------------------------------------------------------------------------------------------- writing

def _ustar_template() -> bytearray:
    h = bytearray(_TAR_BLOCK)
    h[100:108] = b"0000644\x00"  # mode
    h[108:116] = b"0000000\x00"  # uid
    h[116:124] = b"0000000\x00"  # gid
    h[136:148] = b"00000000000\x00"  # mtime 0: tar bytes must not depend on when they were written
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"  # POSIX ustar magic + version
    return h


_USTAR = bytes(_ustar_template())
_ZEROS = bytes(_TAR_BLOCK)


def _tar_header(name: str, size: int) -> bytes:
    raw = name.encode("ascii")
    assert len(raw) <= 100, name  # member names are "<9 digits>.<ext>"
    if size > _MAX_MEMBER_SIZE:
        raise IngestError(f"member {name} is {size} bytes; a ustar member holds at most {_MAX_MEMBER_SIZE}")
    h = bytearray(_USTAR)
    h[0:len(raw)] = raw
    h[124:136] = b"%011o\x00" % size
    h[148:156] = b"        "  # the checksum is computed with its own field as spaces
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


class TarBytes:
    """The bytes of a tar being built, sample by sample: their size and member offsets (noted by the thread
    that builds them), and their sha256 (updated by the writer's hash thread, read once the shard is
    committed)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.members: list[tuple[str, int, int]] = []  # (name, data offset, size), for the DALI index

    def _take(self, b: bytes) -> bytes:
        self.size += len(b)
        return b

    def sample(self, members: list[tuple[str, bytes]]) -> bytes:
        """Header, data and padding of each member of one sample, as one block of bytes."""
        parts = []
        offset = self.size
        for name, data in members:
            parts.append(_tar_header(name, len(data)))
            offset += _TAR_BLOCK
            self.members.append((name, offset, len(data)))
            parts.append(data)
            pad = -len(data) % _TAR_BLOCK
            if pad:
                parts.append(_ZEROS[:pad])
            offset += len(data) + pad
        out = self._take(b"".join(parts))
        assert self.size == offset
        return out

    def end(self) -> bytes:
        return self._take(_ZEROS * 2)  # end-of-archive marker


# ------------------------------------------------------------------------------------------- DALI index

def format_dali_index(members: Iterable[tuple[str, int, int]], where: str) -> str:
    """DALI index text for regular-file members given as (name, data offset, size) in tar order."""
    samples: list[list[str]] = []
    last = None
    for name, offset, size in members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        base, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
        if base == "" or base.endswith("/"):
            continue
        if _WHITESPACE_RE.search(name):
            raise ValueError(f"{where}: member {name!r} has whitespace; a DALI index cannot describe it")
        component = f"{ext} {offset} {size} {name}"
        if base != last:
            samples.append([component])
            last = base
        else:
            samples[-1].append(component)
    if not samples:
        raise ValueError(f"{where}: no samples; DALI cannot index an empty archive")
    return "".join([f"{DALI_INDEX_VERSION} {len(samples)}\n"] + [" ".join(s) + "\n" for s in samples])


def dali_index_text(tar_path: str | os.PathLike) -> str:
    """The DALI webdataset index of ``tar_path`` as text, in the format of DALI's ``wds2idx`` tool.

    Format v1.2: a first line ``v1.2 <number of samples>``, then one line per sample listing each of its
    components as ``<ext> <data offset> <size> <member name>``, space separated, in tar order. Offsets
    point at the member data (header offset + 512). Samples are runs of regular-file members with the
    same basename (the name up to the first dot after the last slash), as DALI groups them; members
    whose basename is empty (hidden files) are left out, as DALI does.
    """
    with tarfile.open(tar_path, mode="r:") as tf:
        members = [(m.name, m.offset_data, m.size) for m in tf if m.isreg()]
    return format_dali_index(members, str(tar_path))


def write_dali_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> int:
    """Write the DALI index of ``tar_path`` to ``idx_path`` (fsynced) and return its number of samples.

    Use with ``nvidia.dali.fn.readers.webdataset(paths=[tar], index_paths=[idx], ext=[...])``.
    """
    text = dali_index_text(tar_path)
    write_synced_text(idx_path, text)
    return int(text.split("\n", 1)[0].split(" ")[1])


def write_synced_text(path: str | os.PathLike, text: str) -> None:
    """Write an index (ASCII, ``\\n`` line ends) and fsync it."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """Byte ranges of one shard's members, row i = sample ``first_sample + i`` (the tar order)."""

    first_sample: int
    jpg_offset: np.ndarray  # int64, offset of the .jpg member's data in the tar
    jpg_size: np.ndarray  # int64
    idx_offset: np.ndarray  # int64, offset of the 4-byte .idx member's data


def read_dali_index(path: str | os.PathLike, first_sample: int, num_samples: int) -> ShardIndex:
    """Parse a v1.2 DALI webdataset index and check it describes samples ``first_sample ..`` in order.

    Line 1 is ``v1.2 <samples>``; line 2 + i lists sample i's members as ``<ext> <offset> <size>
    <name>`` groups. Only the ``jpg`` and ``idx`` members are used; their names must be the sample's key.
    """
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="ascii") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise FormatError(f"{path}: DALI index not found; {FIX_SHARD}") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not a DALI index (non-ASCII bytes: {e}); {FIX_SHARD}") from e
    head = lines[0].split()
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise FormatError(f"{path}:1: expected '{DALI_INDEX_VERSION} <samples>', got {lines[0][:80]!r}; {FIX_SHARD}")
    if int(head[1]) != num_samples:
        raise FormatError(
            f"{path}:1: index lists {head[1]} samples but manifest.json says the shard holds {num_samples}; {FIX_SHARD}"
        )
    body = lines[1 : 1 + num_samples]
    if len(body) < num_samples or any(line.strip() for line in lines[1 + num_samples :]):
        raise FormatError(f"{path}: expected exactly {num_samples} sample lines after the header; {FIX_SHARD}")
    jpg_offset = np.empty(num_samples, np.int64)
    jpg_size = np.empty(num_samples, np.int64)
    idx_offset = np.empty(num_samples, np.int64)
    for i, line in enumerate(body):
        tok = line.split()
        where = f"{path}:{i + 2}"
        if not tok or len(tok) % 4:
            raise FormatError(
                f"{where}: expected groups of '<ext> <offset> <size> <name>', got {line[:120]!r}; {FIX_SHARD}"
            )
        key = sample_key(first_sample + i)
        members = {tok[k]: tok[k + 1 : k + 4] for k in range(0, len(tok), 4)}
        for ext in ("jpg", "idx"):
            if ext not in members:
                raise FormatError(f"{where}: sample {key} has no .{ext} member in the index; {FIX_SHARD}")
            offset, size, name = members[ext]
            if os.path.basename(name) != f"{key}.{ext}" or not offset.isdigit() or not size.isdigit():
                raise FormatError(
                    f"{where}: expected member {key}.{ext} with numeric offset and size, "
                    f"got {' '.join(members[ext])!r}; {FIX_SHARD}"
                )
        if int(members["idx"][1]) != SAMPLE_ID.size:
            raise FormatError(f"{where}: {key}.idx has {members['idx'][1]} bytes, expected 4; {FIX_SHARD}")
        jpg_offset[i] = int(members["jpg"][0])
        jpg_size[i] = int(members["jpg"][1])
        idx_offset[i] = int(members["idx"][0])
    return ShardIndex(first_sample, jpg_offset, jpg_size, idx_offset)


# -------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Sample:
    sample_id: int
    key: str
    jpeg: bytes  # the source JPEG bytes (re-encoded only by ``ingest --max-side``)
    meta: dict[str, Any]  # <key>.json: source_id, rel_path, width, height, plus the adapter's meta (boxes ...)


def iter_samples(path: Path) -> Iterator[Sample]:
    """Samples of one shard; raises FormatError for a member layout the writer does not produce."""
    key = None
    parts: dict[str, bytes] = {}

    def finish() -> Sample:
        missing = set(MEMBER_EXTS) - set(parts)
        if missing:
            raise FormatError(f"{path}: sample {key} lacks {sorted(missing)}; re-run ingest for this split")
        sid = decode_sample_id(parts["idx"]) if len(parts["idx"]) == SAMPLE_ID.size else None
        if sid is None or sample_key(sid) != key:
            raise FormatError(f"{path}: {key}.idx holds {parts['idx'].hex()}, not the key's id as int32 LE")
        try:
            meta = json.loads(parts["json"])
        except ValueError as e:
            raise FormatError(f"{path}: {key}.json is not JSON ({e})") from e
        return Sample(sid, key, parts["jpg"], meta)

    try:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                base, _, ext = m.name.partition(".")
                if ext not in MEMBER_EXTS:
                    raise FormatError(f"{path}: unexpected member {m.name!r}; samples hold only .idx, .jpg, .json")
                if base != key:
                    if key is not None:
                        yield finish()
                    key, parts = base, {}
                if ext in parts:
                    raise FormatError(f"{path}: member {m.name!r} appears twice")
                parts[ext] = tf.extractfile(m).read()
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a readable tar ({e}); re-run ingest for this split") from e
    if key is not None:
        yield finish()


class ShardReader:
    """JPEG bytes of a split's samples by id, read at the offsets of the shards' DALI indexes.

    Random access: one ``pread`` of the 4-byte ``<key>.idx`` member (which must hold the id: a stale or
    mismatched index is reported, never a wrong image) and one of the ``.jpg`` member per sample, in any
    order. The indexes are parsed on first use (``load`` parses chosen ones ahead, e.g. before DataLoader
    workers fork, so that they inherit them) and kept: 24 bytes per sample. At most ``MAX_OPEN_SHARDS``
    shard files are open; a forked process opens its own.

    Random access is what a uniform order of the samples needs (``shards.schedule``): consecutive samples
    lie in different shards, and a sequential reader would need a shuffle buffer as large as the
    selection to draw uniformly. From the page cache or an SSD a read costs less CPU than scanning the
    tar headers did; on storage where every seek is slow (spinning disks, network file systems) it
    costs one seek per sample.
    """

    #: open shard files kept per process (least recently used are closed): bounded file descriptors
    MAX_OPEN_SHARDS = 64

    def __init__(self, tar_paths: list[str], firsts: Iterable[int], counts: Iterable[int]):
        self.tar_paths = tar_paths
        self.firsts = np.asarray(list(firsts), dtype=np.int64)
        self.counts = np.asarray(list(counts), dtype=np.int64)
        self._index: dict[int, ShardIndex] = {}
        self._fds: dict[int, int] = {}  # insertion order = least recently used first
        self._pid = os.getpid()

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``tar_paths`` of the shard holding each id."""
        return np.searchsorted(self.firsts, ids, side="right") - 1

    def path_of(self, sample_id: int) -> str:
        return self.tar_paths[int(self.shard_of(np.asarray([sample_id]))[0])]

    def index(self, shard: int) -> ShardIndex:
        """The parsed DALI index of ``shard`` (``FormatError`` naming the file and line if it is damaged)."""
        got = self._index.get(shard)
        if got is None:
            idx = self.tar_paths[shard][: -len(".tar")] + ".idx"
            got = read_dali_index(idx, int(self.firsts[shard]), int(self.counts[shard]))
            self._index[shard] = got
        return got

    def load(self, ids: np.ndarray) -> None:
        """Parse the indexes of every shard that holds one of ``ids``."""
        for shard in np.unique(self.shard_of(ids)).tolist():
            self.index(shard)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the inherited descriptors belong to the parent's LRU
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.tar_paths[shard], os.O_RDONLY)
        self._fds[shard] = fd  # most recently used last
        return fd

    def read(self, sample_id: int) -> tuple[bytes | None, str | None]:
        """(JPEG bytes, None), or (None, what is wrong) for a sample that cannot be read."""
        shard = int(self.shard_of(np.asarray([sample_id]))[0])
        index = self.index(shard)
        row = sample_id - index.first_sample
        size = int(index.jpg_size[row])
        try:
            fd = self._fd(shard)
            head = os.pread(fd, SAMPLE_ID.size, int(index.idx_offset[row]))
            data = os.pread(fd, size, int(index.jpg_offset[row]))
        except OSError as e:
            return None, f"read failed ({e})"
        if len(head) != SAMPLE_ID.size or len(data) != size:
            return None, "the shard ends before the bytes its DALI index names (truncated shard or stale index)"
        stored = decode_sample_id(head)
        if stored != sample_id:
            return None, (f"the .idx member at the indexed offset says sample {stored} (the DALI index does not "
                          "match the shard)")
        return data, None

    def close(self) -> None:
        """Close this process's shard files (also done when the reader is collected)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- verify

def verify_shard(path: Path, sh: ShardInfo) -> list[str]:
    """Every problem of a shard's structure and its DALI index against its manifest entry, one line each:
    members (keys in order, ``.idx`` holding the sample id, the json fields), sample count, and the index
    against one rebuilt from the tar. (Sizes and sha256 of both files: ``shards.reader.file_problems``.)"""
    problems = []
    n = 0
    try:
        for sample in iter_samples(path):
            want = sh.first_sample + n
            if sample.sample_id != want:
                problems.append(f"{path}: sample {n} of the shard has id {sample.sample_id}, expected {want}")
                break
            for field in SAMPLE_JSON_FIELDS:
                if field not in sample.meta:
                    problems.append(f"{path}: {sample.key}.json lacks {field!r}")
            n += 1
    except FormatError as e:
        problems.append(str(e))
        return problems
    if n != sh.num_samples:
        problems.append(f"{path}: holds {n} samples, manifest.json says {sh.num_samples}")
    idx = path.with_suffix(".idx")
    try:
        if idx.read_text(encoding="ascii") != dali_index_text(path):
            problems.append(f"{idx}: does not match the DALI index of {path.name}; re-run ingest")
    except FileNotFoundError:
        pass  # named by file_problems
    except (ValueError, tarfile.TarError) as e:
        problems.append(f"{idx}: cannot be checked ({e})")
    return problems
