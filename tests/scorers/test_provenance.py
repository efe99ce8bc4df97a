"""image.provenance: AI markers and C2PA state parsed from the evidence files themselves."""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import zlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from scorers import provenance
from scorers.base import RequestFacts, ScoreResult, ScoringInput
from scorers.prepare import prepare_image
from scorers.provenance import ProvenanceScorer, c2pa_store_findings, parse_label_json, parse_sd_parameters

C2PA_DIR = Path(__file__).resolve().parents[1] / "data" / "c2pa"
TC260 = "http://www.tc260.org.cn/ns/AIGC/1.0/"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
DST = "http://cv.iptc.org/newscodes/digitalsourcetype/"
UUID = "0b4ad1e2-7f3c-4d6e-9a8b-1c2d3e4f5a6b"
AI_CODES = {"AI_LABEL_IMPLICIT", "AI_C2PA_SOURCE_TYPE", "AI_IPTC_SOURCE_TYPE", "AI_GENERATOR_METADATA",
            "AI_EDITOR_SOFTWARE"}
T0 = dt.datetime(2026, 9, 10, 12, 0, tzinfo=dt.UTC)


# ------------------------------------------------------------------ helpers


def request() -> RequestFacts:
    return RequestFacts(
        refund_id="RF-1", order_id="OD-1", buyer_id="BY-1", merchant_id="MC-1", requested_at=T0,
        kind="refund_only", reason="damaged", amount=Decimal("99.00"), currency="CNY",
        placed_at=T0 - dt.timedelta(days=5), delivered_at=T0 - dt.timedelta(days=1),
        account_created_at=T0 - dt.timedelta(days=400),
    )


def score(*raws: bytes) -> ScoreResult:
    images = tuple(prepare_image(raw, image_id=f"IMG-{i}", role="evidence") for i, raw in enumerate(raws))
    return ProvenanceScorer().score(ScoringInput(request(), images))


def codes(result: ScoreResult) -> list[str]:
    return [r.code for r in result.reasons]


def reason(result: ScoreResult, code: str) -> Any:
    matches = [r for r in result.reasons if r.code == code]
    assert matches, f"no {code} in {codes(result)}"
    return matches[0]


def photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def encode(fmt: str, *, xmp: bytes | None = None, exif: Image.Exif | None = None,
           text: dict[str, str] | None = None, ztext: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, Any] = {}
    if exif is not None:
        kw["exif"] = exif
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        for key, value in (ztext or {}).items():
            info.add_text(key, value, zip=True)
        if xmp is not None:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=True)
        photo().save(buf, "PNG", pnginfo=info, **kw)
    else:
        if xmp is not None:
            kw["xmp"] = xmp
        photo().save(buf, fmt, quality=90, **kw)
    return buf.getvalue()


def xmp_packet(description: str, namespaces: str = "") -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" {namespaces}>{description}</rdf:Description>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def label_json(label: str = "1", producer: str = "001191110102MACQD9K64010000") -> str:
    return json.dumps({"Label": label, "ContentProducer": producer, "ProduceID": "a1b2c3d4e5f60718",
                       "ReservedCode1": "", "ContentPropagator": "", "PropagateID": "", "ReservedCode2": ""},
                      separators=(",", ":"))


def tc260_attribute(value: str, prefix: str = "TC260", ns: str = TC260) -> bytes:
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:{prefix}="{ns}" {prefix}:AIGC="{html.escape(value)}"/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return packet.encode("utf-8")


def tc260_element(value: str) -> bytes:
    return xmp_packet(f"<TC260:AIGC>{html.escape(value)}</TC260:AIGC>", f'xmlns:TC260="{TC260}"')


def exif_with(ifd0: dict[int, Any] | None = None, exif_ifd: dict[int, Any] | None = None) -> Image.Exif:
    exif = Image.Exif()
    for tag, value in (ifd0 or {}).items():
        exif[tag] = value
    sub = exif.get_ifd(0x8769)
    for tag, value in (exif_ifd or {}).items():
        sub[tag] = value
    return exif


def camera_exif() -> Image.Exif:
    return exif_with({0x010F: "Apple", 0x0110: "iPhone 15", 0x0131: "17.4.1"}, {0x9003: "2026:09:10 08:00:00"})


# ------------------------------------------------------------------ C2PA fixtures (real Content Credentials)


@pytest.mark.parametrize("name", ["C.jpg", "CA.jpg"])
def test_valid_c2pa_without_ai_source_scores_low(name: str) -> None:
    result = score((C2PA_DIR / name).read_bytes())
    assert result.score < 0.3
    assert not AI_CODES & set(codes(result))
    assert "C2PA_TAMPERED" not in codes(result)


@pytest.mark.parametrize(("name", "code"), [("XCA.jpg", "assertion.dataHash.mismatch"),
                                            ("E-sig-CA.jpg", "claimSignature.mismatch")])
def test_tampered_c2pa_is_reported(name: str, code: str) -> None:
    result = score((C2PA_DIR / name).read_bytes())
    tampered = reason(result, "C2PA_TAMPERED")
    assert result.score >= 0.8
    assert code in tampered.evidence["validation_codes"]
    # an untrusted test certificate is not what makes it tampered
    assert "signingCredential.untrusted" not in tampered.evidence["validation_codes"]
    assert not AI_CODES & set(codes(result))


def test_file_without_manifest_scores_zero_and_never_calls_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any) -> None:
        raise AssertionError("the c2pa reader must not run on a file without a C2PA box")

    monkeypatch.setattr(provenance, "read_c2pa_store", fail)
    result = score((C2PA_DIR / "IMG_0003.jpg").read_bytes(), encode("JPEG", exif=camera_exif()), encode("PNG"))
    assert result.score == 0.0
    assert result.reasons == ()


def test_corrupt_manifest_is_a_weak_signal_not_a_crash() -> None:
    raw = bytearray((C2PA_DIR / "C.jpg").read_bytes())
    at = raw.find(b"jumb") + 100  # inside the manifest store's first boxes
    raw[at : at + 16] = bytes(b ^ 0xFF for b in raw[at : at + 16])
    result = score(bytes(raw))
    assert codes(result) == ["C2PA_MANIFEST_UNREADABLE"]
    assert 0.0 < result.score < 0.6


def test_reader_exception_becomes_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: Any) -> None:
        raise RuntimeError("native library failure")

    monkeypatch.setattr(provenance, "read_c2pa_store", explode)
    result = score((C2PA_DIR / "C.jpg").read_bytes())
    assert codes(result) == ["C2PA_MANIFEST_UNREADABLE"]
    assert "RuntimeError" in result.reasons[0].evidence["error"]


@pytest.mark.parametrize("key", ["verify.remote_manifest_fetch", "verify.ocsp_fetch", "core.allowed_network_hosts"])
def test_offline_settings_name_real_c2pa_settings(key: str) -> None:
    # c2pa ignores unknown keys silently; a known key rejects a value of the wrong type.
    c2pa = pytest.importorskip("c2pa")
    section, name = key.split(".")
    assert name in provenance._C2PA_SETTINGS[section]
    with pytest.raises(Exception, match=r"(?i)invalid type|bad parameter"):
        c2pa.Settings.from_dict({section: {name: {"not": "valid"}}})
    assert provenance._C2PA_SETTINGS["verify"]["remote_manifest_fetch"] is False
    assert provenance._C2PA_SETTINGS["verify"]["ocsp_fetch"] is False


# ------------------------------------------------------------------ C2PA signed here


def _signer_pems() -> tuple[bytes, bytes]:
    """A throw-away ES256 CA and signing certificate (C2PA refuses self-signed leaf certificates)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "refundguard tests")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "refundguard tests")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                         crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf = cert("test signer", key, "test CA", ca_key, ca=False)
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, private


@pytest.fixture(scope="module")
def sign() -> Any:
    c2pa = pytest.importorskip("c2pa")
    chain, private = _signer_pems()
    context = c2pa.Context(c2pa.Settings.from_dict({"verify": {"verify_after_sign": False}}))

    def _sign(source: bytes, mime: str, actions: list[dict[str, Any]], label: str = "c2pa.actions.v2",
              ingredient: bytes | None = None) -> bytes:
        manifest = {"claim_generator_info": [{"name": "refundguard-tests", "version": "1"}],
                    "assertions": [{"label": label, "data": {"actions": actions}}]}
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, private, None))
        with c2pa.Builder(manifest, context=context) as builder:
            if ingredient is not None:
                builder.add_ingredient({"title": "parent.jpg", "relationship": "parentOf"}, "image/jpeg",
                                       io.BytesIO(ingredient))
            out = io.BytesIO()
            builder.sign(signer, mime, io.BytesIO(source), out)
        return out.getvalue()

    return _sign


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("source_type", [f"{DST}trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"])
def test_signed_ai_source_type_is_found(sign: Any, fmt: str, source_type: str) -> None:
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    signed = sign(encode(fmt), mime, [{"action": "c2pa.created", "digitalSourceType": source_type}])
    result = score(signed)
    found = reason(result, "AI_C2PA_SOURCE_TYPE")
    assert found.evidence["source_type"] == source_type.rsplit("/", 1)[-1]
    assert found.evidence["manifest"] == "active"
    assert result.score >= 0.9
    assert "C2PA_TAMPERED" not in codes(result)  # an untrusted signer alone is not tampering


def test_ai_source_type_in_an_ingredient_manifest_is_found(sign: Any) -> None:
    generated = sign(encode("JPEG"), "image/jpeg",
                     [{"action": "c2pa.created", "digitalSourceType": f"{DST}trainedAlgorithmicMedia"}])
    edited = sign(encode("JPEG"), "image/jpeg",
                  [{"action": "c2pa.opened", "parameters": {"name": "parent"}},
                   {"action": "c2pa.color_adjustments"}], ingredient=generated)
    found = reason(score(edited), "AI_C2PA_SOURCE_TYPE")
    assert found.evidence["manifest"] == "ingredient"


def test_algorithmic_media_and_digital_capture_are_not_ai(sign: Any) -> None:
    for source_type in ("algorithmicMedia", "digitalCapture"):
        signed = sign(encode("JPEG"), "image/jpeg",
                      [{"action": "c2pa.created", "digitalSourceType": f"{DST}{source_type}"}])
        assert score(signed).score < 0.3


def test_pixels_changed_after_signing_is_tampering(sign: Any) -> None:
    signed = bytearray(sign(encode("JPEG"), "image/jpeg", [{"action": "c2pa.created",
                                                            "digitalSourceType": f"{DST}digitalCapture"}]))
    signed[-40] ^= 0xFF  # inside the entropy-coded scan, after the manifest
    result = score(bytes(signed))
    assert "assertion.dataHash.mismatch" in reason(result, "C2PA_TAMPERED").evidence["validation_codes"]


def test_store_findings_ignore_untrusted_and_expired_certificates() -> None:
    store = {
        "active_manifest": "m1",
        "manifests": {"m1": {"assertions": [{"label": "c2pa.actions", "data": {"actions": [
            {"action": "c2pa.created", "digitalSourceType": f"{DST}algorithmicMedia"}]}}]}},
        "validation_results": {"activeManifest": {"failure": [{"code": "signingCredential.untrusted"},
                                                              {"code": "signingCredential.expired"}]}},
    }
    assert list(c2pa_store_findings(store)) == []
    store["validation_results"]["activeManifest"]["failure"].append({"code": "assertion.bmffHash.mismatch"})
    assert [f.code for f in c2pa_store_findings(store)] == ["C2PA_TAMPERED"]


def test_store_findings_read_v1_actions_and_composite_synthetic() -> None:
    store = {"active_manifest": "m1", "manifests": {"m1": {"assertions": [
        {"label": "c2pa.actions__1", "data": {"actions": [{"action": "c2pa.edited",
                                                           "digitalSourceType": "compositeSynthetic"}]}}]}}}
    found = list(c2pa_store_findings(store))
    assert [f.code for f in found] == ["AI_C2PA_SOURCE_TYPE"]
    assert found[0].evidence["source_type"] == "compositeSynthetic"


# ------------------------------------------------------------------ GB 45438 implicit label


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("form", ["attribute", "element"])
def test_tc260_xmp_label_in_every_container(fmt: str, form: str) -> None:
    packet = tc260_attribute(label_json()) if form == "attribute" else tc260_element(label_json())
    result = score(encode(fmt, xmp=packet))
    found = reason(result, "AI_LABEL_IMPLICIT")
    assert result.score >= 0.95
    assert found.evidence["producer"] == "001191110102MACQD9K64010000"
    assert found.evidence["produce_id"] == "a1b2c3d4e5f60718"
    assert found.evidence["field"] == "xmp:TC260:AIGC"
    assert codes(result)[0] == "AI_LABEL_IMPLICIT"


def test_label_values_rank_generated_above_possible_above_suspected() -> None:
    scores = [score(encode("JPEG", xmp=tc260_attribute(label_json(v)))).score for v in ("1", "2", "3")]
    assert scores[0] > scores[1] > scores[2] >= 0.6


def test_label_matched_by_namespace_not_prefix() -> None:
    assert reason(score(encode("JPEG", xmp=tc260_attribute(label_json(), prefix="aigc"))), "AI_LABEL_IMPLICIT")
    other_ns = tc260_attribute(label_json(), prefix="TC260", ns="http://example.com/not-tc260/")
    assert score(encode("JPEG", xmp=other_ns)).score == 0.0


def test_double_escaped_and_wrapped_label_json() -> None:
    wrapped = json.dumps({"AIGC": json.loads(label_json("2"))})
    double_escaped = html.escape(wrapped)  # escaped once by the writer, once more by tc260_element
    result = score(encode("PNG", xmp=tc260_element(double_escaped)))
    assert reason(result, "AI_LABEL_IMPLICIT").evidence["label"] == "2"


def test_parse_label_json_variants() -> None:
    assert parse_label_json(label_json("3"))["label"] == "3"
    assert parse_label_json(json.dumps(json.dumps({"AIGC": {"Label": "1"}})))["label"] == "1"
    assert parse_label_json('{"AIGC": "{\\"Label\\": \\"2\\"}"}')["label"] == "2"
    assert parse_label_json('{"prompt": "a cat"}') is None
    assert parse_label_json("not json") is None


@pytest.mark.parametrize("compressed", [False, True])
def test_png_aigc_text_chunk(compressed: bool) -> None:
    value = json.dumps({"AIGC": json.loads(label_json())})
    raw = encode("PNG", ztext={"AIGC": value}) if compressed else encode("PNG", text={"AIGC": value})
    found = reason(score(raw), "AI_LABEL_IMPLICIT")
    assert found.evidence["field"] == "png:AIGC"


@pytest.mark.parametrize(("header", "encoding"), [(b"ASCII\x00\x00\x00", "ascii"),
                                                  (b"UNICODE\x00", "utf-16-be"),
                                                  (b"UNICODE\x00", "utf-16-le")])
def test_exif_user_comment_label(header: bytes, encoding: str) -> None:
    comment = header + json.dumps({"AIGC": json.loads(label_json("1"))}).encode(encoding)
    result = score(encode("JPEG", exif=exif_with(exif_ifd={0x9286: comment})))
    assert reason(result, "AI_LABEL_IMPLICIT").evidence["field"] == "exif:UserComment"
    assert result.score >= 0.95


# ------------------------------------------------------------------ IPTC DigitalSourceType


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_iptc_ai_source_type(fmt: str) -> None:
    resource = xmp_packet(f'<Iptc4xmpExt:DigitalSourceType rdf:resource="{DST}trainedAlgorithmicMedia"/>',
                          f'xmlns:Iptc4xmpExt="{IPTC_EXT}"')
    result = score(encode(fmt, xmp=resource))
    assert reason(result, "AI_IPTC_SOURCE_TYPE").evidence["source_type"] == "trainedAlgorithmicMedia"
    assert result.score >= 0.9

    plus = xmp_packet("", 'xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" '
                          'plus:DigitalSourceType="compositeWithTrainedAlgorithmicMedia"')
    assert reason(score(encode(fmt, xmp=plus)), "AI_IPTC_SOURCE_TYPE")


@pytest.mark.parametrize("value", ["digitalCapture", f"{DST}digitalCapture", f"{DST}algorithmicMedia",
                                   "computationalCapture"])
def test_iptc_non_ai_source_types_do_not_fire(value: str) -> None:
    packet = xmp_packet(f"<Iptc4xmpExt:DigitalSourceType>{value}</Iptc4xmpExt:DigitalSourceType>",
                        f'xmlns:Iptc4xmpExt="{IPTC_EXT}"')
    assert score(encode("JPEG", xmp=packet)).score == 0.0


# ------------------------------------------------------------------ generator metadata

SD_TEXT = ("photo of a cracked product, realistic damage\nNegative prompt: blurry, lowres\n"
           "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 1234567, Size: 1024x1024, "
           'Model hash: 31e35c80fc, Denoising strength: 0.45, Lora hashes: "a: 1, b: 2", Version: v1.10.1')


def test_sd_webui_parameters_png() -> None:
    result = score(encode("PNG", text={"parameters": SD_TEXT}))
    found = reason(result, "AI_GENERATOR_METADATA")
    assert found.evidence["tool"] == "Stable Diffusion WebUI"
    assert found.evidence["steps"] == 25
    assert found.evidence["seed"] == "1234567"
    assert found.evidence["img2img"] is True
    assert len(found.evidence["prompt"]) <= 80
    assert result.score >= 0.9


def test_sd_webui_parameters_in_jpeg_user_comment() -> None:
    comment = b"UNICODE\x00" + SD_TEXT.encode("utf-16-be")
    found = reason(score(encode("JPEG", exif=exif_with(exif_ifd={0x9286: comment}))), "AI_GENERATOR_METADATA")
    assert found.evidence["field"] == "exif:UserComment"


def test_parse_sd_parameters_requires_the_settings_line() -> None:
    assert parse_sd_parameters(SD_TEXT)["CFG scale"] == "6"
    assert parse_sd_parameters("Steps: to take when the parcel arrives, Sampler: none") is None
    assert parse_sd_parameters("a cat on a mat") is None
    assert score(encode("PNG", text={"parameters": "exposure +0.3, contrast 10"})).score == 0.0


def test_comfyui_prompt_and_workflow() -> None:
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 28}},
              "11": {"class_type": "VAEEncodeForInpaint", "inputs": {}}}
    found = reason(score(encode("PNG", text={"prompt": json.dumps(prompt)})), "AI_GENERATOR_METADATA")
    assert found.evidence["tool"] == "ComfyUI"
    assert found.evidence["nodes"] == 2
    assert found.evidence["inpaint"] is True

    workflow = {"last_node_id": 2, "nodes": [{"id": 1, "type": "CheckpointLoaderSimple"},
                                             {"id": 2, "type": "KSampler"}]}
    assert reason(score(encode("PNG", text={"workflow": json.dumps(workflow)})), "AI_GENERATOR_METADATA")
    # a "prompt" chunk that is not a node graph is not ComfyUI
    assert score(encode("PNG", text={"prompt": "a cat", "workflow": "{broken"})).score == 0.0


def test_invokeai_novelai_and_fooocus() -> None:
    invoke = score(encode("PNG", text={"invokeai_metadata": json.dumps({"generation_mode": "txt2img"})}))
    assert reason(invoke, "AI_GENERATOR_METADATA").evidence["tool"] == "InvokeAI"
    novel = score(encode("PNG", text={"Software": "NovelAI", "Comment": json.dumps(
        {"steps": 28, "sampler": "k_euler", "seed": 42})}))
    assert reason(novel, "AI_GENERATOR_METADATA").evidence["tool"] == "NovelAI"
    assert codes(novel) == ["AI_GENERATOR_METADATA"]  # its Software tag is the same finding, not a second one
    fooocus = score(encode("PNG", text={"parameters": json.dumps({"Prompt": "x", "Version": "Fooocus v2.5.0"}),
                                        "fooocus_scheme": "fooocus"}))
    assert reason(fooocus, "AI_GENERATOR_METADATA").evidence["tool"] == "Fooocus"


def test_midjourney_job_id_in_xmp_description() -> None:
    packet = xmp_packet(f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">a cracked mug --v 6 Job ID: {UUID}'
                        "</rdf:li></rdf:Alt></dc:description>", 'xmlns:dc="http://purl.org/dc/elements/1.1/"')
    found = reason(score(encode("PNG", xmp=packet)), "AI_GENERATOR_METADATA")
    assert found.evidence == {"image_id": "IMG-0", "tool": "Midjourney", "field": "xmp:description",
                              "job_id": UUID}
    not_an_id = xmp_packet('<dc:description><rdf:Alt><rdf:li xml:lang="x-default">Job ID: pending</rdf:li>'
                           "</rdf:Alt></dc:description>", 'xmlns:dc="http://purl.org/dc/elements/1.1/"')
    assert score(encode("PNG", xmp=not_an_id)).score == 0.0


# ------------------------------------------------------------------ editor software


@pytest.mark.parametrize("software", ["Meitu AI Eraser 10.2", "Hypic AI Edit 6.1", "Picsart AI Replace",
                                      "Fotor AI Object Remover", "Adobe Photoshop 25.0 Generative Fill",
                                      "DALL-E 3", "Canva AI"])
def test_ai_editor_software_tag(software: str) -> None:
    result = score(encode("JPEG", exif=exif_with({0x0131: software})))
    found = reason(result, "AI_EDITOR_SOFTWARE")
    assert found.evidence["software"] == software
    assert result.score >= 0.6


@pytest.mark.parametrize("software", ["Adobe Photoshop 25.0 (Windows)", "Meitu", "Snapseed 2.0", "17.4.1",
                                      "GIMP 2.10.36", "MIUI AI Camera"])
def test_plain_software_is_not_flagged(software: str) -> None:
    assert score(encode("JPEG", exif=exif_with({0x0131: software}))).score == 0.0


def test_xmp_creator_tool_naming_firefly() -> None:
    packet = xmp_packet("", 'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="Adobe Firefly"')
    assert reason(score(encode("WEBP", xmp=packet)), "AI_EDITOR_SOFTWARE").evidence["field"] == "xmp:CreatorTool"


# ------------------------------------------------------------------ absence, malformed input, aggregation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_plain_photo_scores_zero(fmt: str) -> None:
    plain = xmp_packet("", 'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="Adobe Photoshop 25.0"')
    result = score(encode(fmt, exif=camera_exif(), xmp=plain))
    assert result.score == 0.0
    assert result.reasons == ()


def test_xml_bomb_and_broken_xmp_do_not_crash() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:TC260="{TC260}" TC260:AIGC="&lol3;"/></rdf:RDF></x:xmpmeta>'
    ).encode()
    broken = tc260_attribute(label_json())[:-60]
    for packet in (bomb, broken, b"\x00\xff garbage", b""):
        assert score(encode("JPEG", xmp=packet) if packet else encode("JPEG")).score == 0.0


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_damaged_metadata_structures_do_not_crash() -> None:
    exif = exif_with({0x0131: "Meitu AI Eraser"})
    raw = bytearray(encode("JPEG", exif=exif))
    at = raw.find(b"Exif\x00\x00") + 6
    raw[at + 4 : at + 8] = b"\xff\xff\xff\x7f"  # IFD0 offset far past the end
    assert score(bytes(raw)).score == 0.0

    png = bytearray(encode("PNG", text={"AIGC": label_json()}))
    at = png.find(b"tEXt") - 4
    png[at : at + 4] = (10**9).to_bytes(4, "big")  # a text chunk claiming a gigabyte
    from scorers.provenance import inspect_file

    assert inspect_file(bytes(png)) == ()


def test_hostile_text_values_are_bounded() -> None:
    from scorers.provenance import inspect_file

    deep = "{" + '"AIGC":' + "[" * 100_000 + "]" * 100_000 + "}"
    long_line = "prompt\nSteps: " + "a" * 1_000_000
    raw = encode("PNG", text={"AIGC": deep, "parameters": long_line, "prompt": "[" * 100_000})
    assert [f.code for f in inspect_file(raw)] == ["AI_LABEL_IMPLICIT"]  # present, unreadable: a weaker label
    assert inspect_file(raw)[0].score < 0.7
    assert parse_sd_parameters("Steps: 20, " + "x" * 20_000 + ", Seed: 1") is None


def test_ztxt_decompression_bomb_is_refused() -> None:
    bomb = zlib.compress(b"{" + b" " * (8 * 1024 * 1024) + b"}", 9)
    chunk_data = b"AIGC\x00\x00" + bomb
    chunk = len(chunk_data).to_bytes(4, "big") + b"zTXt" + chunk_data
    chunk += zlib.crc32(b"zTXt" + chunk_data).to_bytes(4, "big")
    png = encode("PNG")
    raw = png[:33] + chunk + png[33:]  # after IHDR
    from scorers.provenance import inspect_file

    assert [f.code for f in inspect_file(raw)] == []


def test_strongest_first_across_images_and_score_is_max() -> None:
    labelled = encode("JPEG", xmp=tc260_attribute(label_json("3")))
    generated = encode("PNG", text={"parameters": SD_TEXT})
    result = score(encode("JPEG"), labelled, generated)
    assert [r.evidence["image_id"] for r in result.reasons] == ["IMG-2", "IMG-1"]
    assert result.score == max(r.score for r in result.reasons) == result.reasons[0].score
    for r in result.reasons:
        for value in r.evidence.values():
            assert isinstance(value, int | float | bool) or (isinstance(value, str) and len(value) <= 160)


def test_one_reason_per_code_per_image() -> None:
    both = encode("PNG", xmp=tc260_attribute(label_json("2")), text={"AIGC": label_json("1")})
    result = score(both)
    assert codes(result) == ["AI_LABEL_IMPLICIT"]
    assert result.reasons[0].evidence["label"] == "1"  # the stronger of the two
