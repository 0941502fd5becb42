"""The repository explains itself: no file points at one machine's paths or at documents outside the
repository, the amqtt defect letters used in the code are described in docs/, the Markdown links
resolve, and the README's device walk-through works from an empty installation against the real
`thingbridge serve` process."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Bridge

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFECTS = ROOT / "docs" / "amqtt-defects.md"
DEVICE_SECTION = "## Connect a device with mosquitto_pub"
# Built from pieces so that this file does not match itself.
MACHINE_PATHS = re.compile("|".join(["/" + "work/", "/" + "root/", "/" + "home/", "/" + "Users/"]))
OUTSIDE_DOCS = re.compile(r"\.\./" + "shared|" + "shared/(?:specs|amqtt-lab)|" + "DESIGN" + r"\.md")
TRACEBACK = "Traceback (most recent call last)"


# ---- (a) no machine paths, no pointers outside the repository -----------------------------------------
def repository_files() -> list[Path]:
    """Tracked files, plus new ones not ignored (about to be committed); a walk without git."""
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [ROOT / name for name in listed.split("\0") if name]
    else:
        skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "data"}
        files = [
            p for p in ROOT.rglob("*") if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
        ]
    return [p for p in files if p.is_file()]


def test_no_file_names_a_machine_path_or_a_document_outside_the_repository() -> None:
    offenders = []
    for path in repository_files():
        text = path.read_bytes().decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATHS.search(line) or OUTSIDE_DOCS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "\n".join(offenders)


# ---- (b) the defect letters are explained, links resolve ----------------------------------------------
def hardened_letters() -> set[str]:
    tree = ast.parse((ROOT / "bridge" / "mqtt" / "hardened.py").read_text())
    doc = ast.get_docstring(tree) or ""
    return set(re.findall(r"^  ([A-Z]'?) +\S", doc, re.MULTILINE))  # "  A  a resumed session..."


def test_every_defect_letter_of_the_code_is_described_in_docs() -> None:
    letters = hardened_letters()
    assert {"A", "B", "C", "D", "E", "F", "G", "G'", "H", "I"} <= letters, letters
    described = set(re.findall(r"^### ([A-Z]'?)\. ", DEFECTS.read_text(), re.MULTILINE))
    assert letters <= described, f"not described in docs/amqtt-defects.md: {sorted(letters - described)}"


def test_every_test_the_defects_page_names_exists() -> None:
    cited = set(re.findall(r"(tests/\w+\.py)::(\w+)", DEFECTS.read_text()))
    assert len(cited) >= 15
    missing = []
    for file, name in sorted(cited):
        source = ROOT / file
        defined = source.is_file() and re.search(rf"^(async )?def {name}\(", source.read_text(), re.MULTILINE)
        if not defined:
            missing.append(f"{file}::{name}")
    assert not missing, missing


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_in_readme_and_docs_resolve() -> None:
    assert len(markdown_files()) >= 3, "docs/amqtt-defects.md and docs/dialects.md are expected"
    broken = []
    for md in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (md.parent / file).resolve() if file else md
            if not path.exists():
                broken.append(f"{md.name}: {target}")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{md.name}: {target} (no such heading)")
    assert not broken, broken


# ---- (c) the README's device walk-through, against the real process -----------------------------------
def http_json(url: str, *, auth: str | None = None, token: str | None = None, body: object = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=15) as r:
        return json.loads(r.read())


def history(bridge: Bridge, token: str, thing_id: str) -> list[dict]:
    return http_json(f"{bridge.api}/things/{thing_id}/messages", token=token)["result"]


def device_section_blocks() -> list[str]:
    text = README.read_text()
    assert DEVICE_SECTION in text
    section = text.split(DEVICE_SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def for_this_server(block: str, ports: dict[str, int]) -> str:
    """The README's commands on the test server's ports; a subscription that would wait forever gets
    a count and a timeout and runs in the background, one that ends gets a timeout."""
    for ours, theirs in [
        ("localhost:8080", f"127.0.0.1:{ports['http']}"),
        ("-h localhost", "-h 127.0.0.1"),
        ("-p 8883", f"-p {ports['mqtt_tls']}"),
        ("-p 1883", f"-p {ports['mqtt_plain']}"),
    ]:
        block = block.replace(ours, theirs)
    commands: list[list[str]] = []
    for line in block.splitlines():
        if commands and commands[-1][-1].endswith("\\"):
            commands[-1].append(line)
        else:
            commands.append([line])
    for command in commands:
        if command[0].startswith("mosquitto_sub"):
            last = command[-1].rstrip()
            command[-1] = last[:-1] + "-W 30 &" if last.endswith("&") else last + " -C 1 -W 30 &"
    return "\n".join(line for command in commands for line in command) + "\n"


TOOLS = ("bash", "curl", "jq", "unzip", "mosquitto_pub", "mosquitto_sub")


@pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason=f"needs {', '.join(TOOLS)}")
def test_readme_device_walkthrough_runs_from_an_empty_installation(bridge: Bridge) -> None:
    """The shell blocks of the README's device section, as written (only the ports are this server's),
    from the server's folder, with no user created beforehand; the block that starts the server is
    the `bridge` fixture. Then the application subscribed at the end receives a message of the thing."""
    blocks = device_section_blocks()
    assert any("thingbridge serve" in b for b in blocks) and any("thingbridge user add" in b for b in blocks)
    script = "set -euo pipefail\n" + f'thingbridge() {{ "{sys.executable}" -m bridge "$@"; }}\n'
    script += "".join(for_this_server(b, bridge.ports) for b in blocks if "thingbridge serve" not in b)
    script += (  # a message for the application's subscription (its block ends the section)
        "sleep 2\n"
        f'(cd "thing-$ID" && mosquitto_pub --cafile ca.pem --cert certificate.pem --key private.key '
        f'-h 127.0.0.1 -p {bridge.ports["mqtt_tls"]} -i "$ID" -q 1 -t "things/$ID/collect" '
        "-m '{\"temp\": 22}')\n"
        "wait\n"
        'echo "ID=$ID TOKEN=$TOKEN"\n'
    )
    run = subprocess.run(
        ["bash", "-c", script], cwd=bridge.folder, capture_output=True, text=True, timeout=120
    )
    shown = f"--- script\n{script}--- stdout\n{run.stdout}--- stderr\n{run.stderr}"
    assert run.returncode == 0, shown
    assert TRACEBACK not in run.stdout + run.stderr, shown
    ids = re.search(r"^ID=(\S+) TOKEN=(\S+)$", run.stdout, re.MULTILINE)
    assert ids, shown
    thing_id, token = ids.groups()
    assert '{"led": "on"}' in run.stdout, "the thing's subscription did not receive the message\n" + shown
    assert f'things/{thing_id}/collect {{"temp": 22}}' in run.stdout, "the application saw nothing\n" + shown
    stored = [(m["messagetype"], m["message"]) for m in history(bridge, token, thing_id)]
    assert ("ingress", {"temp": 21.5}) in stored and ("egress", {"led": "on"}) in stored, stored
    assert TRACEBACK not in "".join(bridge.output)


def test_device_quickstart_steps_without_shell_tools(bridge: Bridge, tmp_path: Path) -> None:
    """The same sequence without curl, jq or unzip: `python -m bridge user add` in the server's folder
    (no --config: ./broker.yaml), a token over HTTP, a thing, its bundle unpacked with zipfile, and a
    mosquitto_pub with the bundle's certificate whose message lands in the history."""
    add = subprocess.run(
        [sys.executable, "-m", "bridge", "user", "add", "bob", "--password", "bob-password-1"],
        cwd=bridge.folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert add.returncode == 0 and TRACEBACK not in add.stdout + add.stderr, add.stdout + add.stderr
    token = http_json(f"{bridge.api}/token", auth="bob:bob-password-1")["accessToken"]
    thing_id = http_json(f"{bridge.api}/things", token=token, body={})["result"]["flthingspk"]
    request = urllib.request.Request(
        f"{bridge.api}/things/{thing_id}/dist", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=15) as r:
        (tmp_path / "thing.zip").write_bytes(r.read())
    with zipfile.ZipFile(tmp_path / "thing.zip") as bundle:
        bundle.extractall(tmp_path)
    folder = tmp_path / f"thing-{thing_id}"
    assert {"ca.pem", "certificate.pem", "private.key", "thing.json", "README.txt"} <= set(os.listdir(folder))
    assert json.loads((folder / "thing.json").read_text())["mqtt"]["port"] == bridge.ports["mqtt_tls"]
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto-clients not installed")
    pub = subprocess.run(
        ["mosquitto_pub", "--cafile", "ca.pem", "--cert", "certificate.pem", "--key", "private.key",
         "-h", "127.0.0.1", "-p", str(bridge.ports["mqtt_tls"]), "-i", thing_id, "-q", "1",
         "-t", f"things/{thing_id}/collect", "-m", '{"temp": 21.5}'],
        cwd=folder, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    assert [m["message"] for m in history(bridge, token, thing_id)] == [{"temp": 21.5}]
    assert TRACEBACK not in "".join(bridge.output)
