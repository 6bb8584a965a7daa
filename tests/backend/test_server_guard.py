"""What a web page, a hostile upload or a slow client can do to a backend on 127.0.0.1: nothing.

Every request here is sent over real HTTP with the headers a browser sends (or would send after
DNS rebinding), and each refused request must leave the job store as it was.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from server_helpers import ROOT, BackendProcess, panorama_job, texture_job, tree_listing, wait_for

from backend.client import BackendClient, BackendError
from backend.geometry.mesh import Mesh
from backend.protocol import TextureJob

BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Accept": "*/*", "Accept-Language": "en-GB,en;q=0.5", "Accept-Encoding": "gzip, deflate, br, zstd",
    "Sec-Fetch-Dest": "empty", "Sec-Fetch-Mode": "no-cors", "Connection": "keep-alive",
}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    # Large enough to unpack a 1 GiB view, so the view limit (not the unpacked size) must refuse it.
    process = BackendProcess(tmp_path_factory.mktemp("guard") / "store", max_body_mb=300,
                             extra=("--upload-timeout", "20", "--max-texture-size", "2048"))
    yield process
    process.stop()


def send(backend, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         host: str | None = None) -> tuple[int, dict]:
    """One request with exactly these headers (Host included), as a browser would put them."""
    connection = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=60)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", host or f"127.0.0.1:{backend.port}")
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    if body or method == "POST":
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body or None)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, {}


def job_count(backend) -> int:
    return len(backend.client.jobs())


# ---------------------------------------------------------------------- a web page in the user's browser
@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain;charset=UTF-8"},
    {"Origin": "null", "Sec-Fetch-Site": "cross-site", "Content-Type": "application/x-www-form-urlencoded",
     "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
    {"Origin": "null", "Content-Type": "application/octet-stream"},  # a browser without Sec-Fetch-*
    {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site", "Content-Type": "text/plain"},
    {"Origin": "http://127.0.0.1:1", "Content-Type": "application/octet-stream"},
], ids=["cross-site-text", "form-origin-null", "origin-null", "other-local-port", "foreign-origin"])
def test_a_web_page_cannot_submit_a_job(backend, headers):
    before = tree_listing(backend.store)
    status, answer = send(backend, "POST", "/v1/jobs", panorama_job().to_bytes(), {**BROWSER, **headers})
    assert status == 403, answer
    assert tree_listing(backend.store) == before


def test_a_web_page_cannot_cancel_or_resubmit(backend):
    job = backend.client.submit(texture_job(steps=400).to_bytes())
    try:
        for action in ("cancel", "resubmit"):
            headers = {**BROWSER, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
                       "Content-Type": "text/plain;charset=UTF-8"}
            status, _ = send(backend, "POST", f"/v1/jobs/{job['id']}/{action}", b"x", headers)
            assert status == 403
        assert backend.client.status(job["id"])["state"] in ("queued", "running")
    finally:
        backend.client.cancel(job["id"])
        backend.client.wait(job["id"], poll=0.05, timeout=60)


def test_a_text_plain_upload_is_refused_even_without_an_origin(backend):
    before = tree_listing(backend.store)
    status, _ = send(backend, "POST", "/v1/jobs", panorama_job().to_bytes(), {"Content-Type": "text/plain"})
    assert status == 415
    assert tree_listing(backend.store) == before


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/version", "/v1/health", "/openapi.json",
                                  "/v1/jobs/0123456789abcdef0123456789abcdef/result"])
def test_dns_rebinding_gets_nothing(backend, path):
    # After rebinding, the page's own origin points at 127.0.0.1: the browser calls it same-origin.
    headers = {**BROWSER, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    status, _ = send(backend, "GET", path, headers=headers, host=f"evil.example:{backend.port}")
    assert status == 400


@pytest.mark.parametrize("host", ["localhost:{port}", "[::1]:{port}", "127.0.0.1:{port}", "127.0.0.1"])
def test_the_loopback_names_are_answered(backend, host):
    status, answer = send(backend, "GET", "/v1/health", host=host.format(port=backend.port))
    assert status == 200 and answer["status"] == "ok"


def test_the_servers_own_page_may_submit(backend):
    """The /docs page in a browser: same origin, binary body."""
    headers = {**BROWSER, "Origin": f"http://localhost:{backend.port}", "Sec-Fetch-Site": "same-origin",
               "Sec-Fetch-Mode": "cors", "Content-Type": "application/octet-stream"}
    status, answer = send(backend, "POST", "/v1/jobs", panorama_job().to_bytes(), headers,
                          host=f"localhost:{backend.port}")
    assert status == 201, answer
    backend.client.cancel(answer["id"])
    backend.client.wait(answer["id"], poll=0.05, timeout=240)


# ---------------------------------------------------------------------- malformed uploads
def _npz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy_header(shape: tuple, dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _meta(text: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(text.encode(), dtype=np.uint8))
    return buffer.getvalue()


def _named(names: list[str]) -> bytes:
    job = texture_job()
    ids = np.arange(len(job.mesh.triangles)) % len(names)
    mesh = Mesh(job.mesh.vertices, job.mesh.triangles, None, ids)
    return TextureJob(job.settings, job.cameras, job.depths, mesh, job.texture_size, names).to_bytes()


PANORAMA_META = '{"api_version": 1, "kind": "panorama", "settings": {"prompts": ["sky"], "seed": %s}}'


@pytest.mark.parametrize(("body", "field"), [
    (lambda: panorama_job().to_bytes() + b"trailing garbage", "body"),
    (lambda: b"garbage in front" + panorama_job().to_bytes(), "body"),
    (lambda: _npz({"depths.npy": _npy_header((10**5, 10**5, 10**5)) + b"\0" * 16}), "depths"),
    (lambda: _npz({"job.json": json.dumps({"api_version": 1, "kind": "panorama"}).encode()}), "body"),
    (lambda: _npz({"job.json.npy": _meta("[" * 100_000 + "]" * 100_000)}), "job.json"),
    (lambda: _npz({"job.json.npy": _meta(PANORAMA_META % ("1" * 5000))}), "job.json"),
    (lambda: _npz({"job.json.npy": _meta(PANORAMA_META % "1"), "a\0b.npy": _meta("x")}), "body"),
    (lambda: _named(["wall\0one", "wall\0two"]), "object_names[0]"),
], ids=["trailing-bytes", "leading-bytes", "huge-declared-shape", "raw-job-json", "deep-json",
        "5000-digit-integer", "nul-in-member-name", "nul-in-object-name"])
def test_malformed_uploads_are_422_naming_the_field(backend, body, field):
    before = tree_listing(backend.store)
    status, answer = send(backend, "POST", "/v1/jobs", body(), {"Content-Type": "application/octet-stream"})
    assert status == 422, answer
    assert answer["detail"]["field"] == field
    assert tree_listing(backend.store) == before


# ---------------------------------------------------------------------- jobs that cannot fit
def _huge_object_id() -> bytes:
    job = texture_job()
    ids = np.zeros(len(job.mesh.triangles), np.int32)
    ids[-1] = 2**31 - 1
    mesh = Mesh(job.mesh.vertices, job.mesh.triangles, None, ids)
    return TextureJob(job.settings, job.cameras, job.depths, mesh, job.texture_size).to_bytes()


class _RepeatedBlocks:
    """Deflate for a member written as one header and then the same block many times.

    Each write ends with a full flush, which resets the compressor, so the same block always
    compresses to the same bytes: it is compressed once, and a 1 GiB member costs one 16 MiB pass.
    """

    def __init__(self) -> None:
        self.compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.last: tuple[bytes, bytes] | None = None

    def compress(self, data: bytes) -> bytes:
        if self.last is not None and self.last[0] is data:
            return self.last[1]
        out = self.compressor.compress(data) + self.compressor.flush(zlib.Z_FULL_FLUSH)
        self.last = (data, out)
        return out

    def flush(self) -> bytes:
        return self.compressor.flush(zlib.Z_FINISH)


def _one_huge_view(side: int = 16384) -> bytes:
    """A zip of about 1 MiB that unpacks to one side x side float32 depth map (zeros)."""
    job = texture_job(frames=1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        small = {"K": np.stack([job.cameras[0].K]), "cam_to_world": np.stack([job.cameras[0].cam_to_world]),
                 "vertices": job.mesh.vertices, "triangles": job.mesh.triangles}
        for name, array in small.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.save(member, array)
        meta = {"api_version": 1, "kind": "texture", "settings": {"prompts": ["a room"]}, "texture_size": 512}
        with archive.open("job.json.npy", "w") as member:
            np.save(member, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        with archive.open("depths.npy", "w", force_zip64=True) as member:
            member._compressor = _RepeatedBlocks()  # zipfile's deflate, fed block by block
            member.write(_npy_header((1, side, side)))
            block = bytes(16 * 2**20)
            for _ in range(side * side * 4 // len(block)):
                member.write(block)
    return buffer.getvalue()


@pytest.mark.parametrize(("body", "field"), [
    (_huge_object_id, "object_ids"),
    (_one_huge_view, "depths"),
    (lambda: texture_job(texture_size=4096).to_bytes(), "texture_size"),
], ids=["object-id-2^31-1", "one-16384-view", "texture-over-the-limit"])
def test_jobs_that_cannot_fit_are_refused_at_submission(backend, body, field):
    data = body()
    assert len(data) < 2 * 2**20  # small uploads: the danger is what they declare
    before = tree_listing(backend.store)
    status, answer = send(backend, "POST", "/v1/jobs", data, {"Content-Type": "application/octet-stream"})
    assert status == 413, answer
    assert answer["detail"]["field"] == field and "limit" in answer["detail"]["problem"]
    assert tree_listing(backend.store) == before


# ---------------------------------------------------------------------- slow uploads
def test_a_stalled_upload_is_dropped_while_the_server_answers(backend):
    body = panorama_job().to_bytes()
    slow = socket.create_connection(("127.0.0.1", backend.port), timeout=60)
    try:
        slow.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % (backend.port, len(body)) + body[:100])
        # The part received so far is on the store's disk, not in memory, and the API still answers.
        wait_for(lambda: any(p.stat().st_size == 100 for p in (backend.store / "incoming").iterdir()), timeout=30)
        assert backend.client.health()["status"] == "ok"
        assert isinstance(backend.client.jobs(), list)
        answer = slow.recv(65536).decode("latin-1")  # the server gives up on the stalled body by itself
    finally:
        slow.close()
    assert answer.startswith("HTTP/1.1 408")
    wait_for(lambda: not any((backend.store / "incoming").iterdir()), timeout=10)


# ---------------------------------------------------------------------- deleting jobs
def test_delete_refuses_a_running_job_and_removes_a_finished_one(backend):
    job = backend.client.submit(texture_job(steps=400).to_bytes())
    folder = backend.store / "jobs" / job["id"]
    wait_for(lambda: backend.client.status(job["id"])["state"] == "running", timeout=120)
    with pytest.raises(BackendError) as err:
        backend.client.delete(job["id"])
    assert err.value.status == 409 and "cancel it first" in err.value.message
    backend.client.cancel(job["id"])
    assert backend.client.wait(job["id"], poll=0.05, timeout=60)["state"] == "cancelled"
    assert folder.is_dir()
    backend.client.delete(job["id"])
    assert not folder.exists()
    with pytest.raises(BackendError) as err:
        backend.client.status(job["id"])
    assert err.value.status == 404


# ---------------------------------------------------------------------- the token
def test_token_from_a_file_guards_the_schema_and_the_docs(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789\n")
    server = BackendProcess(tmp_path / "store", extra=("--token-file", str(token_file)))
    try:
        for path in ("/openapi.json", "/docs", "/v1/jobs"):
            assert send(server, "GET", path)[0] == 401
            assert send(server, "GET", path, headers={"Authorization": "Bearer file-token-0123456789"})[0] == 200
        assert BackendClient(server.client.url, token="file-token-0123456789").jobs() == []
        command_line = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert b"file-token" not in command_line
    finally:
        server.stop()


@pytest.mark.parametrize(("args", "env_token", "message"), [
    (["--token", "secret-on-the-command-line"], None, "--token-file"),
    ([], "          ", "token: is empty or only whitespace"),
], ids=["token-in-argv", "whitespace-token"])
def test_tokens_that_would_leak_or_guard_nothing_are_refused(tmp_path, args, env_token, message):
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if env_token is not None:
        env["MVDIFF_TOKEN"] = env_token
    result = subprocess.run([sys.executable, "-m", "backend", "serve", "--models", "tiny", "--port", "1",
                             "--store", str(tmp_path / "store"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
