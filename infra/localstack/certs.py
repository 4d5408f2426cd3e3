"""A private CA and the certificates of every database hop: `python -m infra.localstack.certs DIR`.

PostgreSQL and PgBouncer each get a server certificate for 127.0.0.1/localhost (and
the names given, for compose and k8s), signed by a CA of the stack's own; PgBouncer
also gets a client certificate for the application role, the only way that role gets
past PostgreSQL's pg_hba.conf. Files are made once and again only when missing or
within `RENEW_WITHIN` of expiry, so a running stack keeps its trust. Private keys are
0600; `rotate` re-issues the server certificates under the same CA, for a reload.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)
CA_VALIDITY = dt.timedelta(days=3650)
RENEW_WITHIN = dt.timedelta(days=30)
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """Where one directory keeps the CA, the two servers' pairs and PgBouncer's client pair."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def servers(self) -> tuple[str, str]:
        return ("postgres", "pgbouncer")

    @property
    def client(self) -> str:
        """PgBouncer's client pair toward PostgreSQL (common name: the application role)."""
        return "pgbouncer-client"

    def all_files(self) -> list[Path]:
        names = [*self.servers, self.client]
        return [self.ca_cert, self.ca_key, *map(self.cert, names), *map(self.key, names)]

    def libpq(self, *, client_cert: bool = False) -> dict[str, str]:
        """libpq parameters that verify the server (and present the client pair)."""
        params = {"sslmode": "verify-full", "sslrootcert": str(self.ca_cert)}
        if client_cert:
            params |= {"sslcert": str(self.cert(self.client)), "sslkey": str(self.key(self.client))}
        return params


def ensure(
    directory: Path, *, app_role: str = "app", names: tuple[str, ...] = ()
) -> tuple[TlsFiles, bool]:
    """The certificates under `directory`, (re)made when missing or expiring; True if made."""
    files = TlsFiles(directory)
    if all(map(_fresh, [files.ca_cert, *map(files.cert, [*files.servers, files.client])])) and all(
        p.exists() for p in files.all_files()
    ):
        return files, False
    directory.mkdir(parents=True, exist_ok=True)
    if not (_fresh(files.ca_cert) and files.ca_key.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        # A name of its own: a client trusting another pgscale CA must fail verification,
        # not look this one up by name.
        common_name = f"pgscale CA {secrets.token_hex(4)}"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(name, name, key.public_key(), CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write(files.ca_key, _key_pem(key), private=True)
        _write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    rotate(files, names=names)
    _issue(files, files.client, app_role, (), ExtendedKeyUsageOID.CLIENT_AUTH)
    return files, True


def for_servers(directory: Path, *, app_role: str = "app") -> tuple[TlsFiles, bool]:
    """`ensure`, then hand the pairs to the user PostgreSQL and PgBouncer run as.

    The CA's key stays with the caller: nothing that serves needs it.
    """
    from infra.localstack import procs  # here: containers run this module without it

    files, made = ensure(directory, app_role=app_role)
    procs.hand_to_service_user(*(p for p in files.all_files() if p != files.ca_key))
    return files, made


def rotate(files: TlsFiles, *, names: tuple[str, ...] = ()) -> None:
    """New keys and certificates for both servers, signed by the same CA."""
    for server in files.servers:
        _issue(files, server, server, (*LOCAL_NAMES, *names), ExtendedKeyUsageOID.SERVER_AUTH)


def serial(path: Path) -> int:
    """The serial number of the certificate at `path` (tells a rotated one apart)."""
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _issue(
    files: TlsFiles,
    name: str,
    common_name: str,
    alt_names: tuple[str, ...],
    usage: x509.ObjectIdentifier,
) -> None:
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _builder(subject, ca.subject, key.public_key(), VALIDITY).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in alt_names]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    # Key first: a reader that sees the new certificate must find its key beside it.
    _write(files.key(name), _key_pem(key), private=True)
    _write(files.cert(name), cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: dt.timedelta
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + days)
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fresh(path: Path) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_WITHIN


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write beside and rename, so a server reloading mid-write reads a whole file."""
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(partial, 0o600 if private else 0o644)
    if path.exists():  # keep the owner a server reads it as
        stat = path.stat()
        if os.geteuid() == 0:
            os.chown(partial, stat.st_uid, stat.st_gid)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--name", action="append", default=[], help="another server name (SAN)")
    parser.add_argument("--app-role", default="app", help="common name of PgBouncer's client pair")
    args = parser.parse_args(argv)
    files, made = ensure(args.directory, app_role=args.app_role, names=tuple(args.name))
    print(f"certificates {'made' if made else 'kept'} in {files.directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
