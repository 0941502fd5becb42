"""A thing's distribution bundle: what a device needs to connect, as files. `GET .../dist` zips it;
`thingbridge thing create --out DIR` writes it to a folder."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import orjson

from bridge.core import topics
from bridge.core.things import Thing


@dataclass
class Endpoints:
    host: str
    mqtt_tls_port: int
    http_port: int
    https_port: int | None
    # Where the device routes (collect, the egress long-poll) are mounted: http.mounts.things_gateway.
    api_path: str = "/dev/v1"

    def http_urls(self) -> list[str]:
        """The device API's public URLs: plain HTTP, and HTTPS when it is served."""
        urls = [f"http://{self.host}:{self.http_port}{self.api_path}"]
        if self.https_port:
            urls.append(f"https://{self.host}:{self.https_port}{self.api_path}")
        return urls


def thing_files(thing: Thing, ca_pem: str, ep: Endpoints) -> dict[str, bytes]:
    key_file = "private.key" if thing.private_key_pem else "<your private key>"
    config = {
        "thingId": thing.id,
        "clientId": thing.id,
        "mqtt": {"host": ep.host, "port": ep.mqtt_tls_port, "tls": True, "protocol": "MQTT 3.1.1"},
        "http": dict(zip(("url", "httpsUrl"), ep.http_urls(), strict=False)),
        "files": {"ca": "ca.pem", "certificate": "certificate.pem", "privateKey": key_file},
        "topics": {
            "publishTo": {flow: topics.topic(thing.id, flow) for flow in topics.DEVICE_TOPICS},
            "subscribeTo": {flow: topics.topic(thing.id, flow) for flow in topics.CLOUD_TOPICS},
        },
    }
    common = f"--cafile ca.pem --cert certificate.pem --key {key_file} -h {ep.host} -p {ep.mqtt_tls_port}"
    readme = f"""thingbridge device bundle for thing {thing.id}

Files: ca.pem (the bridge CA), certificate.pem (this thing's certificate, CN={thing.id}),
{"private.key (its private key: keep it secret), " if thing.private_key_pem else ""}public.key, thing.json.

Send a message (stored, and seen by applications on things/+/collect):
  mosquitto_pub {common} -i {thing.id} -q 1 -t {topics.topic(thing.id, topics.COLLECT)} -m '{{"temp": 21.5}}'

Receive messages published to this thing:
  mosquitto_sub {common} -i {thing.id}:sub -q 1 -t {topics.topic(thing.id, topics.PUBLISH)}

The client id must be the thing id, or start with "{thing.id}:" for extra connections.
A thing may use only topics under {topics.thing_prefix(thing.id)}.
"""
    files = {
        "ca.pem": ca_pem.encode(),
        "certificate.pem": thing.cert_pem.encode(),
        "public.key": thing.public_key_pem.encode(),
        "thing.json": orjson.dumps(config, option=orjson.OPT_INDENT_2),
        "README.txt": readme.encode(),
    }
    if thing.private_key_pem:
        files["private.key"] = thing.private_key_pem.encode()
    return files


def zip_bytes(files: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}", data)
    return buf.getvalue()
