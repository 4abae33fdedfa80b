"""TLS certificates for the SuperLink and authentication keys for SuperNodes.

Layout of a certificate directory (what `flower-superlink` / `flower-supernode` / `flwr` are given):

    ca.crt, ca.key                the federation's own certificate authority (keep ca.key offline)
    superlink.crt, superlink.key  the SuperLink's TLS certificate for the given host names / IPs
    nodes/<name>.key, .pub        a SuperNode's authentication key pair (ECDSA P-384, OpenSSH format);
                                  the operator registers the .pub, the silo keeps the .key

Existing files are never overwritten: running the command again with more `--nodes` adds their keys
and keeps everything else, so a running federation's certificates stay valid.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertificateError(ValueError):
    """The certificate directory cannot serve the request as given."""


@dataclass(frozen=True)
class CertificateSet:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def superlink_cert(self) -> Path:
        return self.directory / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.directory / "superlink.key"

    def node_key(self, name: str) -> Path:
        return self.directory / "nodes" / f"{name}.key"

    def node_public_key(self, name: str) -> Path:
        return self.directory / "nodes" / f"{name}.pub"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=False)
    path.write_bytes(data)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _host_key(host: str) -> str:
    """A host as certificates compare it: an IP address in its canonical form, a DNS name in lower case."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            labels = host.split(".")
            if (not host or len(host) > 253 or not host.isascii() or any(c in host for c in " /:")
                    or not all(0 < len(label) <= 63 for label in labels)):
                raise CertificateError(f"{host!r} is neither a host name nor an IP address; give e.g. "
                                       "--hosts superlink.example.org 10.0.0.5 (an internationalised name in its "
                                       "xn-- form)") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _load_or_create_ca(certs: CertificateSet, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path = certs.directory / "ca.key"
    if certs.ca.exists() != key_path.exists():
        raise CertificateError(f"{certs.directory} holds only one of ca.crt and ca.key; restore the other or use a new "
                               "directory (the nodes' trust hangs on this CA)")
    if certs.ca.exists():
        return (x509.load_pem_x509_certificate(certs.ca.read_bytes()),
                serialization.load_pem_private_key(key_path.read_bytes(), password=None))  # type: ignore[return-value]
    key = ec.generate_private_key(ec.SECP384R1())
    name = _subject("fed-adapters federation CA")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5)).not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _pkcs8(key))
    certs.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _create_superlink_cert(certs: CertificateSet, hosts: list[str], ca_cert: x509.Certificate,
                           ca_key: ec.EllipticCurvePrivateKey, days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        # The SAN is what clients check; the common name is only a label (and limited to 64 characters).
        x509.CertificateBuilder().subject_name(_subject("fed-adapters SuperLink")).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5)).not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(certs.superlink_key, _pkcs8(key))
    certs.superlink_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def superlink_hosts(certs: CertificateSet) -> list[str]:
    """The host names and IPs the SuperLink's certificate is valid for."""
    cert = x509.load_pem_x509_certificate(certs.superlink_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def _create_node_keys(certs: CertificateSet, name: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(certs.node_key(name), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    certs.node_public_key(name).write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def create_certificates(directory: str | Path, nodes: list[str], hosts: list[str] | None = None,
                        days: int = 365) -> CertificateSet:
    """Creates whatever of the CA, the SuperLink certificate and the nodes' key pairs is missing.

    `hosts` (default: loopback) are the names and IPs nodes use to reach the SuperLink; given for a
    directory whose SuperLink certificate exists, they must be covered by it.
    """
    bad = [n for n in nodes if not n or not all(c.isalnum() or c in "-_." for c in n)]
    if bad:
        raise CertificateError(f"node names {bad} may hold only letters, digits, '-', '_' and '.'")
    if days < 1:
        raise CertificateError(f"--days must be >= 1, got {days}")
    _san(list(hosts or DEFAULT_HOSTS))  # bad host names fail before anything is written
    certs = CertificateSet(Path(directory))
    certs.directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_or_create_ca(certs, days)
    if certs.superlink_cert.exists():
        covered = {_host_key(h) for h in superlink_hosts(certs)}
        missing = [h for h in hosts or [] if _host_key(h) not in covered]
        if missing:
            raise CertificateError(
                f"{certs.superlink_cert} exists and does not cover {missing}; move superlink.crt and superlink.key "
                "away to issue a new one (the CA and the node keys stay valid)")
    elif certs.superlink_key.exists():
        raise CertificateError(f"{certs.superlink_key} exists without its certificate {certs.superlink_cert.name}; put the "
                               "certificate back, or move the key away to issue a new pair (the CA and node keys stay valid)")
    else:
        _create_superlink_cert(certs, list(hosts or DEFAULT_HOSTS), ca_cert, ca_key, days)
    for name in nodes:
        # Either half present means the node has its keys: the silo may have taken the .key away, and the
        # SuperLink knows the .pub; a new pair would lock the node out.
        if not certs.node_key(name).exists() and not certs.node_public_key(name).exists():
            _create_node_keys(certs, name)
    return certs
