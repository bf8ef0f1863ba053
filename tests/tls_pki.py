"""Certificates made in the test (`cryptography`): small CAs issuing server and client leaves
(EC P-256), written as PEM files, and nginx as a TLS-terminating gRPC front (`grpc_pass`,
client certificates required) standing in for Temporal Cloud."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import rig


@dataclass
class Leaf:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


class Ca:
    """A self-signed CA in `directory`/`name`.crt that issues leaves."""

    def __init__(self, directory: Path, name: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = self.dir / f"{name}.crt"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def pem(self) -> bytes:
        return self.cert_file.read_bytes()

    def issue(self, cn: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False,
              uris: tuple[str, ...] = ()) -> Leaf:
        """A leaf named `cn` (its files `{ca}-{cn}.crt/.key`: a later leaf of the same name
        replaces them) for the names `dns`, `ips` and `uris` (SPIFFE IDs), for client or server
        authentication."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = ([x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
                + [x509.UniformResourceIdentifier(u) for u in uris])
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        leaf = Leaf(self.dir / f"{self.name}-{cn}.crt", self.dir / f"{self.name}-{cn}.key")
        leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, leaf.key)
        return leaf

    def server(self, cn: str) -> Leaf:
        return self.issue(cn, dns=tuple(dict.fromkeys((cn, "localhost"))), ips=("127.0.0.1",))

    def client(self, cn: str) -> Leaf:
        return self.issue(cn, client=True)


def spki_sha256_b64(leaf: Leaf) -> str:
    """Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo (what Chromium's
    `--ignore-certificate-errors-spki-list` takes)."""
    import base64
    import hashlib

    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def nginx_bin() -> Optional[str]:
    for cand in ("/usr/sbin/nginx", shutil.which("nginx")):
        if cand and Path(cand).exists():
            return cand
    return None


class TlsFront:
    """nginx terminating TLS in front of a gRPC server (`grpc_pass`), requiring a client
    certificate issued by `client_ca` (`ssl_verify_client on`), with an access log line per
    request naming the verified client (`$ssl_client_verify`, `$ssl_client_s_dn`). Runs from
    a temporary prefix on a free port, in the foreground, as a managed process."""

    def __init__(self, workdir: Path, upstream: str, server: Leaf, client_ca: Ca):
        self.prefix = Path(workdir)
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.port = rig.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server, self.client_ca = server, client_ca
        self.proc: Optional[rig.ManagedProcess] = None

    def config(self) -> str:
        p = self.prefix
        # nginx 1.22 (Debian 12): `listen ... ssl http2`.
        return f"""worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format tls '$remote_addr "$request" $status verify=$ssl_client_verify dn="$ssl_client_s_dn"';
    access_log {p}/access.log tls;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    client_max_body_size 0;
    client_body_buffer_size 8m;
    server {{
        listen 127.0.0.1:{self.port} ssl http2;
        ssl_certificate {self.server.cert};
        ssl_certificate_key {self.server.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {self.client_ca.cert_file};
        ssl_verify_client on;
        location / {{
            grpc_pass grpc://{self.upstream};
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""

    def start(self, timeout: float = 20.0) -> "TlsFront":
        binary = nginx_bin()
        if binary is None:
            raise FileNotFoundError("nginx not installed (scripts/setup.sh installs Debian's nginx)")
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.config())
        self.proc = rig.ManagedProcess("nginx", [binary, "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"],
                                       self.prefix / "stdout.log")
        rig.wait_until(lambda: rig.port_accepts(self.port) or not self.proc.alive(), timeout, what="nginx listening")
        if not self.proc.alive():
            raise RuntimeError(f"nginx exited early\n{self.proc.describe()}\n{self.error_log()}")
        return self

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)
            self.proc = None
