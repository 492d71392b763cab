"""X.509 and DER helpers shared by the vendor verifiers.

Parsed certificates are remembered by the input's bytes (at most ``CACHE_MAX`` inputs), and
what is worked out of them (fingerprints, names, verified signatures, a VEK's extensions) by
the certificate objects those parses return (see ``remembered``: at most ``CACHE_MAX`` results
in all), least recently used first out: a key server sees the same few chains again and again,
and all are pure functions of those bytes.
What is remembered is bounded in bytes too, as evidence is hostile: a certificate is at most
``CERT_MAX`` bytes, and only inputs of at most ``CACHED_INPUT_MAX`` are remembered.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from ..errors import EvidenceError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
CERT_FILE_SUFFIXES = (".pem", ".crt", ".cer", ".der")
CERT_FILE_MAX = 1024 * 1024
CACHE_MAX = 512
#: Bytes of one certificate (DER) at most: AMD's and Intel's are under 2 KiB.
CERT_MAX = 16 * 1024
#: Extensions of one certificate at most: AMD's VCEK has 11, Intel's PCK certificates fewer. Each is
#: kept parsed (see ``_parse``), so that the certificates remembered are bounded in memory too.
EXTENSIONS_MAX = 32
#: Bytes of an input whose certificates are remembered (one certificate, a short chain).
CACHED_INPUT_MAX = 16 * 1024
#: AMD's ARK, ASK and ASVK keys: RSA of this size, and of an exponent of at most this many bits.
AMD_RSA_BITS = 4096
RSA_EXPONENT_BITS_MAX = 32
#: The largest OID arc read (after the first two): 2**128 - 1, as a UUID under 2.25.
OID_ARC_MAX = 2**128 - 1


class _Same:
    """A cache key that is its object by identity. It holds the object, so that the id stays that
    object's for as long as the key is remembered."""

    __slots__ = ("item",)

    def __init__(self, item: object) -> None:
        self.item = item

    def __hash__(self) -> int:
        return id(self.item)

    def __eq__(self, other: object) -> bool:
        return type(other) is _Same and other.item is self.item


@functools.lru_cache(maxsize=CACHE_MAX)
def _remembered(function: Callable[..., Any], *keys: object) -> Any:
    return function(*(key.item if type(key) is _Same else key for key in keys))


def remembered(function: F) -> F:
    """``function`` of certificates (and text), remembered per argument objects: by identity, not
    by value, as pyca hashes and compares a certificate by re-encoding it (15 us a lookup, as
    much as most of what is remembered), while ``load_certs`` hands out the same objects for the
    same bytes (a small input's, while it is remembered). Another object of the same bytes is a
    miss, never a wrong hit. Text is its own key, by value. All such functions share one bound
    of CACHE_MAX calls, least recently used forgotten first, and so of certificates held."""
    @functools.wraps(function)
    def call(*items: object) -> Any:
        for item in items:
            if not isinstance(item, str | x509.Certificate):
                raise TypeError(f"{function.__name__} remembers certificates and text, not {type(item).__name__}")
        return _remembered(function, *(item if isinstance(item, str) else _Same(item) for item in items))
    return call  # type: ignore[return-value]


def load_certs(data: bytes, *, most: int | None = None) -> list[x509.Certificate]:
    """Certificates from a PEM bundle (at most ``most`` of them) or one DER certificate, parsed
    whole (see ``_parse``); remembered when the input is small."""
    data = bytes(data)
    certs = _parse_cached(data) if len(data) <= CACHED_INPUT_MAX else _parse(data)
    if most is not None and len(certs) > most:  # counted parsed: a PEM block has more labels than one
        raise EvidenceError(f"more than {most} certificate{'s' if most > 1 else ''} where "
                            f"{'they belong' if most > 1 else 'one belongs'}")
    return list(certs)


def _parse(data: bytes) -> tuple[x509.Certificate, ...]:
    """Certificates from a PEM bundle (any number) or one DER certificate, parsed whole.

    ``cryptography`` parses a certificate's parts when they are first used; a malformed
    extension or key would then fail deep inside a verifier. Every part the verifiers read
    is read here, once, so that hostile certificates fail at the edge as EvidenceError.
    AMD issues VCEKs and VLEKs with serial number 0, which RFC 5280 forbids and
    ``cryptography`` warns about; that warning, and those a hostile certificate's odd
    attributes raise, are silenced: what matters is checked by the verifiers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN CERTIFICATE-----" in data
                     else [x509.load_der_x509_certificate(data)])
            for cert in certs:
                if len(cert.public_bytes(serialization.Encoding.DER)) > CERT_MAX:
                    raise ValueError(f"a certificate of more than {CERT_MAX} bytes")
                if len(cert.extensions) > EXTENSIONS_MAX:
                    raise ValueError(f"a certificate of more than {EXTENSIONS_MAX} extensions")
                _ = (cert.extensions, cert.public_key(), cert.subject, cert.issuer, cert.serial_number,
                     cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm,
                     cert.signature_algorithm_parameters, cert.tbs_certificate_bytes)
            return tuple(certs)
        except Exception as exc:  # whatever the X.509 library rejects a hostile certificate with
            raise EvidenceError(f"cannot parse certificate: {type(exc).__name__}: {exc}"[:300]) from None


_parse_cached = functools.lru_cache(maxsize=CACHE_MAX)(_parse)


def load_cert_dir(folder: Path) -> list[x509.Certificate]:
    """Every certificate in the PEM/DER files of ``folder`` (not recursive)."""
    if not folder.is_dir():
        raise EvidenceError(f"certificate folder {folder} does not exist")
    return load_files(folder, CERT_FILE_SUFFIXES, load_certs)


def load_files(folder: Path, suffixes: tuple[str, ...], load: Callable[[bytes], list[T]]) -> list[T]:
    """What ``load`` makes of each file of ``folder`` named with one of ``suffixes``, the file named
    in its failure; a file larger than CERT_FILE_MAX is refused. The folder is read at each
    attestation: a file gone since it was listed (the operator refreshing a CRL) or unreadable is
    an EvidenceError naming it, not an OSError out of the verifier (a key server's 500)."""
    loaded: list[T] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and path.is_file():
            try:
                if path.stat().st_size > CERT_FILE_MAX:
                    raise EvidenceError(f"larger than {CERT_FILE_MAX} bytes")
                loaded.extend(load(path.read_bytes()))
            except OSError as exc:
                raise EvidenceError(f"{path}: {exc.strerror or exc}") from None
            except EvidenceError as exc:
                raise EvidenceError(f"{path}: {exc}") from None
    return loaded


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL as DER, PEM, or hex-encoded DER (as some PCCS versions serve it), parsed whole: every
    part a verifier reads, each revoked entry's serial included, is read here (see ``_parse``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if b"-----BEGIN X509 CRL-----" in data:
                crl = x509.load_pem_x509_crl(data)
            elif re.fullmatch(rb"\s*([0-9a-fA-F]{2})+\s*", data):
                crl = x509.load_der_x509_crl(bytes.fromhex(data.decode().strip()))
            else:
                crl = x509.load_der_x509_crl(data)
            _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature, crl.tbs_certlist_bytes,
                 [entry.serial_number for entry in crl])
            return crl
        except Exception as exc:  # whatever the X.509 library rejects a hostile CRL with
            raise EvidenceError(f"cannot parse CRL: {type(exc).__name__}: {exc}"[:300]) from None


def load_crl_dir(folder: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL in the ``.crl`` files (DER or PEM, as AMD's KDS and Intel's PCS serve them) of ``folder``."""
    return load_files(folder, (".crl",), lambda data: [load_crl(data)])


@remembered
def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, in hex; remembered, as a chain search asks it of every root."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


@remembered
def subject_cn(cert: x509.Certificate) -> str:
    """The common name of ``cert``'s subject ("" when it has none)."""
    return common_name(cert.subject)


@remembered
def issuer_cn(cert: x509.Certificate) -> str:
    """The common name of ``cert``'s issuer ("" when it has none)."""
    return common_name(cert.issuer)


@remembered
def names_issuer(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``child``'s issuer name is ``issuer``'s subject (the names only: nothing is verified)."""
    return child.issuer == issuer.subject


@remembered
def signed_by_rsa_pss_sha384(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """AMD's certificate signatures: RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48, issuer name matches."""
    return names_issuer(child, issuer) and _pss_sha384(issuer, child.signature, child.tbs_certificate_bytes)


def crl_signed_by_rsa_pss_sha384(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """An AMD CRL's signature (as its certificates'), issuer name matching (not remembered: CRLs are rare)."""
    return crl.issuer == issuer.subject and _pss_sha384(issuer, crl.signature, crl.tbs_certlist_bytes)


def _pss_sha384(issuer: x509.Certificate, signature: bytes, signed: bytes) -> bool:
    """AMD's keys are RSA-4096, e = 65537 (snp.md section 4.3). A key the sender chose can cost far
    more per verification (a 3072-bit modulus takes an exponent of up to 3071 bits: 6 ms, and a table
    holds 64 look-alike issuers, all tried before any signature is known good): such a key verifies
    nothing."""
    key = issuer.public_key()
    if (not isinstance(key, rsa.RSAPublicKey) or key.key_size > AMD_RSA_BITS
            or key.public_numbers().e.bit_length() > RSA_EXPONENT_BITS_MAX):
        return False
    try:
        key.verify(signature, signed, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384())
        return True
    except InvalidSignature:
        return False


@remembered
def signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Issuer name matches and the signature verifies under the issuer's key (ECDSA/RSA)."""
    try:
        child.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def valid_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def validity(cert: x509.Certificate) -> str:
    return f"{cert.not_valid_before_utc:%Y-%m-%d}..{cert.not_valid_after_utc:%Y-%m-%d}"


def extension(cert: x509.Certificate, oid: str) -> bytes | None:
    """The raw value of an extension keybroker parses itself, or None."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def is_ec_key(cert: x509.Certificate, curve: type[ec.EllipticCurve]) -> bool:
    key = cert.public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve)


# -- DER ----------------------------------------------------------------------------------

def der_read(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, content, next position). Definite lengths only."""
    if pos + 2 > len(data):
        raise EvidenceError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise EvidenceError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise EvidenceError("truncated DER value")
    return tag, data[pos:pos + length], pos + length


def der_items(content: bytes) -> list[tuple[int, bytes]]:
    """The TLVs inside a constructed value."""
    items, pos = [], 0
    while pos < len(content):
        tag, value, pos = der_read(content, pos)
        items.append((tag, value))
    return items


def der_integer(data: bytes) -> int:
    """A DER INTEGER (tag 0x02) holding a non-negative value."""
    tag, content, end = der_read(data)
    if tag != 0x02 or end != len(data) or not content or content[0] & 0x80:
        raise EvidenceError("expected a non-negative DER INTEGER")
    return int.from_bytes(content, "big")


def der_oid(content: bytes) -> str:
    """Decode the content of an OBJECT IDENTIFIER whose arcs after the first two are at most
    ``OID_ARC_MAX`` (a UUID arc fits): a longer one could not even be turned into text."""
    if not content:
        raise EvidenceError("empty OID")
    arcs = [min(content[0] // 40, 2)]
    arcs.append(content[0] - 40 * arcs[0])
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if value > OID_ARC_MAX:
            raise EvidenceError(f"an OID arc is larger than {OID_ARC_MAX.bit_length()} bits")
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if content[-1] & 0x80:
        raise EvidenceError("truncated OID")
    return ".".join(map(str, arcs))
