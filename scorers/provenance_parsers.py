"""Metadata parsers for image files: container walkers, EXIF (TIFF) and XMP.

Each parser reads fields by the container's structure rather than searching
the bytes, is bounded (sizes, counts, nesting) and never raises on malformed
input: what it cannot read it notes in ``FileMetadata.problems`` and moves on.
Pure functions of the bytes; shared by the provenance and capture scorers.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

MAX_TEXT_BYTES = 4 * 1024 * 1024  # one decompressed text chunk / XMP packet
MAX_XMP_PACKETS = 8
MAX_TEXT_CHUNKS = 64
MAX_IFD_ENTRIES = 1024
MAX_XML_DEPTH = 64

RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XML_NS = "http://www.w3.org/XML/1998/namespace"
_SKIP_ATTR_NS = {RDF_NS, XML_NS, "adobe:ns:meta/"}

# The C2PA manifest store is a JUMBF superbox whose description box carries this UUID.
C2PA_JUMD_UUID = b"c2pa\x00\x11\x00\x10\x80\x00\x00\xaa\x00\x38\x9b\x71"
# ISO BMFF (HEIF/AVIF/MP4) carries C2PA in a top-level 'uuid' box with this user type.
C2PA_BMFF_UUID = bytes.fromhex("d8fec3d61b0e483c92975828877ec481")
TIFF_TAG_C2PA = 0xCD41
TIFF_TAG_XMP = 0x02BC
TIFF_TAG_EXIF_IFD = 0x8769

_XMP_JPEG_ID = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXT_JPEG_ID = b"http://ns.adobe.com/xmp/extension/\x00"


@dataclass
class FileMetadata:
    """Everything provenance-relevant that one file carries, still unparsed where it is XML/TIFF."""

    container: str = "other"  # jpeg | png | webp | tiff | bmff | other
    exif_tiff: bytes | None = None  # the TIFF structure of the EXIF block (starts with II* or MM*)
    xmp_packets: list[bytes] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where:key, value), e.g. ("png:parameters", ...)
    iptc_iim: dict[str, str] = field(default_factory=dict)  # IPTC IIM datasets we care about, by name
    has_c2pa: bool = False
    problems: list[str] = field(default_factory=list)


def read_metadata(raw: bytes) -> FileMetadata:
    """Dispatch on the file signature; never raises."""
    meta = FileMetadata()
    try:
        if raw.startswith(b"\xff\xd8"):
            meta.container = "jpeg"
            _read_jpeg(raw, meta)
        elif raw.startswith(b"\x89PNG\r\n\x1a\n"):
            meta.container = "png"
            _read_png(raw, meta)
        elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            meta.container = "webp"
            _read_riff(raw, meta)
        elif raw[:4] in (b"II*\x00", b"MM\x00*"):
            meta.container = "tiff"
            _read_tiff_file(raw, meta)
        elif raw[4:8] == b"ftyp":
            meta.container = "bmff"
            _read_bmff(raw, meta)
        else:
            _read_via_pillow(raw, meta)
    except Exception as exc:  # a parser bug must cost a finding, never the whole score
        meta.problems.append(f"{meta.container}: {type(exc).__name__}")
    return meta


# ------------------------------------------------------------------ containers


def _read_jpeg(raw: bytes, meta: FileMetadata) -> None:
    extended: dict[bytes, dict[int, bytes]] = {}
    pos, end = 2, len(raw)
    while pos + 4 <= end:
        if raw[pos] != 0xFF:
            meta.problems.append("jpeg: marker expected")
            break
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: metadata lies before it
            break
        length = int.from_bytes(raw[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            meta.problems.append("jpeg: segment overruns file")
            break
        payload = raw[pos + 4 : pos + 2 + length]
        if marker == 0xE1:
            if payload[:4] == b"Exif" and meta.exif_tiff is None:
                meta.exif_tiff = payload[6:]
            elif payload.startswith(_XMP_JPEG_ID):
                _add_xmp(meta, payload[len(_XMP_JPEG_ID) :])
            elif payload.startswith(_XMP_EXT_JPEG_ID):
                # Extended XMP: 32-byte GUID, 4-byte full length, 4-byte offset, then a slice of the packet.
                body = payload[len(_XMP_EXT_JPEG_ID) :]
                if len(body) > 40:
                    guid, offset = body[:32], int.from_bytes(body[36:40], "big")
                    extended.setdefault(guid, {})[offset] = body[40:]
        elif marker == 0xEB and _is_c2pa_jumbf(payload, jpeg_app11=True):
            meta.has_c2pa = True
        elif marker == 0xED and payload.startswith(b"Photoshop 3.0\x00"):
            meta.iptc_iim.update(_parse_photoshop_irb(payload[14:]))
        elif marker == 0xFE and len(meta.texts) < MAX_TEXT_CHUNKS:
            meta.texts.append(("jpeg:comment", _decode_text(payload)))
        pos += 2 + length
    for parts in extended.values():
        packet = b"".join(parts[k] for k in sorted(parts))
        _add_xmp(meta, packet)


def _is_c2pa_jumbf(payload: bytes, *, jpeg_app11: bool) -> bool:
    """A JUMBF superbox whose description box names the C2PA manifest store."""
    box = payload
    if jpeg_app11:
        # Common identifier "JP", box instance (2 bytes), packet sequence (4 bytes), then the box.
        if payload[:2] != b"JP" or int.from_bytes(payload[4:8], "big") != 1:
            return False
        box = payload[8:]
    if box[4:8] != b"jumb":
        return False
    head = 16 if int.from_bytes(box[:4], "big") == 1 else 8  # XLBox
    return box[head + 4 : head + 8] == b"jumd" and box[head + 8 : head + 24] == C2PA_JUMD_UUID


def _read_png(raw: bytes, meta: FileMetadata) -> None:
    pos, end = 8, len(raw)
    text_chunks_read = 0
    while pos + 12 <= end:
        length = int.from_bytes(raw[pos : pos + 4], "big")
        ctype = raw[pos + 4 : pos + 8]
        if length > end - pos - 12:
            meta.problems.append("png: chunk overruns file")
            break
        data = raw[pos + 8 : pos + 8 + length]
        if ctype in (b"tEXt", b"zTXt", b"iTXt") and text_chunks_read < MAX_TEXT_CHUNKS:
            text_chunks_read += 1  # bounded: each may inflate up to MAX_TEXT_BYTES
            chunk = _png_text(ctype, data)
            if chunk is None:
                meta.problems.append(f"png: unreadable {ctype.decode()}")
            else:
                key, value = chunk
                if key == "XML:com.adobe.xmp":
                    _add_xmp(meta, value.encode("utf-8"))
                elif key.startswith("Raw profile type "):
                    _imagemagick_profile(meta, key, value)
                else:
                    meta.texts.append((f"png:{key}", value))
        elif ctype == b"eXIf" and meta.exif_tiff is None:
            meta.exif_tiff = data[6:] if data.startswith(b"Exif\x00") else data
        elif ctype == b"caBX" and _is_c2pa_jumbf(data, jpeg_app11=False):
            meta.has_c2pa = True
        elif ctype == b"IEND":
            break
        pos += 12 + length


def _png_text(ctype: bytes, data: bytes) -> tuple[str, str] | None:
    key_end = data.find(b"\x00")
    if key_end < 1 or key_end > 79:
        return None
    key = data[:key_end].decode("latin-1")
    rest = data[key_end + 1 :]
    if ctype == b"tEXt":
        return key, rest.decode("latin-1")
    if ctype == b"zTXt":
        text = _inflate(rest[1:]) if rest[:1] == b"\x00" else None
        return None if text is None else (key, text.decode("latin-1"))
    # iTXt: compression flag, method, language\0, translated keyword\0, text (UTF-8)
    if len(rest) < 2:
        return None
    compressed = rest[0] == 1
    lang_end = rest.find(b"\x00", 2)
    trans_end = rest.find(b"\x00", lang_end + 1) if lang_end >= 0 else -1
    if trans_end < 0:
        return None
    body = rest[trans_end + 1 :]
    if compressed:
        inflated = _inflate(body)
        if inflated is None:
            return None
        body = inflated
    return key, body.decode("utf-8", "replace")


def _inflate(data: bytes) -> bytes | None:
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, MAX_TEXT_BYTES)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out  # over the limit: a decompression bomb


def _imagemagick_profile(meta: FileMetadata, key: str, value: str) -> None:
    """ImageMagick stores profiles as '\\nname\\n   length\\nhex...' text chunks."""
    lines = value.strip().split("\n", 2)
    if len(lines) < 3:
        return
    try:
        blob = bytes.fromhex("".join(lines[2].split()))
    except ValueError:
        meta.problems.append(f"png: bad {key}")
        return
    kind = key.removeprefix("Raw profile type ").lower()
    if kind in ("exif", "app1") and blob.startswith(b"Exif") and meta.exif_tiff is None:
        meta.exif_tiff = blob[6:]
    elif kind == "xmp":
        _add_xmp(meta, blob)


def _read_riff(raw: bytes, meta: FileMetadata) -> None:
    pos, end = 12, min(len(raw), 8 + int.from_bytes(raw[4:8], "little"))
    while pos + 8 <= end:
        ctype = raw[pos : pos + 4]
        length = int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if length > end - pos - 8:
            meta.problems.append("riff: chunk overruns file")
            break
        data = raw[pos + 8 : pos + 8 + length]
        if ctype == b"EXIF" and meta.exif_tiff is None:
            meta.exif_tiff = data[6:] if data.startswith(b"Exif\x00") else data
        elif ctype == b"XMP ":
            _add_xmp(meta, data)
        elif ctype == b"C2PA":
            meta.has_c2pa = True
        pos += 8 + length + (length & 1)


def _read_tiff_file(raw: bytes, meta: FileMetadata) -> None:
    meta.exif_tiff = raw
    exif = parse_exif(raw)
    xmp = exif.ifd0.get(TIFF_TAG_XMP)
    if isinstance(xmp, bytes | str):
        _add_xmp(meta, xmp if isinstance(xmp, bytes) else xmp.encode("utf-8"))
    meta.has_c2pa = TIFF_TAG_C2PA in exif.ifd0


def _read_bmff(raw: bytes, meta: FileMetadata) -> None:
    """HEIF/AVIF: look for the top-level C2PA box; EXIF/XMP items come from Pillow when it can open the file."""
    pos, end = 0, len(raw)
    for _ in range(256):
        if pos + 8 > end:
            break
        size = int.from_bytes(raw[pos : pos + 4], "big")
        btype = raw[pos + 4 : pos + 8]
        head = 8
        if size == 1:
            size, head = int.from_bytes(raw[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < head:
            meta.problems.append("bmff: bad box size")
            break
        if btype == b"uuid" and raw[pos + head : pos + head + 16] == C2PA_BMFF_UUID:
            meta.has_c2pa = True
        pos += size
    _read_via_pillow(raw, meta)


def _read_via_pillow(raw: bytes, meta: FileMetadata) -> None:
    """Formats without a walker here (GIF, AVIF, ...): Pillow reads their headers without decoding pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(raw))
            info = dict(img.info)
    except Exception:
        meta.problems.append("pillow: cannot open")
        return
    exif = info.get("exif")
    if isinstance(exif, bytes) and meta.exif_tiff is None:
        meta.exif_tiff = exif[6:] if exif.startswith(b"Exif") else exif
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if isinstance(xmp, bytes):
        _add_xmp(meta, xmp)


def _add_xmp(meta: FileMetadata, packet: bytes) -> None:
    if len(meta.xmp_packets) < MAX_XMP_PACKETS and packet.strip():
        meta.xmp_packets.append(packet[:MAX_TEXT_BYTES])


# ------------------------------------------------------------------ IPTC IIM (Photoshop APP13)

_IIM_NAMES = {(2, 120): "caption", (2, 65): "originating_program", (2, 5): "object_name"}


def _parse_photoshop_irb(data: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    pos = 0
    while pos + 12 <= len(data) and data[pos : pos + 4] == b"8BIM":
        resource_id = int.from_bytes(data[pos + 4 : pos + 6], "big")
        name_len = data[pos + 6]
        pos += 7 + name_len + ((name_len + 1) & 1)  # Pascal string padded to even length
        size = int.from_bytes(data[pos : pos + 4], "big")
        block = data[pos + 4 : pos + 4 + size]
        pos += 4 + size + (size & 1)
        if resource_id == 0x0404:
            found.update(_parse_iim(block))
    return found


def _parse_iim(block: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    pos = 0
    while pos + 5 <= len(block) and block[pos] == 0x1C:
        record, dataset = block[pos + 1], block[pos + 2]
        size = int.from_bytes(block[pos + 3 : pos + 5], "big")
        if size & 0x8000:  # extended dataset: not used by the fields we read
            break
        name = _IIM_NAMES.get((record, dataset))
        if name:
            found[name] = _decode_text(block[pos + 5 : pos + 5 + size])
        pos += 5 + size
    return found


# ------------------------------------------------------------------ EXIF / TIFF

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}


@dataclass
class ExifData:
    ifd0: dict[int, Any] = field(default_factory=dict)
    exif_ifd: dict[int, Any] = field(default_factory=dict)
    ifd1: dict[int, Any] = field(default_factory=dict)
    tiff: bytes = b""
    little_endian: bool = True

    def thumbnail_jpeg(self) -> bytes | None:
        """The JPEG thumbnail stored in IFD1, if its offsets stay inside the block."""
        offset, length = self.ifd1.get(0x0201), self.ifd1.get(0x0202)
        if not (isinstance(offset, int) and isinstance(length, int)) or length <= 0:
            return None
        if offset + length > len(self.tiff):
            return None
        blob = self.tiff[offset : offset + length]
        return blob if blob.startswith(b"\xff\xd8") else None


def parse_exif(tiff: bytes | None) -> ExifData:
    """IFD0, the Exif sub-IFD and IFD1 of a TIFF structure; malformed parts are skipped."""
    exif = ExifData(tiff=tiff or b"")
    if not tiff or len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return exif
    exif.little_endian = tiff[:2] == b"II"
    order = "<" if exif.little_endian else ">"
    try:
        first = struct.unpack_from(order + "I", tiff, 4)[0]
        exif.ifd0, next_ifd = _read_ifd(tiff, first, order)
        pointer = exif.ifd0.get(TIFF_TAG_EXIF_IFD)
        if isinstance(pointer, int) and pointer != first:
            exif.exif_ifd, _ = _read_ifd(tiff, pointer, order)
        if next_ifd and next_ifd != first:
            exif.ifd1, _ = _read_ifd(tiff, next_ifd, order)
    except (struct.error, ValueError):
        pass  # keep whatever was read before the damage
    return exif


def _read_ifd(tiff: bytes, offset: int, order: str) -> tuple[dict[int, Any], int]:
    if offset < 8 or offset + 2 > len(tiff):
        return {}, 0
    count = struct.unpack_from(order + "H", tiff, offset)[0]
    if count > MAX_IFD_ENTRIES:
        return {}, 0
    tags: dict[int, Any] = {}
    for i in range(count):
        entry = offset + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        tag, typ, n = struct.unpack_from(order + "HHI", tiff, entry)
        size = _TYPE_SIZES.get(typ)
        if size is None or n > len(tiff):
            continue
        total = size * n
        where = entry + 8 if total <= 4 else struct.unpack_from(order + "I", tiff, entry + 8)[0]
        if where + total > len(tiff):
            continue
        tags[tag] = _tiff_value(tiff[where : where + total], typ, n, order)
    after = offset + 2 + 12 * count
    next_ifd = struct.unpack_from(order + "I", tiff, after)[0] if after + 4 <= len(tiff) else 0
    return tags, next_ifd


def _tiff_value(blob: bytes, typ: int, n: int, order: str) -> Any:
    if typ == 2:  # ASCII
        return blob.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    if typ in (1, 7, 6):  # BYTE / UNDEFINED / SBYTE: raw bytes (UserComment, XMP in TIFF, ...)
        return blob
    codes = {3: "H", 4: "I", 8: "h", 9: "i", 11: "f", 12: "d", 13: "I"}
    if typ in codes:
        values = struct.unpack(order + codes[typ] * n, blob)
        return values[0] if n == 1 else values
    if typ in (5, 10):  # RATIONAL / SRATIONAL
        code = "I" if typ == 5 else "i"
        pairs = struct.unpack(order + code * (2 * n), blob)
        values = tuple(a / b if b else 0.0 for a, b in zip(pairs[::2], pairs[1::2], strict=True))
        return values[0] if n == 1 else values
    return blob


def decode_user_comment(value: Any, little_endian: bool = True) -> str:
    """EXIF UserComment: an 8-byte character-code header, then the text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or len(value) < 8:
        return ""
    header, body = value[:8], value[8:]
    if header.startswith(b"UNICODE"):
        return _decode_utf16(body, little_endian)
    if header.startswith(b"JIS"):
        return body.decode("shift_jis", "replace").rstrip("\x00 ")
    # ASCII, or the all-zero "undefined" code that tools use for UTF-8
    return body.decode("utf-8", "replace").rstrip("\x00 ")


def _decode_utf16(body: bytes, little_endian: bool) -> str:
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return body.decode("utf-16", "replace").rstrip("\x00 ")
    body = body[: len(body) & ~1]
    # The spec says the TIFF byte order; writers disagree. ASCII-range text has its
    # zero bytes on the high side, which tells the order apart.
    zeros_even = body[0::2].count(0)
    zeros_odd = body[1::2].count(0)
    if zeros_even != zeros_odd:
        little_endian = zeros_odd > zeros_even
    return body.decode("utf-16-le" if little_endian else "utf-16-be", "replace").rstrip("\x00 ")


def exif_text(value: Any) -> str:
    """An EXIF ASCII or byte value as text (XP* tags are UTF-16LE bytes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return _decode_text(value)
    return ""


def xp_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-16-le", "replace").rstrip("\x00 ")
    if isinstance(value, tuple):  # some writers use BYTE arrays read as ints
        return bytes(v & 0xFF for v in value).decode("utf-16-le", "replace").rstrip("\x00 ")
    return ""


def _decode_text(blob: bytes) -> str:
    try:
        return blob.decode("utf-8").rstrip("\x00 ")
    except UnicodeDecodeError:
        return blob.decode("latin-1").rstrip("\x00 ")


# ------------------------------------------------------------------ XMP


class XmpError(ValueError):
    """An XMP packet that is refused (DOCTYPE/ENTITY) or is not well-formed XML."""


@dataclass(frozen=True)
class XmpProperty:
    namespace: str
    name: str  # local name
    value: str
    path: tuple[str, ...] = ()  # enclosing property local names, outermost first


_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_xmp(packet: bytes) -> list[XmpProperty]:
    """Flatten an XMP packet into (namespace, name, value) triples.

    Attribute-form and element-form properties both appear; array items
    (rdf:li) and ``rdf:resource`` values are reported under their property.
    A DOCTYPE or ENTITY declaration is refused outright: XMP never needs one,
    and entity expansion is how XML bombs work.
    """
    if len(packet) > MAX_TEXT_BYTES:
        raise XmpError("packet too large")
    if _DOCTYPE.search(packet):
        raise XmpError("DOCTYPE/ENTITY declarations are not allowed in XMP")
    body = _strip_xpacket(packet)
    try:
        parser = ElementTree.XMLParser()
        parser.feed(body)
        root = parser.close()
    except ElementTree.ParseError as exc:
        raise XmpError(f"not well-formed: {exc}") from exc
    found: list[XmpProperty] = []
    _walk_xmp(root, None, (), found, 0)
    return found


def _strip_xpacket(packet: bytes) -> bytes:
    start = packet.find(b"<?xpacket begin")
    if start >= 0:
        close = packet.find(b"?>", start)
        packet = packet[close + 2 :] if close >= 0 else packet
    end = packet.rfind(b"<?xpacket end")
    if end >= 0:
        packet = packet[:end]
    return packet.strip(b" \t\r\n\x00")


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def _walk_xmp(
    element: ElementTree.Element,
    owner: tuple[str, str] | None,
    path: tuple[str, ...],
    found: list[XmpProperty],
    depth: int,
) -> None:
    """``owner`` is the nearest enclosing property element: rdf:li / rdf:value text belongs to it."""
    if depth > MAX_XML_DEPTH or not isinstance(element.tag, str):
        return
    ns, local = _split(element.tag)
    is_syntax = ns in (RDF_NS, "adobe:ns:meta/")
    if is_syntax:  # rdf:RDF, rdf:Description, rdf:Seq/Bag/Alt, rdf:li, x:xmpmeta
        child_owner, child_path = owner, path
    else:
        child_owner, child_path = (ns, local), (*path, local)
    for key, value in element.attrib.items():
        attr_ns, attr_local = _split(key)
        if attr_ns == RDF_NS and attr_local == "resource" and child_owner:
            found.append(XmpProperty(child_owner[0], child_owner[1], value.strip(), path))
        elif attr_ns and attr_ns not in _SKIP_ATTR_NS:
            found.append(XmpProperty(attr_ns, attr_local, value.strip(), child_path))
    text = (element.text or "").strip()
    if text and len(element) == 0 and child_owner and (not is_syntax or local in ("li", "value")):
        found.append(XmpProperty(child_owner[0], child_owner[1], text, path))
    for child in element:
        _walk_xmp(child, child_owner, child_path, found, depth + 1)
