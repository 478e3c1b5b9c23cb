"""keys import (PKCS#12 from openssl, PEM, pending CSR), certs import (PEM, DER,
PKCS#7), trust add (anchors vs intermediates), crl add."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from smimeproxy.testing import CertificateFactory, Issued
from tests.commands.conftest import CLI


@pytest.fixture(scope="module")
def partner() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture(scope="module")
def people(partner: CertificateFactory) -> dict[str, Issued]:
    sub = partner.ca("Partner Issuing CA", partner.root)
    return {
        "sub": sub,
        "dave": partner.user("dave@acme.test", sub, key_kind="rsa2048"),
        "erin": partner.user("erin@acme.test", key_kind="p256"),
        "carol": partner.user("carol@partner.test", sub, key_kind="p256"),
        "frank": partner.user("frank@partner.test", key_kind="p256"),
    }


def test_pkcs12_made_by_openssl(
    cli: CLI, tmp_path: Path, openssl: str, people: dict[str, Issued]
) -> None:
    dave = people["dave"]
    (tmp_path / "dave.key").write_bytes(dave.key_pem)
    (tmp_path / "dave.pem").write_bytes(dave.cert_pem)
    (tmp_path / "chain.pem").write_bytes(people["sub"].cert_pem)
    (tmp_path / "pw").write_text("s3cret pass\n")
    subprocess.run(
        [
            openssl,
            "pkcs12",
            "-export",
            "-inkey",
            "dave.key",
            "-in",
            "dave.pem",
            "-certfile",
            "chain.pem",
            "-passout",
            "file:pw",
            "-out",
            "dave.p12",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    bad = cli(
        "keys", "import", "--pkcs12", str(tmp_path / "dave.p12"), "--password-file", str(wrong)
    )
    assert bad.rc == 4 and "wrong password" in bad.err
    done = cli.ok(
        "keys",
        "import",
        "--pkcs12",
        str(tmp_path / "dave.p12"),
        "--password-file",
        str(tmp_path / "pw"),
        "--json",
    ).json()
    assert done["address"] == "dave@acme.test"  # the owner comes from the certificate
    assert done["state"] == "current"
    assert done["intermediates_added"] == ["CN=Partner Issuing CA"]
    user = cli.ok("users", "show", "dave@acme.test", "--json").json()
    assert [k["state"] for k in user["keys"]] == ["current"]
    exported = cli.ok("keys", "export-cert", "dave@acme.test").out
    assert exported == dave.cert_pem


def test_pem_key_and_certificate(cli: CLI, tmp_path: Path, people: dict[str, Issued]) -> None:
    erin = people["erin"]
    (tmp_path / "erin.key").write_bytes(erin.key_pem)
    (tmp_path / "erin.pem").write_bytes(erin.cert_pem)
    (tmp_path / "dave.pem").write_bytes(people["dave"].cert_pem)
    mismatch = cli(
        "keys", "import", "--key", str(tmp_path / "erin.key"), "--cert", str(tmp_path / "dave.pem")
    )
    assert mismatch.rc == 4 and "does not belong" in mismatch.err
    done = cli.ok(
        "keys",
        "import",
        "--key",
        str(tmp_path / "erin.key"),
        "--cert",
        str(tmp_path / "erin.pem"),
        "--previous",
        "--json",
    ).json()
    assert done["address"] == "erin@acme.test" and done["state"] == "previous"
    listing = cli.ok("keys", "list", "--json").json()
    assert [(k["address"], k["state"]) for k in listing] == [("erin@acme.test", "previous")]


def test_csr_for_an_external_ca_then_import_its_certificate(
    cli: CLI, tmp_path: Path, openssl: str, people: dict[str, Issued]
) -> None:
    csr = tmp_path / "grace.csr"
    cli.ok("keys", "generate", "--user", "grace@acme.test", "--kind", "p256", "--csr-out", str(csr))
    text = subprocess.run(
        [openssl, "req", "-in", str(csr), "-noout", "-text", "-verify"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "email:grace@acme.test" in text.stdout
    sub = people["sub"]
    (tmp_path / "ca.pem").write_bytes(sub.cert_pem)
    (tmp_path / "ca.key").write_bytes(sub.key_pem)
    subprocess.run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            "grace.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-copy_extensions",
            "copy",
            "-out",
            "grace.pem",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    assert cli.ok("keys", "list", "--json").json() == []  # pending, not usable yet
    done = cli.ok("keys", "import", "--cert", str(tmp_path / "grace.pem"), "--json").json()
    assert done["address"] == "grace@acme.test" and done["state"] == "current"
    # the pending key is gone: importing the certificate again finds none
    again = cli("keys", "import", "--cert", str(tmp_path / "grace.pem"))
    assert again.rc == 4 and "no pending key" in again.err
    # an unrelated certificate has no pending key either
    (tmp_path / "frank.pem").write_bytes(people["frank"].cert_pem)
    assert cli("keys", "import", "--cert", str(tmp_path / "frank.pem")).rc == 4


def test_certs_import_pem_der_and_pkcs7(
    cli: CLI, tmp_path: Path, openssl: str, people: dict[str, Issued]
) -> None:
    carol, frank = people["carol"], people["frank"]
    (tmp_path / "carol.pem").write_bytes(carol.cert_pem)
    (tmp_path / "carol.der").write_bytes(carol.certificate.public_bytes(serialization.Encoding.DER))
    (tmp_path / "frank.pem").write_bytes(frank.cert_pem)
    subprocess.run(
        [
            openssl,
            "crl2pkcs7",
            "-nocrl",
            "-certfile",
            "frank.pem",
            "-certfile",
            "carol.pem",
            "-out",
            "bundle.p7b",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            openssl,
            "crl2pkcs7",
            "-nocrl",
            "-certfile",
            "frank.pem",
            "-outform",
            "DER",
            "-out",
            "bundle.p7c",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    der = cli.ok("certs", "import", str(tmp_path / "carol.der"), "--json").json()
    assert [r["addresses"] for r in der] == [["carol@partner.test"]]
    p7 = cli.ok("certs", "import", str(tmp_path / "bundle.p7b"), "--json").json()
    assert sorted(a for r in p7 for a in r["addresses"]) == [
        "carol@partner.test",
        "frank@partner.test",
    ]
    cli.ok("certs", "import", str(tmp_path / "bundle.p7c"), str(tmp_path / "carol.pem"))
    listing = cli.ok("certs", "list", "--json").json()
    assert sorted(r["addresses"][0] for r in listing) == [
        "carol@partner.test",
        "frank@partner.test",
    ]
    assert all(r["source"] == "imported" for r in listing)
    fp = next(r["fingerprint"] for r in listing if r["addresses"] == ["frank@partner.test"])
    shown = cli.ok("certs", "show", fp[:12], "--pem").out
    assert shown == frank.cert_pem
    assert "frank@partner.test" in cli.ok("certs", "list").text
    cli.ok("certs", "remove", fp)
    assert [r["addresses"] for r in cli.ok("certs", "list", "--json").json()] == [
        ["carol@partner.test"]
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    bad = cli("certs", "import", str(garbage))
    assert bad.rc == 4 and str(garbage) in bad.err


def test_trust_add_splits_anchors_and_intermediates(
    cli: CLI, tmp_path: Path, partner: CertificateFactory, people: dict[str, Issued]
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(people["sub"].cert_pem + partner.root.cert_pem)
    added = cli.ok("trust", "add", str(bundle), "--json").json()
    assert {(d["subject"], d["kind"]) for d in added} == {
        ("CN=Partner Issuing CA", "intermediate"),
        ("CN=smimeproxy Test Root", "anchor"),
    }
    listing = cli.ok("trust", "list", "--json").json()
    kinds = {d["subject"]: d["kind"] for d in listing}
    assert kinds["CN=smimeproxy root CA"] == "anchor"  # the internal root from ca init
    assert kinds["CN=smimeproxy issuing CA"] == "intermediate"
    assert kinds["CN=Partner Issuing CA"] == "intermediate"
    # a user certificate is never made a trust anchor
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(people["carol"].cert_pem)
    refused = cli("trust", "add", str(leaf))
    assert refused.rc == 4 and "not a CA certificate" in refused.err


def test_crl_add_needs_a_trusted_signer(
    cli: CLI, tmp_path: Path, partner: CertificateFactory, people: dict[str, Issued]
) -> None:
    crl = partner.crl(people["sub"], [people["carol"]])
    path = tmp_path / "sub.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    refused = cli("crl", "add", str(path))
    assert refused.rc == 4 and "trust add" in refused.err
    (tmp_path / "sub.pem").write_bytes(people["sub"].cert_pem)
    cli.ok("trust", "add", str(tmp_path / "sub.pem"))
    added = cli.ok("crl", "add", str(path), "--json").json()
    assert added == [
        {"file": str(path), "issuer": "CN=Partner Issuing CA", "kept": True, "revoked": 1}
    ]
    # the same CRL again is not newer: the store keeps what it has
    assert cli.ok("crl", "add", str(path), "--json").json()[0]["kept"] is False
    listed = cli.ok("crl", "list", "--json").json()
    mine = [c for c in listed if c["issuer"] == "CN=Partner Issuing CA"]
    assert mine and mine[0]["revoked"] == [format(people["carol"].certificate.serial_number, "x")]
