"""A real Kubernetes control plane on loopback: etcd + kube-apiserver, built from their Go modules.

There is no kubelet, controller-manager or scheduler: CRDs, admission webhooks, RBAC, TokenRequest and
TokenReview are all served by the API server itself, which is what the operator and its webhooks
use. Pods stay Pending, namespaces never finish deleting (each test gets a fresh one).

Users (static token file): ``admin`` (system:masters) is the kubeconfig's user; ``alice`` (dba),
``bob`` (developers) and ``carol`` (dba) are real, distinct identities for approval tests; use
``kubectl(..., user="alice")`` to act as one of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fix_postgres import free_port, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERS = {"admin": ("system:masters",), "alice": ("dba",), "bob": ("developers",), "carol": ("dba",),
         "dave": ("support",)}


def tools_bin() -> pathlib.Path:
    tools = pathlib.Path(os.environ.get("DBGUARD_TOOLS_DIR", pathlib.Path.home() / ".cache" / "dbguard-tools"))
    binary = tools / "bin"
    if not all((binary / b).exists() for b in ("etcd", "kube-apiserver", "kubectl")):
        # Never skipped: build them (cached by a version stamp; the cold build is long).
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-tools.sh"), "etcd", "k8s"], check=True)
    return binary


# -- PKI ---------------------------------------------------------------------------------------------


def _write_key(path: pathlib.Path, key: object) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                       serialization.NoEncryption()))


@dataclasses.dataclass
class TestCA:
    """A small CA for the API server, client certificates and webhook serving certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "dbguard-test-ca") -> TestCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool, orgs: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for a serving (127.0.0.1/localhost) or a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


# -- the control plane -------------------------------------------------------------------------------


@dataclasses.dataclass
class KubePlane:
    dir: pathlib.Path
    bin: pathlib.Path
    server: str
    ca: TestCA
    ca_file: pathlib.Path
    kubeconfig: pathlib.Path
    tokens: dict[str, str]  # user -> bearer token
    procs: list[subprocess.Popen]

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost"}

    def kubectl(self, *args: str, input: str | None = None, user: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl as admin, or as ``user`` (one of USERS) with its own token."""
        cmd = [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig)]
        if user is not None:
            cmd += ["--user", user]
        proc = subprocess.run(cmd + list(args), input=input, capture_output=True, text=True, env=self.env(),
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def api_client(self, user: str = "admin"):  # noqa: ANN201 - kubernetes.client.ApiClient
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.api_key = {"authorization": f"Bearer {self.tokens[user]}"}
        return client.ApiClient(cfg)

    def token_kubeconfig(self, token: str, path: pathlib.Path) -> pathlib.Path:
        """A kubeconfig that authenticates with ``token`` (e.g. a ServiceAccount's, as a pod would)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "c", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "pod", "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "c", "user": "pod"}}]}))
        return path

    def namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        return name

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_plane(workdir: pathlib.Path) -> KubePlane:
    binary = tools_bin()
    pki = workdir / "pki"
    pki.mkdir(parents=True)
    ca = TestCA.create()
    (pki / "ca.crt").write_bytes(ca.pem())
    crt, key = ca.issue("kube-apiserver", server=True)
    (pki / "apiserver.crt").write_bytes(crt)
    (pki / "apiserver.key").write_bytes(key)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    tokens = {user: secrets.token_hex(24) for user in USERS}
    (pki / "tokens.csv").write_text("".join(f'{tokens[u]},{u},uid-{u},"{",".join(g)}"\n' for u, g in USERS.items()))

    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    etcd_log = open(workdir / "etcd.log", "wb")  # noqa: SIM115 - lives as long as the process
    procs.append(subprocess.Popen(
        [str(binary / "etcd"), "--name=cp", f"--data-dir={workdir / 'etcd'}",
         f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
         f"--listen-peer-urls=http://127.0.0.1:{peer_port}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
         f"--initial-cluster=cp=http://127.0.0.1:{peer_port}", "--unsafe-no-fsync=true", "--log-level=warn"],
        stdout=etcd_log, stderr=subprocess.STDOUT))
    server = f"https://127.0.0.1:{api_port}"
    api_log = open(workdir / "apiserver.log", "wb")  # noqa: SIM115
    procs.append(subprocess.Popen(
        [str(binary / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
         "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
         "--endpoint-reconciler-type=none", f"--cert-dir={pki}", f"--tls-cert-file={pki / 'apiserver.crt'}",
         f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
         f"--token-auth-file={pki / 'tokens.csv'}", "--authorization-mode=RBAC",
         f"--service-account-issuer={server}", f"--service-account-key-file={pki / 'sa.pub'}",
         f"--service-account-signing-key-file={pki / 'sa.key'}", "--service-cluster-ip-range=10.0.0.0/24",
         "--allow-privileged=true", "--disable-admission-plugins=ServiceAccount", "--v=0"],
        stdout=api_log, stderr=subprocess.STDOUT))
    kubeconfig = workdir / "kubeconfig"
    users = "".join(f"- name: {u}\n  user:\n    token: {t}\n" for u, t in tokens.items())
    kubeconfig.write_text(
        f"apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n"
        f"    certificate-authority: {pki / 'ca.crt'}\nusers:\n{users}contexts:\n- name: test\n  context:\n"
        f"    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n")
    plane = KubePlane(dir=workdir, bin=binary, server=server, ca=ca, ca_file=pki / "ca.crt",
                      kubeconfig=kubeconfig, tokens=tokens, procs=procs)

    def ready() -> bool:
        for proc, log in ((procs[0], "etcd.log"), (procs[1], "apiserver.log")):
            if proc.poll() is not None:
                raise RuntimeError(f"{log} process exited:\n{(workdir / log).read_text()[-3000:]}")
        return plane.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0 and \
            plane.kubectl("get", "namespace", "default", check=False, timeout=10).returncode == 0

    try:
        wait_until(ready, timeout=120, what="kube-apiserver /readyz")
    except BaseException:
        plane.stop()
        raise
    return plane


@pytest.fixture(scope="session")
def kube() -> Iterator[KubePlane]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-kube-"))
    plane = start_plane(workdir)
    try:
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def kube_ns(kube: KubePlane) -> str:
    """A fresh namespace per test (namespaces never finish deleting without a controller-manager)."""
    return kube.namespace()
