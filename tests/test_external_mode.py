"""External mode (issue #15): devices connect to a RabbitMQ cluster that asks the bridge who they
are and what they may do (tests/engine.py starts the cluster)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.engine import RabbitCluster


def _tls(cluster: RabbitCluster, port: int, ctx: ssl.SSLContext) -> bytes:
    """Handshake with a node's MQTT/TLS listener and read until it closes (TLS 1.3 reports a refused
    client certificate after the handshake, on the first read)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"\x10\x00")  # a truncated CONNECT: the server answers by closing
        return tls.recv(16)


def test_each_node_serves_mqtt_tls_with_a_certificate_of_the_bridge_ca(rabbit_cluster: RabbitCluster) -> None:
    assert len(rabbit_cluster.nodes) == 2
    ctx = ssl.create_default_context(cafile=str(rabbit_cluster.ca_dir / "ca.pem"))
    for node in rabbit_cluster.nodes:
        _tls(rabbit_cluster, node.mqtts, ctx)  # the server certificate verifies for 127.0.0.1


def test_a_client_certificate_of_another_ca_is_refused_by_the_engine(
    rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "k.pem").write_bytes(pem)
    ctx = ssl.create_default_context(cafile=str(rabbit_cluster.ca_dir / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(ssl.SSLError, match=r"BAD_CERTIFICATE|UNKNOWN_CA"):
        _tls(rabbit_cluster, rabbit_cluster.nodes[0].mqtts, ctx)
