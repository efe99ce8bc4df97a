"""AI provenance: the markers AI tools and Content Credentials leave in an image file.

For every evidence image the scorer parses what the file says about its own
origin: C2PA manifests (read offline with c2pa-python), the GB 45438-2025
implicit label, the IPTC DigitalSourceType, generator parameters (Stable
Diffusion, ComfyUI, InvokeAI, NovelAI, Fooocus, Midjourney) and the
Software/CreatorTool of AI editors. A marker is strong evidence; its absence
proves nothing, so a file without markers scores 0.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scorers.base import PreparedImage, Reason, ScoreResult, ScoringInput
from scorers.provenance_parsers import (
    ExifData,
    FileMetadata,
    XmpError,
    XmpProperty,
    decode_user_comment,
    exif_text,
    parse_exif,
    parse_xmp,
    read_metadata,
    xp_text,
)

TC260_NS = "http://www.tc260.org.cn/ns/AIGC/1.0/"
XMP_BASIC_NS = "http://ns.adobe.com/xap/1.0/"
DC_NS = "http://purl.org/dc/elements/1.1/"
TIFF_NS = "http://ns.adobe.com/tiff/1.0/"

# GB 45438-2025 "Label": 1 AI-generated, 2 possibly AI-generated, 3 suspected AI-generated.
LABEL_SCORES = {"1": 0.97, "2": 0.8, "3": 0.7}
LABEL_MEANINGS = {"1": "AI-generated", "2": "possibly AI-generated", "3": "suspected AI-generated"}
UNRECOGNISED_LABEL_SCORE = 0.65  # the label is there but its value is not one the standard defines

# IPTC digital source types that mean generative AI. algorithmicMedia (made by an
# algorithm without training data) and digitalCapture are not among them.
AI_SOURCE_TYPES = {
    "trainedalgorithmicmedia": ("trainedAlgorithmicMedia", 0.95),
    "compositewithtrainedalgorithmicmedia": ("compositeWithTrainedAlgorithmicMedia", 0.92),
    "compositesynthetic": ("compositeSynthetic", 0.8),
}

GENERATOR_SCORE = 0.95
SAMPLER_JSON_SCORE = 0.9  # sampler settings in JSON without a tool name
C2PA_TAMPERED_SCORE = 0.85
C2PA_INGREDIENT_TAMPERED_SCORE = 0.5  # an ingredient's manifest failed, not the file's own
C2PA_UNREADABLE_SCORE = 0.3
C2PA_UNVERIFIABLE_SCORE = 0.4  # read, but failed validation for a reason other than tampering

# Validation codes that say nothing about the content: an expired or unknown
# certificate, or revocation/remote checks we deliberately do not make offline.
C2PA_BENIGN_CODES = frozenset({
    "signingCredential.untrusted",
    "signingCredential.expired",
    "signingCredential.ocsp.skipped",
    "signingCredential.ocsp.inaccessible",
    "signingCredential.ocsp.unknown",
    "timeStamp.untrusted",
    "timeStamp.outsideValidity",
    "claimSignature.outsideValidity",
})
# Failures that mean the content or the claim was changed after signing.
C2PA_TAMPER_CODES = frozenset({
    "claimSignature.missing",
    "claim.missing",
    "claim.multiple",
    "claim.hardBindings.missing",
    "assertion.missing",
    "assertion.multipleHardBindings",
    "assertion.undeclared",
    "assertion.notRedacted",
    "assertion.selfRedacted",
    "signingCredential.revoked",
})

# Reason code -> order among equal scores (strongest kind of evidence first).
CODE_ORDER = {
    "AI_LABEL_IMPLICIT": 0,
    "AI_C2PA_SOURCE_TYPE": 1,
    "AI_IPTC_SOURCE_TYPE": 2,
    "AI_GENERATOR_METADATA": 3,
    "AI_EDITOR_SOFTWARE": 4,
    "C2PA_TAMPERED": 5,
    "C2PA_MANIFEST_UNREADABLE": 6,
}

MAX_EVIDENCE_TEXT = 80
MAX_SETTINGS_LINE = 16384
CACHE_SIZE = 512


@dataclass(frozen=True)
class Finding:
    code: str
    score: float
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


class ProvenanceScorer:
    """Score = the strongest AI or tampering marker found in any evidence image."""

    name = "image.provenance"
    kind = "image"
    pixels_side = 0  # reads the file's metadata, never its pixels

    def __init__(self) -> None:
        self._cache: OrderedDict[str, tuple[Finding, ...]] = OrderedDict()

    def score(self, data: ScoringInput) -> ScoreResult:
        reasons: list[Reason] = []
        for image in data.evidence:
            for finding in self._findings(image):
                evidence = {"image_id": image.image_id, **finding.evidence}
                reasons.append(Reason(finding.code, f"Image {image.image_id}: {finding.message}", finding.score,
                                      evidence))
        reasons.sort(key=lambda r: (-r.score, CODE_ORDER.get(r.code, 99), r.evidence["image_id"]))
        return ScoreResult(max((r.score for r in reasons), default=0.0), tuple(reasons))

    def _findings(self, image: PreparedImage) -> tuple[Finding, ...]:
        key = image.cache_key
        if key and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        findings = inspect_file(image.raw)
        if key:
            self._cache[key] = findings
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return findings


def inspect_file(raw: bytes) -> tuple[Finding, ...]:
    """Every provenance finding for one file, at most one per code (the strongest)."""
    meta = read_metadata(raw)
    xmp: list[XmpProperty] = []
    for packet in meta.xmp_packets:
        try:
            xmp.extend(parse_xmp(packet))
        except XmpError:
            continue  # malformed XMP is common and proves nothing
    exif = parse_exif(meta.exif_tiff)
    texts = _texts(meta, exif)

    found: list[Finding] = []
    found.extend(_implicit_labels(xmp, texts))
    found.extend(_iptc_source_types(xmp))
    found.extend(_generator_metadata(texts, xmp))
    found.extend(_editor_software(xmp, exif, texts))
    if meta.has_c2pa:
        found.extend(_c2pa_findings(raw, meta))

    # A generator named both in its metadata and in the Software tag is one finding, not two.
    generators = {str(f.evidence.get("tool", "")).lower() for f in found if f.code == "AI_GENERATOR_METADATA"}
    found = [f for f in found
             if not (f.code == "AI_EDITOR_SOFTWARE" and str(f.evidence.get("tool", "")).lower() in generators)]
    strongest: dict[str, Finding] = {}
    for finding in found:
        if finding.code not in strongest or finding.score > strongest[finding.code].score:
            strongest[finding.code] = finding
    return tuple(sorted(strongest.values(), key=lambda f: (-f.score, CODE_ORDER.get(f.code, 99))))


def _texts(meta: FileMetadata, exif: ExifData) -> list[tuple[str, str]]:
    """Free-text fields where tools put JSON labels or generation parameters, as (field, text)."""
    texts = list(meta.texts)
    comment = exif.exif_ifd.get(0x9286)
    if comment is not None:
        texts.append(("exif:UserComment", decode_user_comment(comment, exif.little_endian)))
    description = exif_text(exif.ifd0.get(0x010E))
    if description:
        texts.append(("exif:ImageDescription", description))
    xp_comment = xp_text(exif.ifd0.get(0x9C9C))
    if xp_comment:
        texts.append(("exif:XPComment", xp_comment))
    for name, value in meta.iptc_iim.items():
        texts.append((f"iptc:{name}", value))
    return [(where, text) for where, text in texts if text]


def _short(value: Any) -> str:
    text = str(value).strip()
    return text if len(text) <= MAX_EVIDENCE_TEXT else text[: MAX_EVIDENCE_TEXT - 1] + "…"


def _text_key(where: str) -> str:
    return where.partition(":")[2].lower()


# ------------------------------------------------------------------ GB 45438 implicit label

_LABEL_FIELDS = ("label", "contentproducer", "produceid", "reservedcode1", "contentpropagator", "propagateid",
                 "reservedcode2")


def parse_label_json(text: str) -> dict[str, Any] | None:
    """The label object of GB 45438 from JSON that may be HTML-escaped, string-wrapped or under "AIGC"."""
    value: Any = text.strip()
    for _ in range(3):  # unwrap JSON-in-a-string and double escaping, a bounded number of times
        if isinstance(value, str):
            candidate = value.strip()
            if not candidate.startswith(("{", '"', "&")) or len(candidate) > 65536:
                return None
            try:
                value = json.loads(candidate)
            except (ValueError, RecursionError):
                unescaped = html.unescape(candidate)
                if unescaped == candidate:
                    return None
                value = unescaped
            continue
        break
    if not isinstance(value, dict):
        return None
    lowered = {str(k).lower(): v for k, v in value.items()}
    if "aigc" in lowered:
        inner = lowered["aigc"]
        if isinstance(inner, str):
            return parse_label_json(inner)
        if not isinstance(inner, dict):
            return None
        lowered = {str(k).lower(): v for k, v in inner.items()}
    if "label" not in lowered and not {"contentproducer", "produceid"} & lowered.keys():
        return None
    return lowered


def _label_finding(label: dict[str, Any] | None, where: str) -> Finding:
    if label is None:
        return Finding("AI_LABEL_IMPLICIT", UNRECOGNISED_LABEL_SCORE,
                       "carries a GB 45438 AIGC label whose content cannot be read",
                       {"field": where, "label": "unreadable"})
    value = str(label.get("label", "")).strip()
    score = LABEL_SCORES.get(value, UNRECOGNISED_LABEL_SCORE)
    meaning = LABEL_MEANINGS.get(value, "unrecognised label value")
    evidence: dict[str, Any] = {"field": where, "label": _short(value)}
    for key, name in (("contentproducer", "producer"), ("produceid", "produce_id"),
                      ("contentpropagator", "propagator")):
        if label.get(key):
            evidence[name] = _short(label[key])
    producer = f" by producer {evidence['producer']}" if "producer" in evidence else ""
    return Finding("AI_LABEL_IMPLICIT", score,
                   f"carries a GB 45438 implicit label: Label {value or '?'} ({meaning}){producer}", evidence)


def _implicit_labels(xmp: list[XmpProperty], texts: list[tuple[str, str]]) -> Iterator[Finding]:
    # XMP TC260:AIGC, matched by namespace URI (the prefix is the writer's choice).
    fields: dict[str, str] = {}
    for prop in xmp:
        if prop.namespace != TC260_NS:
            continue
        if prop.name.lower() == "aigc":
            yield _label_finding(parse_label_json(prop.value), "xmp:TC260:AIGC")
        elif prop.name.lower() in _LABEL_FIELDS:
            fields[prop.name.lower()] = prop.value  # structured form: one XMP field per label field
    if "label" in fields:
        yield _label_finding(fields, "xmp:TC260:AIGC")
    # Variants seen in the wild: a PNG text chunk "AIGC", or the JSON in EXIF UserComment or another comment.
    for where, text in texts:
        label = parse_label_json(text) if text.lstrip()[:1] in ("{", '"', "&") else None
        if label is not None:
            yield _label_finding(label, where)
        elif _text_key(where) == "aigc":
            yield _label_finding(None, where)


# ------------------------------------------------------------------ IPTC DigitalSourceType


def ai_source_type(value: Any) -> tuple[str, float] | None:
    """The AI source type named by a bare code or a digital-source-type URI, else None."""
    if not isinstance(value, str):
        return None
    code = value.strip().rstrip("/").rsplit("/", 1)[-1].lower()
    return AI_SOURCE_TYPES.get(code)


def _iptc_source_types(xmp: list[XmpProperty]) -> Iterator[Finding]:
    for prop in xmp:
        if prop.name.lower() != "digitalsourcetype":
            continue
        hit = ai_source_type(prop.value)
        if hit:
            source_type, score = hit
            yield Finding("AI_IPTC_SOURCE_TYPE", score * 0.97,  # unsigned XMP: a little below a signed claim
                          f"XMP declares IPTC digital source type {source_type}",
                          {"field": f"xmp:{prop.name}", "source_type": source_type})


# ------------------------------------------------------------------ generator parameters

# Keys are short: bounding them keeps the scan linear on hostile input.
_SD_PAIR = re.compile(r'\s*([A-Za-z][\w \-/.]{0,40}?):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')
_JOB_ID = re.compile(r"Job ID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", re.IGNORECASE)


def parse_sd_parameters(text: str) -> dict[str, str] | None:
    """The settings line of Stable Diffusion WebUI parameters ("Steps: 20, Sampler: ..., Seed: ...")."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    settings_line = next((line for line in reversed(lines) if line.lstrip().startswith("Steps:")), None)
    if settings_line is None or len(settings_line) > MAX_SETTINGS_LINE:
        return None
    pairs = {k.strip(): v.strip().strip('"') for k, v in _SD_PAIR.findall(settings_line)}
    if not pairs.get("Steps", "").isdigit():
        return None
    if not {"Sampler", "CFG scale", "Seed"} & pairs.keys():
        return None
    pairs["prompt"] = lines[0] if lines and not lines[0].lstrip().startswith(("Steps:", "Negative prompt:")) else ""
    return pairs


def _json(text: str) -> Any:
    text = text.strip()
    if not text.startswith(("{", "[")) or len(text) > 4 * 1024 * 1024:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None


def _comfy_nodes(prompt: Any, workflow: Any) -> list[str]:
    """Node class names from a ComfyUI API prompt ({id: {class_type}}) or workflow ({nodes: [{type}]})."""
    classes: list[str] = []
    if isinstance(prompt, dict):
        classes += [str(node["class_type"]) for node in prompt.values()
                    if isinstance(node, dict) and isinstance(node.get("class_type"), str)]
    if not classes and isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list):
        classes += [str(node["type"]) for node in workflow["nodes"]
                    if isinstance(node, dict) and isinstance(node.get("type"), str)]
    return classes


def _generator(tool: str, where: str, message: str, score: float = GENERATOR_SCORE, **evidence: Any) -> Finding:
    clean = {k: (_short(v) if isinstance(v, str) else v) for k, v in evidence.items() if v not in (None, "")}
    return Finding("AI_GENERATOR_METADATA", score, message, {"tool": tool, "field": where, **clean})


def _generator_metadata(texts: list[tuple[str, str]], xmp: list[XmpProperty]) -> Iterator[Finding]:
    by_key = {_text_key(where): (where, text) for where, text in texts if where.startswith("png:")}
    software = by_key.get("software", ("", ""))[1] + " " + by_key.get("source", ("", ""))[1]

    # ComfyUI: "prompt" (API graph) and/or "workflow" (editor graph) as JSON.
    prompt = _json(by_key["prompt"][1]) if "prompt" in by_key else None
    workflow = _json(by_key["workflow"][1]) if "workflow" in by_key else None
    nodes = _comfy_nodes(prompt, workflow)
    if nodes:
        where = "png:prompt" if isinstance(prompt, dict) and "prompt" in by_key else "png:workflow"
        samplers = sorted({n for n in nodes if "sampler" in n.lower()})
        yield _generator("ComfyUI", where, f"carries a ComfyUI workflow ({len(nodes)} nodes)",
                         nodes=len(nodes), sampler=",".join(samplers)[:MAX_EVIDENCE_TEXT],
                         inpaint=any("inpaint" in n.lower() for n in nodes))

    # InvokeAI: JSON metadata chunks (v2 "sd-metadata", v3+ "invokeai_metadata"/"invokeai_graph").
    for key in ("invokeai_metadata", "invokeai_graph", "sd-metadata"):
        if key in by_key and isinstance(_json(by_key[key][1]), dict):
            yield _generator("InvokeAI", by_key[key][0], "carries InvokeAI generation metadata")
            break

    # Fooocus: "fooocus_scheme", or "parameters" as JSON naming Fooocus.
    params_json = _json(by_key["parameters"][1]) if "parameters" in by_key else None
    if "fooocus_scheme" in by_key or (isinstance(params_json, dict) and _names_fooocus(params_json)):
        where = "png:parameters" if isinstance(params_json, dict) else by_key["fooocus_scheme"][0]
        details = params_json if isinstance(params_json, dict) else {}
        yield _generator("Fooocus", where, "carries Fooocus generation parameters",
                         seed=_scalar(details.get("Seed") or details.get("seed")),
                         steps=_scalar(details.get("Steps") or details.get("steps")))

    # NovelAI: Software "NovelAI" and a JSON "Comment" with sampler settings.
    comment = _json(by_key["comment"][1]) if "comment" in by_key else None
    if "novelai" in software.lower():
        details = comment if isinstance(comment, dict) else {}
        yield _generator("NovelAI", "png:Software", "was written by NovelAI",
                         steps=_scalar(details.get("steps")), sampler=_scalar(details.get("sampler")),
                         seed=_scalar(details.get("seed")))
    elif isinstance(comment, dict) and {"steps", "sampler", "seed"} <= {str(k).lower() for k in comment}:
        yield _generator("unknown sampler", "png:Comment", "carries diffusion sampler settings",
                         SAMPLER_JSON_SCORE, steps=_scalar(comment.get("steps")),
                         sampler=_scalar(comment.get("sampler")))

    # Stable Diffusion WebUI (A1111/Forge): "parameters" in PNG, or EXIF UserComment in JPEG/WebP.
    for where, text in texts:
        if "Steps:" not in text:
            continue
        sd = parse_sd_parameters(text)
        if sd:
            yield _generator("Stable Diffusion WebUI", where, "carries Stable Diffusion generation parameters",
                             steps=int(sd["Steps"]), sampler=sd.get("Sampler"), cfg_scale=sd.get("CFG scale"),
                             seed=sd.get("Seed"), model_hash=sd.get("Model hash"),
                             img2img="Denoising strength" in sd, prompt=sd.get("prompt"))
            break

    # Midjourney: "Job ID: <uuid>" in the description it writes (XMP dc:description, PNG Description, IPTC).
    descriptions = [(w, t) for w, t in texts if _text_key(w) in ("description", "comment", "caption",
                                                                 "imagedescription", "usercomment")]
    descriptions += [(f"xmp:{p.name}", p.value) for p in xmp if p.namespace == DC_NS and p.name == "description"]
    for where, text in descriptions:
        match = _JOB_ID.search(text)
        if match:
            yield _generator("Midjourney", where, "carries a Midjourney job ID", job_id=match.group(1))
            break


def _names_fooocus(params: dict[str, Any]) -> bool:
    for key, value in params.items():
        if "fooocus" in str(key).lower() or (isinstance(value, str) and value.lower().startswith("fooocus")):
            return True
    return False


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return value
    return _short(value) if isinstance(value, str) else None


# ------------------------------------------------------------------ AI editors and generators by name

# Tools whose name alone means generative AI.
AI_TOOL_NAMES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
        ("DALL·E", r"\bdall[\s·\-_.]?e\b"),
        ("Midjourney", r"\bmidjourney\b"),
        ("Stable Diffusion", r"\bstable[\s_-]?diffusion\b"),
        ("ComfyUI", r"\bcomfy\s?ui\b"),
        ("Adobe Firefly", r"\bfirefly\b"),
        ("Generative Fill", r"\bgenerative\s+(fill|expand|edit)\b"),
        ("NovelAI", r"\bnovel\s?ai\b"),
        ("InvokeAI", r"\binvoke\s?ai\b"),
        ("Fooocus", r"\bfooocus\b"),
        ("Leonardo.Ai", r"\bleonardo\.?\s?ai\b"),
        ("Ideogram", r"\bideogram\b"),
        ("Jimeng", r"\bjimeng\b|即梦"),
        ("Doubao", r"\bdoubao\b|豆包"),
        ("Tongyi Wanxiang", r"\bwanxiang\b|通义万相"),
    )
)
# Photo editors with both plain and AI features: flagged only when the name says the AI part.
AI_EDITOR_BRANDS = re.compile(r"\b(meitu|hypic|picsart|fotor|canva|photoroom|facetune|pixlr|snapedit)\b|美图|醒图",
                              re.IGNORECASE)
AI_FEATURE = re.compile(r"(?<![a-z])ai(?![a-z])|\bmagic\s+(eraser|edit|editor|expand|fill)\b|\bgenerative\b",
                        re.IGNORECASE)
# A generic "... AI Eraser"-style feature name, whoever makes it.
AI_EDIT_FEATURE = re.compile(
    r"(?<![a-z])ai[\s_-]+(eraser|remover|object remover|replace|fill|expand|inpaint\w*|generat\w*|edit\w*)\b",
    re.IGNORECASE)


def ai_tool_in(software: str) -> tuple[str, float] | None:
    """The AI tool a Software/CreatorTool string names, with a score; None for plain software."""
    for name, pattern in AI_TOOL_NAMES:
        if pattern.search(software):
            return name, 0.9
    brand = AI_EDITOR_BRANDS.search(software)
    if brand and AI_FEATURE.search(software):
        return brand.group(0), 0.85
    if AI_EDIT_FEATURE.search(software):
        return "AI editor", 0.85
    return None


def _software_fields(xmp: list[XmpProperty], exif: ExifData,
                     texts: list[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    yield "exif:Software", exif_text(exif.ifd0.get(0x0131))
    for prop in xmp:
        if (prop.namespace, prop.name) in ((XMP_BASIC_NS, "CreatorTool"), (TIFF_NS, "Software")):
            yield f"xmp:{prop.name}", prop.value
        elif prop.name == "softwareAgent":  # xmpMM:History events
            yield "xmp:History.softwareAgent", prop.value
    for where, text in texts:
        if _text_key(where) in ("software", "originating_program"):
            yield where, text


def _editor_software(xmp: list[XmpProperty], exif: ExifData, texts: list[tuple[str, str]]) -> Iterator[Finding]:
    for where, software in _software_fields(xmp, exif, texts):
        if not software or len(software) > 512:
            continue
        hit = ai_tool_in(software)
        if hit:
            tool, score = hit
            yield Finding("AI_EDITOR_SOFTWARE", score, f"was written by AI software {_short(software)!r}",
                          {"field": where, "software": _short(software), "tool": tool})


# ------------------------------------------------------------------ C2PA

_C2PA_SETTINGS = {
    # Strictly offline: no remote manifests, no OCSP, no network host allowed at all.
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}
_c2pa_context: Any = None

_MIME_BY_CONTAINER = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "tiff": "image/tiff"}


def _context() -> Any:
    """One offline c2pa Context per process, made on first use (the native library is large)."""
    global _c2pa_context
    if _c2pa_context is None:
        import c2pa

        _c2pa_context = c2pa.Context(c2pa.Settings.from_dict(_C2PA_SETTINGS))
    return _c2pa_context


def _mime(raw: bytes, meta: FileMetadata) -> str:
    if meta.container == "bmff":
        return "image/avif" if raw[8:12] in (b"avif", b"avis") else "image/heif"
    return _MIME_BY_CONTAINER.get(meta.container, "")


def read_c2pa_store(raw: bytes, mime: str) -> dict[str, Any] | None:
    """The manifest store as JSON (None when the reader finds none). Raises what the reader raises."""
    import c2pa

    reader = c2pa.Reader.try_create(mime or None, io.BytesIO(raw), context=_context())
    if reader is None:
        return None
    with reader:
        store = json.loads(reader.json())
    return store if isinstance(store, dict) else None


def _c2pa_findings(raw: bytes, meta: FileMetadata) -> list[Finding]:
    try:
        store = read_c2pa_store(raw, _mime(raw, meta))
    except Exception as exc:  # a manifest the reader chokes on is itself a (weak) signal, never a crash
        return [Finding("C2PA_MANIFEST_UNREADABLE", C2PA_UNREADABLE_SCORE,
                        "has a C2PA manifest that cannot be read", {"error": _short(_error_name(exc))})]
    if store is None:
        return [Finding("C2PA_MANIFEST_UNREADABLE", C2PA_UNREADABLE_SCORE,
                        "has a C2PA box but no readable manifest", {"error": "no manifest"})]
    return list(c2pa_store_findings(store))


def _error_name(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def c2pa_store_findings(store: dict[str, Any]) -> Iterator[Finding]:
    """AI source types in any manifest, and tampering in the validation results."""
    active = store.get("active_manifest")
    manifests = store.get("manifests") if isinstance(store.get("manifests"), dict) else {}
    best: tuple[str, float, str, str] | None = None
    for label, manifest in manifests.items():
        if not isinstance(manifest, dict):
            continue
        for assertion in manifest.get("assertions") or []:
            if not isinstance(assertion, dict):
                continue
            base = str(assertion.get("label", "")).split("__", 1)[0]
            if base not in ("c2pa.actions", "c2pa.actions.v2") and not base.startswith("stds.iptc"):
                continue
            for key, value in _walk(assertion.get("data")):
                if not key.lower().endswith("digitalsourcetype"):
                    continue
                hit = ai_source_type(value)
                if hit and (best is None or hit[1] > best[1]):
                    best = (hit[0], hit[1], "active" if label == active else "ingredient", base)
    if best:
        source_type, score, role, assertion_label = best
        where = "the active manifest" if role == "active" else "an ingredient's manifest"
        yield Finding("AI_C2PA_SOURCE_TYPE", score,
                      f"C2PA manifest declares digital source type {source_type} ({where})",
                      {"source_type": source_type, "manifest": role, "assertion": assertion_label})

    active_codes, ingredient_codes = _failure_codes(store)
    tampered = sorted(c for c in active_codes if _is_tamper_code(c))
    other = sorted(c for c in active_codes if c not in C2PA_BENIGN_CODES and not _is_tamper_code(c))
    ingredient_tampered = sorted(c for c in ingredient_codes if _is_tamper_code(c))
    if tampered:
        yield Finding("C2PA_TAMPERED", C2PA_TAMPERED_SCORE,
                      f"C2PA validation failed: {', '.join(tampered)[:120]} (changed after signing)",
                      {"validation_codes": ",".join(tampered)[:MAX_EVIDENCE_TEXT * 2],
                       "validation_state": _short(store.get("validation_state", ""))})
    elif ingredient_tampered:
        yield Finding("C2PA_TAMPERED", C2PA_INGREDIENT_TAMPERED_SCORE,
                      f"an ingredient's C2PA manifest failed validation: {', '.join(ingredient_tampered)[:120]}",
                      {"validation_codes": ",".join(ingredient_tampered)[:MAX_EVIDENCE_TEXT * 2],
                       "manifest": "ingredient"})
    if other:
        yield Finding("C2PA_MANIFEST_UNREADABLE", C2PA_UNVERIFIABLE_SCORE,
                      f"C2PA manifest could not be validated: {', '.join(other)[:120]}",
                      {"validation_codes": ",".join(other)[:MAX_EVIDENCE_TEXT * 2]})


def _is_tamper_code(code: str) -> bool:
    return code not in C2PA_BENIGN_CODES and (code.lower().endswith("mismatch") or code in C2PA_TAMPER_CODES)


def _failure_codes(store: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Failure codes of the active manifest (validation_results and the legacy list) and of ingredients."""
    active: set[str] = set()
    ingredients: set[str] = set()
    results = store.get("validation_results")
    if isinstance(results, dict):
        active.update(_codes(_get(results, "activeManifest", "failure")))
        for delta in results.get("ingredientDeltas") or []:
            ingredients.update(_codes(_get(delta, "validationDeltas", "failure")))
    active.update(_codes(store.get("validation_status")))
    return active, ingredients - active


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _codes(entries: Any) -> set[str]:
    if not isinstance(entries, list):
        return set()
    return {str(e["code"]) for e in entries if isinstance(e, dict) and isinstance(e.get("code"), str)}


def _walk(value: Any, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(key, value) pairs anywhere inside nested JSON, bounded in depth."""
    if depth > 16:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key), item
            yield from _walk(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, depth + 1)
