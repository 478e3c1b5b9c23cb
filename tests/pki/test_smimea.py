"""SMIMEA encoding (RFC 8162): owner names, record data, zone text that BIND accepts."""

from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from smimeproxy.errors import ConfigError, MalformedMessage
from smimeproxy.pki.smimea import (
    SMIMEA_RRTYPE,
    SMIMEARecord,
    parse_smimea_presentation,
    parse_smimea_rdata,
    record_matches,
    smimea_for_certificate,
    smimea_owner_name,
    zone_text,
)
from smimeproxy.testing import CertificateFactory
from tests.conftest import require_tool

# RFC 8162 section 3: "hugh@example.com" has its records at this owner name.
RFC8162_OWNER = "c93f1e400f26708f98cb19d936620da35eec8f72e57f9eec01c1afd6._smimecert.example.com"


@pytest.fixture(scope="module")
def factory() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture(scope="module")
def alice(factory):
    return factory.user("alice@acme.test", key_kind="rsa2048")


@pytest.fixture(scope="module")
def bob(factory):
    return factory.user("bob@acme.test", key_kind="p256")


def test_rfc8162_example_owner_name():
    assert smimea_owner_name("hugh@example.com") == RFC8162_OWNER
    assert smimea_owner_name("hugh@example.com", trailing_dot=True) == RFC8162_OWNER + "."
    assert SMIMEA_RRTYPE == 53


def test_owner_name_keeps_local_part_case_and_folds_domain():
    assert smimea_owner_name("hugh@EXAMPLE.com.") == RFC8162_OWNER
    assert smimea_owner_name("Hugh@example.com") != RFC8162_OWNER
    assert smimea_owner_name("hugh@bücher.example").endswith("._smimecert.xn--bcher-kva.example")


def test_owner_name_of_utf8_local_part_matches_openssl(openssl, tmp_path):
    local = "jöran.ßmith"
    (tmp_path / "local").write_bytes(local.encode("utf-8"))
    out = subprocess.run(
        [openssl, "dgst", "-sha256", "-r", str(tmp_path / "local")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    label = out.split()[0][:56]
    assert smimea_owner_name(f"{local}@example.com") == f"{label}._smimecert.example.com"


@pytest.mark.parametrize("address", ["hugh", "@example.com", "hugh@", "hugh@exa mple..com", 5])
def test_owner_name_rejects_non_addresses(address):
    with pytest.raises(ConfigError):
        smimea_owner_name(address)


def openssl_association(openssl: str, cert_der: bytes, selector: int, matching: int) -> bytes:
    """The association data computed by openssl alone (RFC 6698 2.1.2 / 2.1.3)."""

    def run(*args: str, data: bytes) -> bytes:
        return subprocess.run(args, input=data, capture_output=True, check=True).stdout

    content = run(openssl, "x509", "-inform", "DER", "-outform", "DER", data=cert_der)
    if selector == 1:
        pub = run(openssl, "x509", "-inform", "DER", "-pubkey", "-noout", data=cert_der)
        content = run(openssl, "pkey", "-pubin", "-outform", "DER", data=pub)
    if matching == 1:
        return run(openssl, "dgst", "-sha256", "-binary", data=content)
    if matching == 2:
        return run(openssl, "dgst", "-sha512", "-binary", data=content)
    return content


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching", [0, 1, 2])
def test_association_data_agrees_with_openssl(openssl, alice, bob, selector, matching):
    for user, other in ((alice, bob), (bob, alice)):
        record = smimea_for_certificate(
            user.certificate, usage=3, selector=selector, matching_type=matching
        )
        der = user.certificate.public_bytes(serialization.Encoding.DER)
        assert record.data == openssl_association(openssl, der, selector, matching)
        assert (record.usage, record.selector, record.matching_type) == (3, selector, matching)
        assert record_matches(record, user.certificate)
        assert not record_matches(record, other.certificate)


def test_defaults_are_dane_ee_full_certificate(alice):
    record = smimea_for_certificate(alice.certificate)
    assert record.presentation().startswith("3 0 0 3082")
    assert record.rdata()[:3] == b"\x03\x00\x00"
    assert record.data == alice.certificate.public_bytes(serialization.Encoding.DER)


def test_unknown_selector_or_matching_type_never_matches(alice):
    record = smimea_for_certificate(alice.certificate)
    assert not record_matches(SMIMEARecord(3, 7, 0, record.data), alice.certificate)
    assert not record_matches(SMIMEARecord(3, 0, 9, record.data), alice.certificate)
    with pytest.raises(ConfigError):
        smimea_for_certificate(alice.certificate, selector=2)
    with pytest.raises(ConfigError):
        smimea_for_certificate(alice.certificate, matching_type=3)


@pytest.mark.parametrize(("selector", "matching"), [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)])
def test_presentation_and_rdata_round_trip(alice, selector, matching):
    record = smimea_for_certificate(alice.certificate, selector=selector, matching_type=matching)
    assert parse_smimea_presentation(record.presentation()) == record
    assert parse_smimea_rdata(record.rdata()) == record
    hexdata = record.data.hex()
    wrapped = f"3 {selector} {matching} (\n {hexdata[:40]}\n\t{hexdata[40:]} )"
    assert parse_smimea_presentation(wrapped) == record
    generic = f"\\# {len(record.rdata())} {record.rdata().hex()}"
    assert parse_smimea_presentation(generic) == record


@pytest.mark.parametrize(
    "rdata",
    [
        b"",
        b"\x03",
        b"\x03\x00\x00",
        b"\x03\x00\x01" + b"\x00" * 31,
        b"\x03\x00\x02" + b"\x00" * 32,
    ],
)
def test_junk_rdata_is_malformed(rdata):
    with pytest.raises(MalformedMessage):
        parse_smimea_rdata(rdata)


@pytest.mark.parametrize(
    "text",
    ["", "3 0", "3 0 0", "3 0 0 XYZ", "3 0 0 ABC", "256 0 0 AA", "a b c DD", "-1 0 0 AA",
     "\\# 3 0300", "\\# x 030000AA", "\\#", "3 0 1 AABB"],
)  # fmt: skip
def test_junk_presentation_is_malformed(text):
    with pytest.raises(MalformedMessage):
        parse_smimea_presentation(text)


@given(st.binary(max_size=80))
def test_any_rdata_parses_or_is_malformed(data):
    try:
        record = parse_smimea_rdata(data)
    except MalformedMessage:
        return
    assert record.rdata() == data
    assert parse_smimea_presentation(record.presentation()) == record


def test_record_arguments_are_checked():
    with pytest.raises(ConfigError):
        SMIMEARecord(3, 0, 1, b"\x00" * 31)
    with pytest.raises(ConfigError):
        SMIMEARecord(300, 0, 0, b"\x00")
    with pytest.raises(ConfigError):
        SMIMEARecord(3, 0, 0, b"")
    with pytest.raises(ConfigError):
        zone_text([], ttl=-1)
    with pytest.raises(ConfigError):
        zone_text([("bad name", SMIMEARecord(3, 0, 0, b"\x01"))])
    assert zone_text([]) == ""


ZONE_HEAD = """$ORIGIN _smimecert.acme.test.
$TTL 3600
@ IN SOA ns1.acme.test. hostmaster.acme.test. ( 1 7200 900 1209600 300 )
@ IN NS ns1.acme.test.
"""


def test_zone_text_is_accepted_by_bind(tmp_path, alice, bob, factory):
    checkzone = require_tool("named-checkzone")
    big = factory.user("carol@acme.test", key_kind="rsa4096")
    records = [
        (smimea_owner_name("alice@acme.test"), smimea_for_certificate(alice.certificate)),
        (smimea_owner_name("bob@acme.test"), smimea_for_certificate(bob.certificate)),
        (
            smimea_owner_name("bob@acme.test"),
            smimea_for_certificate(bob.certificate, selector=1, matching_type=1),
        ),
        (
            smimea_owner_name("carol@acme.test", trailing_dot=True),
            smimea_for_certificate(big.certificate, matching_type=2),
        ),
        (smimea_owner_name("carol@acme.test"), smimea_for_certificate(big.certificate)),
    ]
    text = zone_text(records, ttl=600)
    assert text.count(" 600 IN SMIMEA ") == 5
    zone = tmp_path / "zone"
    zone.write_text(ZONE_HEAD + text)
    result = subprocess.run(
        [checkzone, "-D", "-o", "-", "_smimecert.acme.test", str(zone)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # BIND's canonical dump, read back: the same owners and the same record data.
    dumped = set()
    for line in result.stdout.splitlines():
        fields = line.split(None, 4)
        if len(fields) == 5 and fields[3] == "SMIMEA":
            dumped.add((fields[0].rstrip("."), parse_smimea_presentation(fields[4])))
    assert dumped == {(owner.rstrip("."), record) for owner, record in records}


def test_zone_text_wraps_long_data(alice):
    record = smimea_for_certificate(alice.certificate)
    text = zone_text([("x.example", record)])
    lines = text.splitlines()
    assert lines[0] == "x.example. 3600 IN SMIMEA 3 0 0 ("
    assert lines[-1].endswith(" )")
    assert all(len(line) <= 80 for line in lines)
    assert parse_smimea_presentation(text.split("SMIMEA", 1)[1]) == record
