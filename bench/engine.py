"""Benchmark: the S/MIME engine against the bare crypto primitives, in the same run.

For 4 KB, 100 KB and 10 MB messages it measures

* seal: sign (RSA-2048, SHA-256) and encrypt (AES-256-CBC, RSA-2048 key transport) to
  one recipient, against the bare primitives that cannot be avoided: one RSA signature
  over a SHA-256 digest, one RSA encryption of the content key, AES-CBC over the bytes;
* open: decrypt, verify and render (footer, headers), against one RSA decryption, one
  RSA verification and AES-CBC decryption over the same bytes;
* peak Python memory (tracemalloc) while sealing and opening the 10 MB message.

It prints messages per second and the ratio engine/primitives (time per message);
lower is better, 1.0 would mean the engine costs nothing beyond the primitives. Engine
and primitives run in alternating batches (median time per call of each), so that a
busy machine slows both alike and the ratio stays meaningful.
Not a test: numbers depend on the machine. Run: ``python bench/engine.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from smimeproxy.pki.validation import PathValidator
from smimeproxy.smime.opener import OpenOptions, open_message
from smimeproxy.smime.sealer import seal
from smimeproxy.testing import CertificateFactory


def make_message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return (
        b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: bench\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body
    )


def rates(
    engine: Callable[[], object], bare: Callable[[], object], min_time: float
) -> tuple[float, float]:
    """Seconds per call of ``engine`` and ``bare``, measured in alternating batches.

    Both run interleaved in batches of about 20 ms for ``min_time`` each, so that load
    from other processes on the machine falls on both alike; each figure is the median
    over its batches of the time per call (robust against a batch that was preempted).
    """
    timings: dict[Callable[[], object], list[float]] = {engine: [], bare: []}
    sizes = {}
    for fn in (engine, bare):
        fn()  # warm up
        t = time.perf_counter()
        fn()
        sizes[fn] = max(1, int(0.02 / max(time.perf_counter() - t, 1e-6)))
    spent = 0.0
    while spent < 2 * min_time or min(len(v) for v in timings.values()) < 3:
        for fn, out in timings.items():
            n = sizes[fn]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = time.perf_counter() - t
            out.append(elapsed / n)
            spent += elapsed
    return statistics.median(timings[engine]), statistics.median(timings[bare])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()

    factory = CertificateFactory(root_key_kind="rsa2048")
    alice = factory.user("alice@acme.test")
    bob = factory.user("bob@partner.test")
    validator = PathValidator([factory.root.certificate])
    options = OpenOptions(authserv_id="acme.test")
    sign_key, enc_pub = alice.private_key, bob.certificate.public_key()
    dec_key, ver_pub = bob.private_key, alice.certificate.public_key()

    print(f"{'size':>8} {'op':>5} {'engine msg/s':>13} {'primitives msg/s':>17} {'ratio':>6}")

    def run_size(size: int) -> None:
        msg = make_message(size)
        body = msg.split(b"\r\n\r\n", 1)[1]
        sealed = seal(msg, signer=alice.pair, recipients=[bob.certificate])
        key, iv = os.urandom(32), os.urandom(16)

        def primitives_seal() -> None:
            h = hashes.Hash(hashes.SHA256())
            h.update(body)
            sign_key.sign(h.finalize(), rsa_padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
            enc_pub.encrypt(key, rsa_padding.PKCS1v15())  # type: ignore[union-attr,call-arg]
            p = padding.PKCS7(128).padder()
            e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
            e.update(p.update(body) + p.finalize())
            e.finalize()

        ct = os.urandom(len(body) + 16 - len(body) % 16)
        wrapped = enc_pub.encrypt(key, rsa_padding.PKCS1v15())  # type: ignore[union-attr,call-arg]
        sig = sign_key.sign(b"x", rsa_padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]

        def primitives_open() -> None:
            k = dec_key.decrypt(wrapped, rsa_padding.PKCS1v15())  # type: ignore[union-attr,call-arg]
            d = Cipher(algorithms.AES(k), modes.CBC(iv)).decryptor()
            d.update(ct)
            d.finalize()
            h = hashes.Hash(hashes.SHA256())
            h.update(body)
            h.finalize()
            ver_pub.verify(sig, b"x", rsa_padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]

        seconds = args.seconds if size < 1024 * 1024 else max(args.seconds, 4.0)
        results = {
            "seal": rates(
                lambda: seal(msg, signer=alice.pair, recipients=[bob.certificate]),
                primitives_seal,
                seconds,
            ),
            "open": rates(
                lambda: open_message(sealed, keys=[bob.pair], validator=validator, options=options),
                primitives_open,
                seconds,
            ),
        }
        label = f"{size // 1024} KB" if size < 1024 * 1024 else f"{size // 1024 // 1024} MB"
        for op, (engine, bare) in results.items():
            print(f"{label:>8} {op:>5} {1 / engine:13.1f} {1 / bare:17.1f} {engine / bare:6.2f}")

        if size >= 1024 * 1024:
            for op, fn in (
                ("seal", lambda: seal(msg, signer=alice.pair, recipients=[bob.certificate])),
                (
                    "open",
                    lambda: open_message(
                        sealed, keys=[bob.pair], validator=validator, options=options
                    ),
                ),
            ):
                tracemalloc.start()
                fn()
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                print(
                    f"{label:>8} {op:>5} peak memory {peak / 1024 / 1024:.1f} MiB "
                    f"= {peak / len(msg):.2f}x the message"
                )

    for size in (4 * 1024, 100 * 1024, 10 * 1024 * 1024):
        run_size(size)


if __name__ == "__main__":
    main()
