"""Evidence checks written independently of keybroker's verifiers, for the emulator tests.

They parse the vendor layouts by offset and check signatures with ``cryptography`` alone.
"""

from __future__ import annotations

import hashlib
import struct
import uuid

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def snp_certs(auxblob: bytes) -> dict[uuid.UUID, x509.Certificate]:
    certs, pos = {}, 0
    while True:
        guid, offset, length = uuid.UUID(bytes=auxblob[pos:pos + 16]), *struct.unpack_from("<II", auxblob, pos + 16)
        if guid.int == 0 and offset == 0 and length == 0:
            return certs
        certs[guid] = x509.load_der_x509_certificate(auxblob[offset:offset + length])
        pos += 24


def check_snp(report: bytes, auxblob: bytes, report_data: bytes) -> None:
    assert len(report) == 1184
    assert struct.unpack_from("<I", report, 0)[0] >= 3
    assert report[0x50:0x90] == report_data
    vcek = snp_certs(auxblob)[uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")]
    r = int.from_bytes(report[0x2A0:0x2E8], "little")
    s = int.from_bytes(report[0x2E8:0x330], "little")
    vcek.public_key().verify(encode_dss_signature(r, s), report[:0x2A0], ec.ECDSA(hashes.SHA384()))


def check_tdx(quote: bytes, report_data: bytes) -> None:
    assert struct.unpack_from("<HHI", quote, 0) == (4, 2, 0x81)
    assert quote[0x238:0x278] == report_data
    sig = quote[636:700]
    ak = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote[700:764])
    ak.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
              quote[:632], ec.ECDSA(hashes.SHA256()))
    assert struct.unpack_from("<H", quote, 764)[0] == 6
    qe_report = quote[770:1154]
    assert qe_report[320:352] == hashlib.sha256(quote[700:764] + quote[1220:1252]).digest()


def cose_verify(sign1: bytes, key: ec.EllipticCurvePublicKey) -> dict:
    tag = cbor2.loads(sign1)
    protected, _, payload, signature = tag.value
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    key.verify(encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")),
               to_sign, ec.ECDSA(hashes.SHA384()))
    return cbor2.loads(payload)


def check_cca(token: bytes, challenge: bytes, cpak: ec.EllipticCurvePublicKey) -> None:
    collection = cbor2.loads(token)
    assert collection.tag == 399
    realm_sign1 = collection.value[44241]
    realm = cbor2.loads(cbor2.loads(realm_sign1).value[2])
    rak = cbor2.loads(realm[44237])
    rak_key = ec.EllipticCurvePublicNumbers(int.from_bytes(rak[-2], "big"), int.from_bytes(rak[-3], "big"),
                                            ec.SECP384R1()).public_key()
    assert cose_verify(realm_sign1, rak_key)[10] == challenge
    platform = cose_verify(collection.value[44234], cpak)
    assert platform[10] == hashlib.sha256(realm[44237]).digest()
