"""GPU data path: NVIDIA DALI decodes and resizes the shards' JPEGs; the epoch plan is the CPU loader's.

``DaliLoader`` yields exactly what ``shards.loader.ShardLoader`` yields: ``(images, ids)`` with ``images``
uint8 ``[B, 3, S, S]`` (NCHW, RGB, squashed to S x S, not normalised: the model normalises on the device)
and ``ids`` int64 ``[B]`` on the CPU. Images are on the loader's CUDA device, or on the CPU when the
pipeline runs with CPU operators (``device=None`` or a CPU device: ``device_id=None``, how CI tests
this path without a GPU).

Which samples, in which order: the CPU loader's schedule, fed through ``fn.external_source``
============================================================================================

A ``DaliLoader`` holds the same ``shards.schedule.EpochSchedule`` as ``ShardLoader``: its ``batches()``
are the rank's output sequence (sample id, horizontal flip) exactly as ``ShardLoader`` emits it, cut
with the plan's batch sizes. Consequences, each tested against ``ShardLoader`` itself in
tests/test_dali.py:

- every allowed sample exactly once per epoch across ranks, the same number of batches on every rank
  (``num_batches``), a sample-id subset (the 80/20 cut) costs no reads of the other samples;
- the order (a uniformly random permutation of the selection) and the flips are pure functions of
  ``(seed, epoch)``, so a run is reproducible and ``set_epoch(e, start_batch=n)`` resumes at batch n;
- the two loaders yield identical batches (same ids in the same order, same flips), whatever the CPU
  loader's number of workers.

The encoded bytes are read in Python by ``shards.tar.ShardReader``, the CPU loader's reader: ``os.pread``
at the offsets of the shard's DALI index (``<split>/NNNNNN.idx``, the ``wds2idx`` v1.2 format of
``shards.tar``), fed to the pipeline with the ids and flips. The ``<key>.idx`` member (the sample id, 4
bytes little-endian int32) is read as well and must equal the planned id: a stale or mismatched index
is an error naming the shard, never a silently wrong label.

Why not ``fn.readers.webdataset`` with ``shard_id/num_shards``: that reader splits the samples of the
listed tars into contiguous ranges per shard id and shuffles with a buffer seeded once per pipeline
(``random_shuffle``/``initial_fill``), so (a) its per-rank sets are not the CPU loader's, (b) an epoch's
order depends on every epoch before it, not on ``(seed, epoch)``, so a resumed run cannot reproduce
it, (c) it cannot skip the samples outside a sample-id subset (the 20 % validation cut would read
100 % of the bytes and discard 80 % after decoding), and (d) equal batch counts per rank come from
padding with duplicated samples (``pad_last_batch``), which evaluation would see twice. Reading with
the index offsets keeps DALI's benefit (decode, resize, flip and layout on the GPU, nvJPEG and the
hardware JPEG decoder where present) and costs one ``pread`` per member on the host (tests/bench/gpu.py
measures it).

The pipeline
============

``external_source`` (encoded bytes, ids, flips) -> ``decoders.image`` to RGB (``mixed``: nvJPEG and the
hardware decoder, with libjpeg-turbo's "fancy" chroma upsampling; ``cpu``: libjpeg-turbo; EXIF
orientation ignored, as the CPU loader does) -> ``resize`` to (S, S) with the linear filter and
antialiasing: the triangle filter widened by the reduction, which is PIL's bilinear filter, the one the
reference code resizes with and the CPU loader's (``shards.jpeg.resize_planes``) ->
``crop_mirror_normalize`` with mean 0, std 1 and uint8 output: only the per-sample horizontal flip from
the plan and HWC -> CHW. No normalisation: images stay uint8, as with the CPU loader.

Agreement with the reference filter and the CPU loader (CPU operators, measured in tests/test_dali.py):
on a 1024x768 photo, mean |DALI - torchvision's Resize(antialias=True)| is a fraction of a grey level
at 224 and 448. When an image is not at least twice the target on both sides (VOC/COCO at 448), the
CPU loader decodes at full size as well, and the two differ by rounding (torch rounds to uint8 between
the horizontal and the vertical pass, DALI does not): a fraction of a level on average, a few levels
at single high-contrast pixels. At f >= 2 (OpenImages at 224) the CPU loader decodes at a reduced DCT
scale first (libjpeg-turbo's scaled IDCT, a different low-pass filter): about 2 levels mean absolute
difference per image at f = 2, up to ~100 levels at single high-contrast edge pixels. On the GPU,
nvJPEG's IDCT adds a further difference of a few levels.

Costs: the parsed index of a shard is kept once the shard is first read (24 bytes per sample: about
80 MB per loader for OpenImages' 3.4M training images); at most ``ShardReader.MAX_OPEN_SHARDS`` tar
files are open.
On a machine without a GPU the CPU operators compete with PyTorch's CPU threads for the same cores,
so there the CPU loader is the faster choice (``loader=auto`` takes it); the CPU path exists so that
CI tests this module without a GPU.

Errors: a missing shard or index file and an index that does not describe the manifest's samples are
``FormatError`` (naming the file and line). A sample that cannot be used is, as in the CPU loader,
``shards.loader.SampleError`` naming the shard and key under ``on_error="raise"``, and counted in
``skipped`` (by reason, with the first messages in ``skip_log``) and left out of its batch under
``on_error="skip"`` (a batch left empty repeats the rank's previous good sample, ``skipped["repeated"]``).
Such a sample is found in three places: reading it (a short read or a mismatched ``<key>.idx``: reason
"read"), its JPEG header before DALI sees it (more pixels than ``shards.jpeg.MAX_PIXELS_LIMIT``, which
DALI would try to allocate: "decode"), and DALI's decoder, which fails a whole batch: the batch's
images are then decoded on the CPU (``shards.jpeg.decode_image``) to name the ones that fail ("decode";
if the CPU decodes them all, the whole batch is named), the pipeline is rebuilt and, when skipping,
the epoch resumes at that batch without them. Skipped samples are counted when their batch is output.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .format import sample_key
from .jpeg import DecodeError, decode_image, header_problem
from .loader import FIX_DECODE, FIX_READ, SKIP_LOG_LIMIT, SampleError
from .schedule import EpochPlan, EpochSchedule, select_split
from .tar import ShardReader

logger = logging.getLogger(__name__)

__all__ = ["DaliLoader", "available"]

_INSTALL_HINT = (
    "install NVIDIA DALI for your CUDA version (pip install 'largeloss[dali]', i.e. nvidia-dali-cuda130), "
    "or train with loader=cpu"
)


def _import_dali():
    """(fn, types, Pipeline) of NVIDIA DALI, or ImportError saying how to get it."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as e:
        raise ImportError(f"the DALI loader needs NVIDIA DALI ({e}); {_INSTALL_HINT}") from e
    return fn, types, Pipeline


def available(device: Any) -> bool:
    """True when DALI can be imported and ``device`` is a CUDA device (what ``loader=auto`` asks)."""
    if device is None or torch.device(device).type != "cuda":
        return False
    try:
        _import_dali()
    except ImportError:
        return False
    return True


def _where(reader: ShardReader, sid: int) -> str:
    """"<shard path>: sample <key>", how messages name a sample."""
    return f"{reader.path_of(sid)}: sample {sample_key(sid)}"


@dataclass
class _Fed:
    """One batch handed to DALI: its ids, the samples left out of it, and the rank's last good sample after it."""

    ids: np.ndarray
    skips: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    last_good: tuple[int, bytes, int] | None = None  # (id, bytes, flip)


class _Feed:
    """The ``external_source`` callback: the current epoch's batches, one call per batch.

    Raises StopIteration at the end of the epoch (DALI's end-of-data signal) and when stopped.
    ``fed`` holds the batches handed to DALI and not yet returned, oldest first: DALI returns batches in
    the order they were fed, so ``fed[0]`` is the batch of the next output. A sample that cannot be read,
    whose header declares too many pixels, or that is in ``bad`` (DALI failed on it before) is a
    ``SampleError`` (``on_error="raise"``) or left out of its batch and noted in its ``_Fed``.
    """

    def __init__(self, reader: ShardReader, on_error: str):
        self.reader = reader
        self.on_error = on_error
        self.batches: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self.fed: deque[_Fed] = deque()
        #: samples DALI's decoder failed on: id -> message (kept across epochs)
        self.bad: dict[int, str] = {}
        self.last_good: tuple[int, bytes, int] | None = None

    def start(self, batches: Iterator[tuple[np.ndarray, np.ndarray]], last_good) -> None:
        self.batches = batches
        self.fed.clear()
        self.last_good = last_good

    def stop(self) -> None:
        self.batches = None

    def _problem(self, sid: int, data: bytes | None, error: str | None) -> tuple[str, str] | None:
        if data is None:
            reason, why = "read", error
        elif sid in self.bad:
            reason, why = "decode", self.bad[sid]
        else:
            why = header_problem(data)
            if why is None:
                return None
            reason = "decode"
        message = f"{_where(self.reader, sid)}: {why}"
        if self.on_error == "raise":
            raise SampleError(f"{message}; {FIX_DECODE if reason == 'decode' else FIX_READ}")
        return reason, message

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        if self.batches is None:
            raise StopIteration
        nxt = next(self.batches, None)
        if nxt is None:
            self.batches = None
            raise StopIteration
        batch = _Fed(np.zeros(0, np.int64))
        ids, data, flips = [], [], []
        for sid, flip in zip(nxt[0].tolist(), nxt[1].tolist()):
            got, error = self.reader.read(sid)
            problem = self._problem(sid, got, error)
            if problem is not None:
                batch.skips.append(problem)
                continue
            ids.append(sid)
            data.append(got)
            flips.append(flip)
            self.last_good = (sid, got, flip)
        if not ids:  # every sample skipped: the rank's previous good sample again, as the CPU loader does
            if self.last_good is None:
                raise SampleError(f"{_where(self.reader, int(nxt[0][0]))}: every sample of the rank's first batch was "
                                  f"skipped ({batch.skips[-1][1]}); re-run `ingest` for this split")
            sid, got, flip = self.last_good
            ids, data, flips = [sid], [got], [flip]
            batch.skips.append(("repeated", ""))
        batch.ids = np.array(ids, dtype=np.int64)
        batch.last_good = self.last_good
        self.fed.append(batch)
        # ids as int64 scalars, flips as the int32 per-sample `mirror` argument of crop_mirror_normalize
        return [np.frombuffer(d, dtype=np.uint8) for d in data], batch.ids, np.array(flips, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


class DaliLoader:
    """Batches of (uint8 images [B,3,S,S] on ``device``, int64 sample ids [B] on the CPU) for one rank.

    Same contract as ``shards.loader.ShardLoader``: ``len(loader)`` batches per epoch on every rank,
    ``set_epoch(epoch, start_batch=0)`` before each epoch. ``device`` None or a CPU device runs the
    pipeline with CPU operators (``device_id=None``); a CUDA device decodes with nvJPEG on that GPU.
    ``num_threads`` are DALI's CPU threads (default: 4 with a GPU, otherwise the available cores up to
    8); ``prefetch`` batches are prepared ahead; ``hw_decoder_load`` is the share of images nvJPEG sends
    to the GPU's hardware JPEG decoder where there is one (None: DALI's default);
    ``on_error`` is "raise" or "skip", as in the CPU loader (see the module docstring).
    """

    def __init__(
        self,
        dataset_root: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        train: bool,
        sample_ids: Sequence[int] | np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: Any = None,
        num_threads: int | None = None,
        prefetch: int = 2,
        hw_decoder_load: float | None = None,
        on_error: str = "raise",
    ):
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size} and {image_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if prefetch < 1 or (num_threads is not None and num_threads < 1):
            raise ValueError(f"prefetch and num_threads must be >= 1, got {prefetch} and {num_threads}")
        if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self._fn, self._types, self._Pipeline = _import_dali()
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"DaliLoader: device {dev} requested but CUDA is not available; pass device=None "
                                   "for CPU operators or train with loader=cpu")
            self.device_id: int | None = dev.index if dev.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif dev.type == "cpu":
            self.device_id = None
            self.device = dev
        else:
            raise ValueError(f"DaliLoader: device must be a CUDA device, a CPU device or None, got {dev}")

        sel = select_split(dataset_root, split, sample_ids)
        #: which samples, in which order and batches: ``ShardLoader``'s schedule
        self.schedule = EpochSchedule(sel, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                      train=train)
        self.root = sel.root
        self._reader = sel.reader()
        self.split = split
        self.image_size = image_size
        self.num_threads = num_threads or (4 if self.device_id is not None else max(1, min(8, os.cpu_count() or 1)))
        self.prefetch = prefetch
        self.hw_decoder_load = hw_decoder_load
        self.on_error = on_error
        #: skipped samples by reason ("read", "decode") and "repeated" (batches refilled), over the loader's life
        self.skipped: Counter[str] = Counter()
        #: the first SKIP_LOG_LIMIT skip messages ("<shard path>: sample <key>: <why>")
        self.skip_log: list[str] = []
        self._pipe = None
        self._feed = _Feed(self._reader, on_error)
        self._generation = 0  # bumped by every __iter__; an older, abandoned iteration stops
        self._in_flight = False  # the pipeline may hold batches of an iteration that was not finished

    # -------------------------------------------------------------- the schedule (shared with ShardLoader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (sample order and flips) and the first batch the next iteration yields."""
        self.schedule.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.schedule)

    def plan(self) -> EpochPlan:
        """This rank's plan of the current epoch, ``ShardLoader.plan()``."""
        return self.schedule.plan()

    # -------------------------------------------------------------- the pipeline

    def _build(self):
        fn, types = self._fn, self._types
        gpu = self.device_id is not None
        decoder_options: dict[str, Any] = {}
        if gpu:
            decoder_options["jpeg_fancy_upsampling"] = True  # libjpeg-turbo's chroma upsampling, as on the CPU
            if self.hw_decoder_load is not None:
                decoder_options["hw_decoder_load"] = self.hw_decoder_load
        pipe = self._Pipeline(
            batch_size=self.schedule.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
            seed=self.schedule.seed,  # no random operator: flips come from the plan; set for completeness
        )
        with pipe:
            jpegs, ids, flips = fn.external_source(
                source=self._feed,
                num_outputs=3,
                batch=True,
                dtype=[types.UINT8, types.INT64, types.INT32],
                ndim=[1, 0, 0],
            )
            images = fn.decoders.image(
                jpegs,
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,  # EXIF orientation ignored, as in the CPU loader (and PIL)
                **decoder_options,
            )
            # The reference's filter (PIL's antialiased bilinear, as the CPU loader's resize_planes): DALI's
            # linear filter with antialiasing is the same triangle filter, widened by the reduction.
            s = self.image_size
            images = fn.resize(images, resize_x=s, resize_y=s, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(
                images, dtype=types.UINT8, output_layout="CHW", mirror=flips, mean=0.0, std=1.0
            )
            pipe.set_outputs(images, ids)
        pipe.build()
        return pipe

    def _discard_pipeline(self) -> None:
        # after an error DALI's executor state is undefined: rebuild on the next iteration
        self._feed.stop()
        self._pipe = None
        self._in_flight = False

    def _drain(self) -> None:
        """Finish an abandoned iteration: stop feeding, drop what DALI already prepared, rewind."""
        self._feed.stop()
        if self._pipe is not None:
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                self._pipe.reset()
            except RuntimeError:
                self._discard_pipeline()
        self._in_flight = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.schedule.batches()
        self._generation += 1
        return self._run(batches, self._generation)

    def _run(
        self, batches: list[tuple[np.ndarray, np.ndarray]], generation: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._in_flight:
            self._drain()
        if not batches:
            return
        b = 0  # the next batch to output
        last_good = None  # the rank's last good sample after batch b - 1 (for a batch whose samples are all skipped)
        while b < len(batches):
            # (re)start the pipeline at batch b: at the start, and after DALI failed on batch b (skip mode)
            if self._pipe is None:
                self._pipe = self._build()
            pipe = self._pipe
            self._feed.start(iter(batches[b:]), last_good)
            self._in_flight = True
            while b < len(batches):
                if generation != self._generation:
                    raise RuntimeError("a newer iteration over this DaliLoader was started; this one is abandoned")
                try:
                    out_images, out_ids = pipe.run()
                except StopIteration:
                    self._discard_pipeline()
                    raise RuntimeError(
                        f"internal error: DALI ended rank {self.schedule.rank}'s epoch before its planned batches"
                    ) from None
                except SampleError:
                    self._discard_pipeline()
                    raise
                except RuntimeError as e:
                    failed = self._feed.fed[0].ids if self._feed.fed else batches[b][0]
                    self._discard_pipeline()
                    self._name_undecodable(failed, e)  # raises, or marks them to be skipped from batch b on
                    break
                ids = np.array(out_ids.as_array(), dtype=np.int64).reshape(-1)
                fed = self._feed.fed.popleft()
                assert np.array_equal(ids, fed.ids), "DALI returns batches in feed order"
                for reason, message in fed.skips:
                    self._record_skip(reason, message)
                last_good = fed.last_good
                b += 1
                yield self._to_torch(out_images), torch.from_numpy(ids)
        try:
            self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        else:
            self._discard_pipeline()
            raise RuntimeError(f"internal error: DALI has more batches than rank {self.schedule.rank}'s plan")
        self._in_flight = False

    def _name_undecodable(self, ids: np.ndarray, error: RuntimeError) -> None:
        """DALI failed on the batch ``ids``: find its images the CPU cannot decode either (DALI names none), and
        raise a SampleError naming them, or (skip mode) mark them to be skipped from now on."""
        bad = {}
        for sid in ids.tolist():
            data, read_error = self._reader.read(sid)
            if data is None:  # read when it was fed, unreadable now
                bad[sid] = read_error
                continue
            try:
                decode_image(data, self.image_size)
            except DecodeError as e:
                bad[sid] = f"DALI cannot decode it ({e})"
        if not bad:  # the CPU decodes every image of the batch: all that can be named is the batch
            lines = str(error).strip().splitlines()
            bad = {sid: f"DALI failed on its batch ({self._describe(ids)}; {lines[-1] if lines else type(error)}), "
                        "the CPU decodes each image" for sid in ids.tolist()}
        if self.on_error == "raise" or not set(bad) - set(self._feed.bad):
            # (skip mode: a batch that fails again on samples already marked would fail for ever)
            sid, why = next(iter(bad.items()))
            more = f" (and {len(bad) - 1} more in its batch)" if len(bad) > 1 else ""
            raise SampleError(f"{_where(self._reader, sid)}: {why}{more}; {FIX_DECODE}") from error
        self._feed.bad.update(bad)

    def _record_skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if reason == "repeated":
            return
        if len(self.skip_log) < SKIP_LOG_LIMIT:
            self.skip_log.append(message)
        logger.warning("skipped %s", message)

    def _to_torch(self, images) -> torch.Tensor:
        if self.device_id is None:
            arr = images.as_array()  # a copy out of DALI's buffer (which the next batch reuses) ...
            return torch.from_numpy(arr if arr.flags.owndata else arr.copy())  # ... or make it one
        # Zero copy, as DALI's own PyTorch iterator does with the dynamic executor: the DLPack capsule
        # keeps DALI's buffer alive for the tensor's lifetime and orders torch's current stream after
        # DALI's producer stream.
        with torch.cuda.device(self.device_id):
            return torch.from_dlpack(images.as_tensor())

    def _describe(self, ids: np.ndarray) -> str:
        shards = self._reader.shard_of(ids)
        names = sorted({os.path.basename(self._reader.tar_paths[s]) for s in shards.tolist()})
        keys = ", ".join(sample_key(i) for i in ids[:8].tolist()) + (", ..." if len(ids) > 8 else "")
        return f"{os.path.join(self.root, self.split)}/{{{', '.join(names)}}}, keys {keys}"

    def close(self) -> None:
        """Release the pipeline and the open shard files (also done when the loader is collected)."""
        self._feed.stop()
        self._pipe = None
        self._in_flight = False
        self._reader.close()
