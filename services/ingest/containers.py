"""Opus in an Ogg or WebM stream, decoded as its bytes arrive: feed it pieces of any size, get PCM out.

The demuxing is ours (Ogg pages and the few Matroska elements that carry Opus are simple), the Opus decoding
PyAV's: a demuxer of libavformat reads from a file and cannot wait for bytes that have not come yet, so it would
either block the event loop or take a pause in a live stream for its end. Here a piece that stops inside a page
or an element is kept until the rest comes, and `finish` says plainly when the stream ended inside one.

Output: float32 samples at 48 kHz (Opus always decodes at 48 kHz), shape (frames, channels).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import av
import numpy as np

OPUS_RATE = 48_000
OGG_MAGIC = b"OggS"
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
MAX_BUFFERED_BYTES = 4 * 1024 * 1024  # one page, element or packet held while its rest comes; more is not a stream


class ContainerError(ValueError):
    """The bytes are not an Opus stream in Ogg or WebM, or the stream ended inside a page or an element."""


def sniff(head: bytes) -> str | None:
    """'ogg' or 'webm' from a stream's first bytes; None if there are too few to tell (fewer than 4)."""
    if len(head) < 4:
        return None
    if head.startswith(OGG_MAGIC):
        return "ogg"
    if head.startswith(EBML_MAGIC):
        return "webm"
    raise ContainerError(
        f"audio starts with {head[:4].hex()}: neither Ogg (OggS) nor WebM (EBML); send Ogg/Opus or WebM/Opus, "
        "or raw PCM with encoding and sample_rate"
    )


@dataclass
class OpusHead:
    channels: int
    pre_skip: int  # samples at 48 kHz the decoder's first output holds before the audio starts


def parse_opus_head(packet: bytes) -> OpusHead:
    if len(packet) < 19 or not packet.startswith(b"OpusHead"):
        raise ContainerError("the stream's codec header is not an OpusHead: only Opus audio is taken")
    channels, pre_skip = packet[9], struct.unpack_from("<H", packet, 10)[0]
    if channels not in (1, 2):
        raise ContainerError(f"OpusHead names {channels} channels; mono or stereo Opus is taken")
    return OpusHead(channels, pre_skip)


class _OpusPackets:
    """Opus packets to PCM, dropping the encoder's pre-skip."""

    def __init__(self, head: OpusHead):
        self.head = head
        self.codec = av.CodecContext.create("libopus", "r")
        self.codec.sample_rate = OPUS_RATE
        self.codec.layout = "mono" if head.channels == 1 else "stereo"
        self.to_skip = head.pre_skip

    def decode(self, packet: bytes) -> list[np.ndarray]:
        try:
            frames = self.codec.decode(av.Packet(packet))
        except av.error.FFmpegError as exc:
            raise ContainerError(f"an Opus packet of {len(packet)} bytes does not decode: {exc}") from None
        out = []
        for frame in frames:
            samples = frame.to_ndarray()
            samples = samples.T if frame.format.is_planar else samples.reshape(-1, self.head.channels)
            samples = samples.astype(np.float32, copy=False)
            if frame.format.name.startswith("s16"):
                samples = samples / 32768.0
            if self.to_skip:
                dropped = min(self.to_skip, len(samples))
                samples, self.to_skip = samples[dropped:], self.to_skip - dropped
            if len(samples):
                out.append(samples)
        return out


class _OggDemuxer:
    """Ogg pages to packets (RFC 3533): a packet is the segments of its lacing up to one shorter than 255."""

    def __init__(self) -> None:
        self.partial = bytearray()  # a packet continued on the next page (bytes += would copy it for every segment)
        self.serial: int | None = None  # the first logical stream's; others (chained, multiplexed) are refused

    def packets(self, buffer: bytearray) -> tuple[list[bytes], int]:
        """Complete packets in `buffer`, and how many of its bytes they used."""
        out: list[bytes] = []
        at = 0
        while True:
            if len(buffer) - at < 27:
                return out, at
            if buffer[at : at + 4] != OGG_MAGIC:
                raise ContainerError(f"Ogg stream lost its page sync at byte offset {at} of the buffered data")
            serial = struct.unpack_from("<I", buffer, at + 14)[0]
            count = buffer[at + 26]
            if len(buffer) - at < 27 + count:
                return out, at
            lacing = buffer[at + 27 : at + 27 + count]
            end = at + 27 + count + sum(lacing)
            if len(buffer) < end:
                return out, at
            if self.serial is None:
                self.serial = serial
            elif serial != self.serial:
                raise ContainerError("the Ogg stream holds a second logical stream: send one Opus stream")
            body, pos = bytes(buffer[at + 27 + count : end]), 0
            for size in lacing:
                self.partial += body[pos : pos + size]
                pos += size
                if len(self.partial) > MAX_BUFFERED_BYTES:  # lacing of 255s forever: one packet without end
                    raise ContainerError(f"an Ogg packet over {MAX_BUFFERED_BYTES} bytes: not an Opus stream")
                if size < 255:
                    out.append(bytes(self.partial))
                    self.partial = bytearray()
            at = end


# Matroska (WebM) element ids: the masters walked into (their children read in turn, whatever their size, so an
# unknown-size Segment or Cluster of a live stream needs nothing special), and the leaves read.
_MASTERS = {
    0x18538067,
    0x1F43B675,
    0x1654AE6B,
    0xAE,
    0xA0,
    0xE1,
}  # Segment, Cluster, Tracks, TrackEntry, BlockGroup, Audio
_CODEC_ID, _CODEC_PRIVATE, _TRACK_NUMBER = 0x86, 0x63A2, 0xD7
_SIMPLE_BLOCK, _BLOCK = 0xA3, 0xA1
_UNKNOWN_SIZES = {(1 << (7 * n)) - 1 for n in range(1, 9)}


def _vint(buffer: bytearray, at: int, keep_marker: bool) -> tuple[int, int] | None:
    """(value, length) of the EBML variable-length integer at `at`; None if the buffer ends inside it."""
    if at >= len(buffer):
        return None
    first = buffer[at]
    length = next((n for n in range(1, 9) if first & (0x80 >> (n - 1))), 0)
    if not length:
        raise ContainerError(f"WebM stream holds an invalid element header byte {first:#04x}")
    if len(buffer) < at + length:
        return None
    value = first if keep_marker else first & ((0x80 >> (length - 1)) - 1)
    for byte in buffer[at + 1 : at + length]:
        value = (value << 8) | byte
    return value, length


class _WebmDemuxer:
    """The Opus track's frames from a WebM stream (SimpleBlocks, or Blocks in BlockGroups)."""

    def __init__(self) -> None:
        self.track: int | None = None
        self.codec_id: str | None = None
        self.head: bytes | None = None
        self._entry_track: int | None = None  # the TrackEntry being read

    def packets(self, buffer: bytearray) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        at = 0
        while True:
            element = _vint(buffer, at, keep_marker=True)
            if element is None:
                return out, at
            size = _vint(buffer, at + element[1], keep_marker=False)
            if size is None:
                return out, at
            element_id, (length, header) = element[0], (size[0], element[1] + size[1])
            if element_id in _MASTERS:
                at += header
                continue
            if length in _UNKNOWN_SIZES and size[1] == 8:
                raise ContainerError(f"WebM element {element_id:#x} has an unknown size; only masters may")
            if len(buffer) < at + header + length:
                return out, at
            self._leaf(element_id, bytes(buffer[at + header : at + header + length]), out)
            at += header + length

    def _leaf(self, element_id: int, body: bytes, out: list[bytes]) -> None:
        if element_id == _TRACK_NUMBER:
            self._entry_track = int.from_bytes(body, "big")
        elif element_id == _CODEC_ID:
            codec = body.rstrip(b"\0").decode("ascii", "replace")
            if codec == "A_OPUS" and self.track is None:
                self.track, self.codec_id = self._entry_track, codec
            elif self.codec_id is None:
                self.codec_id = codec
        elif element_id == _CODEC_PRIVATE and self.head is None and body.startswith(b"OpusHead"):
            self.head = body
        elif element_id in (_SIMPLE_BLOCK, _BLOCK):
            track = _vint(bytearray(body), 0, keep_marker=False)
            if track is None or len(body) < track[1] + 3:
                raise ContainerError("WebM block too short to hold its header")
            if self.track is None:
                raise ContainerError(f"WebM stream has no Opus track (codec {self.codec_id or 'unknown'})")
            if track[0] != self.track:
                return
            flags = body[track[1] + 2]
            if flags & 0x06:
                raise ContainerError("WebM block uses lacing; send one Opus frame per block")
            out.append(body[track[1] + 3 :])


@dataclass
class OpusStreamDecoder:
    """An Ogg/Opus or WebM/Opus stream decoded as it arrives. `feed` pieces in order, then `finish`."""

    container: str | None = None  # 'ogg' or 'webm', once sniffed from the first bytes
    channels: int = 0  # from the stream's OpusHead, once read
    frames_out: int = 0  # samples per channel given out so far (48 kHz)
    _buffer: bytearray = field(default_factory=bytearray)
    _demuxer: _OggDemuxer | _WebmDemuxer | None = None
    _opus: _OpusPackets | None = None
    _ogg_headers: int = 0  # OpusHead and OpusTags: the first two packets of an Ogg stream

    def feed(self, data: bytes) -> np.ndarray:
        """The PCM the stream holds up to the end of `data` (float32, (frames, channels); maybe none yet)."""
        self._buffer += data
        if self._demuxer is None:
            self.container = sniff(bytes(self._buffer[:4]))
            if self.container is None:
                return self._pcm([])
            self._demuxer = _OggDemuxer() if self.container == "ogg" else _WebmDemuxer()
        packets, used = self._demuxer.packets(self._buffer)
        del self._buffer[:used]
        if len(self._buffer) > MAX_BUFFERED_BYTES:
            raise ContainerError(f"{len(self._buffer)} bytes of one {self.container} page or element: not a stream")
        return self._pcm([pcm for packet in packets for pcm in self._decode(packet)])

    def finish(self) -> None:
        """The stream's end: raises ContainerError if it stopped inside a page or an element, or held no audio."""
        if self._buffer:
            what = (
                "an Ogg page"
                if self.container == "ogg"
                else "a WebM element"
                if self.container == "webm"
                else "its header"
            )
            raise ContainerError(
                f"the stream ended inside {what} ({len(self._buffer)} bytes of it came): it was cut short"
            )
        if isinstance(self._demuxer, _OggDemuxer) and self._demuxer.partial:
            raise ContainerError("the stream ended inside an Ogg packet continued across pages: it was cut short")
        if self._opus is None:
            raise ContainerError("the stream ended before its Opus header: no audio in it")

    def _decode(self, packet: bytes) -> list[np.ndarray]:
        if isinstance(self._demuxer, _OggDemuxer) and self._ogg_headers < 2:
            self._ogg_headers += 1
            if self._ogg_headers == 1:
                self._start(parse_opus_head(packet))
            return []
        if self._opus is None:
            assert isinstance(self._demuxer, _WebmDemuxer)
            if self._demuxer.head is None:
                raise ContainerError("WebM Opus track has no OpusHead in its CodecPrivate")
            self._start(parse_opus_head(self._demuxer.head))
        assert self._opus is not None
        return self._opus.decode(packet)

    def _start(self, head: OpusHead) -> None:
        self.channels = head.channels
        self._opus = _OpusPackets(head)

    def _pcm(self, pieces: list[np.ndarray]) -> np.ndarray:
        pcm = np.concatenate(pieces) if pieces else np.zeros((0, max(self.channels, 1)), dtype=np.float32)
        self.frames_out += len(pcm)
        return pcm
