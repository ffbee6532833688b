"""Text encodings of input files: which one a file uses, and a strict check that all of it
decodes, done in one streaming pass so a file is never held in memory to be checked.

Accepted: UTF-8 (with or without BOM), UTF-16 and UTF-32 (with a BOM, or without one when
the NUL pattern of the first four bytes shows it, RFC 4627 §3). Anything else (GBK, Latin-1,
...) raises :class:`InputFileError` naming the file, the first undecodable bytes with their
offset, and the fix for that cause (:func:`_fix`): unpacking for a compressed file, the
``iconv`` command from GBK or from Windows-1252/Latin-1 as the bytes suggest.
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes decoded at a time by the streaming check
# Byte-order marks, longest first (the UTF-32-LE BOM starts with the UTF-16-LE one).
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
        (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"))
_ENCODINGS_READ = "UTF-8 (with or without BOM), UTF-16 or UTF-32"


class InputFileError(ValueError):
    """A whole input file cannot be read; the message names the file and what to do."""


def sniff_utf16_32(head: bytes) -> str | None:
    """RFC 4627 §3: a JSON text starts with ASCII, so the NUL pattern of its first four
    bytes tells UTF-16/32 without a BOM."""
    head = head[:4]
    if len(head) < 4 or b"\x00" not in head:
        return None
    nul = tuple(b == 0 for b in head)
    return {(True, True, True, False): "utf-32-be", (False, True, True, True): "utf-32-le",
            (True, False, True, False): "utf-16-be", (False, True, False, True): "utf-16-le",
            }.get(nul)


def detect(head: bytes) -> tuple[str, int]:
    """``(encoding, BOM length)`` of a text starting with ``head`` (its first 4+ bytes)."""
    for bom, enc in BOMS:
        if head.startswith(bom):
            return enc, len(bom)
    return sniff_utf16_32(head) or "utf-8", 0


# magic bytes of compressed files (a .jsonl that is really gzip, a renamed download)
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -c {src} > {out}"),
               (b"BZh", "bzip2", "bunzip2 -c {src} > {out}"),
               (b"\xfd7zXZ\x00", "xz", "xz -dc {src} > {out}"),
               (b"\x28\xb5\x2f\xfd", "zstd", "zstd -dc {src} > {out}"),
               (b"PK\x03\x04", "zip", "unzip -p {src} > {out}"))
SAMPLE = 1 << 16  # bytes from the first undecodable one on that the encoding guess looks at


def _single_byte_text(sample: bytes) -> bool:
    """Whether non-ASCII bytes mostly stand alone (``café``: Latin-1 / Windows-1252) rather
    than in runs of two or more (GBK writes every Chinese character as two such bytes)."""
    ascii_to_nul = bytes(0 if b < 128 else b for b in range(256))
    runs = [len(r) for r in sample.translate(ascii_to_nul).split(b"\x00") if r]
    return bool(runs) and sum(n == 1 for n in runs) * 2 > len(runs)


def _fix(source: str, head: bytes, sample: bytes) -> str:
    """The fix for a file that is not text in an accepted encoding, right for its cause."""
    stem = Path(source)
    out = stem.with_name(stem.stem + ".utf8" + stem.suffix)
    for magic, kind, cmd in _COMPRESSED:
        if head.startswith(magic):
            return (f"it is a {kind}-compressed file: unpack it first, e.g. "
                    f"{cmd.format(src=source, out=stem.with_name(stem.stem + '.unpacked' + stem.suffix))}"
                    f", and list the unpacked file")
    if _single_byte_text(sample):
        return (f"its non-ASCII bytes look like Western European text (Windows-1252 / "
                f"Latin-1); convert it first: iconv -f WINDOWS-1252 -t UTF-8 {source} > {out}")
    return (f"convert it first, e.g. for Chinese data saved as GBK: "
            f"iconv -f GBK -t UTF-8 {source} > {out}")


def _cut_character(encoding: str, tail: bytes) -> bool:
    """Whether ``tail``, the last bytes of a file, is the start of one character cut off
    by the end of the file (a truncated copy, or a stray byte after the last character)."""
    if not 0 < len(tail) < 4:
        return False
    try:
        return codecs.getincrementaldecoder(encoding)().decode(tail, final=False) == ""
    except UnicodeDecodeError:
        return False


def _not_text(source: str, encoding: str, offset: int, head: bytes,
              sample: bytes) -> InputFileError:
    """``head``: the file's first bytes; ``sample``: the bytes from ``offset`` on (to the
    end of the file when it is shorter than :data:`SAMPLE`)."""
    if _cut_character(encoding, sample):
        n = len(sample)
        last = f"last {n} bytes ({sample.hex(' ')} at offset {offset}) are" if n > 1 else \
            f"last byte ({sample.hex()} at offset {offset}) is"
        return InputFileError(
            f"{source}: ends in the middle of a {encoding.upper()} character: its {last} not a "
            f"whole character, so the file was cut short or a stray byte was appended. Remove "
            f"{'them' if n > 1 else 'it'}: truncate -s -{n} {source} (then the rows before it "
            f"are read; a cut-off last row is reported as one reject)")
    fix = _fix(source, head, sample)
    return InputFileError(
        f"{source}: not {encoding.upper()} text (bytes {sample[:2].hex(' ')} at offset "
        f"{offset}); ingest reads {_ENCODINGS_READ}. {fix[0].upper()}{fix[1:]}")


def decode_text(source: str, data: bytes) -> str:
    """Decode a whole text held in memory (see :func:`detect`); an undecodable byte raises
    :class:`InputFileError` naming the file and the ``iconv`` fix."""
    encoding, start = detect(data[:4])
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        raise _not_text(source, encoding, start + exc.start, data[:8],
                        data[start + exc.start:start + exc.start + SAMPLE]) from exc


def first_error(fh: BinaryIO, encoding: str) -> int | None:
    """Offset (from ``fh``'s position) of the first byte that does not decode as
    ``encoding``, None when everything up to the end does; decoded chunk by chunk, so
    memory does not grow with the file. ``fh`` is left where it was."""
    begin = fh.tell()
    decoder = codecs.getincrementaldecoder(encoding)()
    fed = 0
    try:
        while True:
            chunk = fh.read(CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the chunk end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                return fed - pending + exc.start
            if not chunk:
                return None
            fed += len(chunk)
    finally:
        fh.seek(begin)


def check_decodes(source: str, fh: BinaryIO) -> tuple[str, int]:
    """Detect the encoding of the text from ``fh``'s position on and check that all of it
    decodes, raising exactly the error :func:`decode_text` would for the same bytes.

    Returns ``(encoding, position where the text starts after any BOM)``; ``fh`` is left
    at that position.
    """
    base = fh.tell()
    encoding, bom = detect(fh.read(4))
    fh.seek(base + bom)
    bad = first_error(fh, encoding)
    if bad is not None:
        fh.seek(base)
        head = fh.read(8)
        fh.seek(base + bom + bad)
        raise _not_text(source, encoding, bom + bad, head, fh.read(SAMPLE))
    return encoding, base + bom
