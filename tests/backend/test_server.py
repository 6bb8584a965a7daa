"""The backend over real HTTP on 127.0.0.1, with the tiny models in a separate process."""

from __future__ import annotations

import http.client
import io
import json
import threading
import urllib.request
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
from hdr_reader import read_hdr
from server_helpers import (
    TOKEN,
    BackendProcess,
    depth_with_nan,
    panorama_job,
    texture_job,
    tree_listing,
    wait_for,
)

from backend.client import BackendClient, BackendError
from backend.imaging.hdr import read_exr
from backend.protocol import pack_arrays


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend")
    process = BackendProcess(root / "store")
    yield process
    process.stop()


def test_health_and_version(backend):
    health = backend.client.health()
    assert health["status"] == "ok" and health["api_version"] == 1
    version = backend.client.version()
    assert version["device"] == "cpu" and version["models"] == {"depth": "tiny", "panorama": "tiny"}
    tiny = {"base_model": "tiny", "multiview_weights": "tiny", "base_kind": "sd2_depth", "native_view_size": 512,
            "controlnet": None}
    assert version["tasks"] == {"depth": tiny, "panorama": tiny}


def test_texture_job_from_submit_to_downloaded_texture(backend, tmp_path):
    status = backend.client.submit(texture_job(texture_size=128).to_bytes())
    assert status["state"] == "queued" and status["kind"] == "texture"
    seen_stages = set()
    final = backend.client.wait(status["id"], on_status=lambda s: seen_stages.add(s["stage"]), poll=0.02,
                                timeout=240)
    assert final["state"] == "done", final["error"]
    assert "texture.png" in final["outputs"] and "keyframes" in seen_stages
    files = {p.name for p in backend.client.result(status["id"], tmp_path)}
    assert {"texture.png", "report.json", "uvs.npz"} <= files
    texture = iio.imread(tmp_path / "texture.png")
    assert texture.shape == (128, 128, 3) and texture.std() > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"keyframes", "interpolation", "bake"} <= set(report["seconds"])


def test_panorama_job_gives_exr_and_hdr_above_one(backend, tmp_path):
    status = backend.client.submit(panorama_job().to_bytes())
    final = backend.client.wait(status["id"], poll=0.05, timeout=240)
    assert final["state"] == "done", final["error"]
    backend.client.result(status["id"], tmp_path)
    exr, hdr = read_exr(tmp_path / "panorama.exr"), read_hdr(tmp_path / "panorama.hdr")
    assert exr.shape == hdr.shape == (64, 128, 3)
    assert exr.max() > 1.0 and hdr.max() > 1.0
    preview = backend.client.preview(status["id"])
    assert preview is not None and iio.imread(preview).ndim == 3


def test_a_world_from_an_image_over_http(backend, tmp_path):
    job = panorama_job(steps=1)
    job.image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    status = backend.client.submit(job.to_bytes())
    final = backend.client.wait(status["id"], poll=0.05, timeout=240)
    assert final["state"] == "done", final["error"]
    backend.client.result(status["id"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["from_image"] is True and report["base_model"] == "tiny"
    np.testing.assert_array_equal(iio.imread(tmp_path / "views" / "view_00.png"), job.image)


def test_cancel_in_the_middle(backend):
    status = backend.client.submit(texture_job(steps=400).to_bytes())
    wait_for(lambda: backend.client.status(status["id"])["step"] >= 2, timeout=120)
    backend.client.cancel(status["id"])
    final = backend.client.wait(status["id"], poll=0.05, timeout=30)
    assert final["state"] == "cancelled"
    assert "texture.png" not in final["outputs"]
    with pytest.raises(BackendError) as err:
        backend.client.result(status["id"], "unused")
    assert err.value.status == 409


def test_two_clients_at_once(backend, tmp_path):
    results: dict[int, dict] = {}

    def client_run(number: int) -> None:
        client = BackendClient(backend.client.url)
        job = texture_job(texture_size=64) if number == 0 else panorama_job()
        status = client.submit(job.to_bytes())
        results[number] = client.wait(status["id"], poll=0.05, timeout=300)

    threads = [threading.Thread(target=client_run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(320)
    assert [results[n]["state"] for n in range(2)] == ["done", "done"]
    assert results[0]["id"] != results[1]["id"]
    listed = {s["id"] for s in backend.client.jobs()}
    assert {results[0]["id"], results[1]["id"]} <= listed


def _post(backend, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(backend.client.url + "/v1/jobs", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, evil=np.array([{"run": "code"}], dtype=object))
    return buffer.getvalue()


def _oversized_npz() -> bytes:
    """An .npz whose entry claims far more than the server unpacks (a zip bomb's header)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.npy", b"\0" * (300 * 2**20))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (lambda: b"this is not an npz", 422, "body"),
        (lambda: b"", 422, "body"),
        (_pickled_npz, 422, "body"),
        (lambda: pack_arrays({}, {"api_version": 1, "kind": "texture"}), 422, "settings"),
        (lambda: pack_arrays({}, {"api_version": 99, "kind": "panorama"}), 422, "api_version"),
        (lambda: depth_with_nan(texture_job()).to_bytes(), 422, "depths[0]"),
        (_oversized_npz, 422, "body"),
        (lambda: pack_arrays({}, {"api_version": 1, "kind": "panorama",
                                  "settings": {"prompts": ["sky"], "scheduler": "euler"}}), 422, "scheduler"),
    ],
    ids=["garbage", "empty", "pickle", "missing-settings", "wrong-version", "nan-depth", "zip-bomb",
         "unknown-scheduler"],
)
def test_bad_bodies_are_refused_naming_the_field_and_store_nothing(backend, body, status, field):
    before = tree_listing(backend.store.parent)
    code, answer = _post(backend, body())
    assert code == status
    assert answer["detail"]["field"] == field
    assert tree_listing(backend.store.parent) == before


def _send_large(backend, chunked: bool) -> int:
    """Start sending a body over the server's 64 MB limit and return the answer's status code.

    With a declared length the server answers from the headers; a chunked body is read up to the
    limit and refused there.
    """
    connection = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=60)
    connection.putrequest("POST", "/v1/jobs")
    connection.putheader("Content-Type", "application/octet-stream")
    piece = b"\0" * 2**20
    if chunked:
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        for _ in range(66):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    else:
        connection.putheader("Content-Length", str(65 * 2**20))
        connection.endheaders()
        connection.send(piece)
    status = connection.getresponse().status
    connection.close()
    return status


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
def test_oversized_body_is_413(backend, chunked):
    before = tree_listing(backend.store.parent)
    assert _send_large(backend, chunked) == 413
    assert tree_listing(backend.store.parent) == before


@pytest.mark.parametrize("path", [
    "/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/../../etc/passwd", "/v1/jobs/%2e%2e/result",
    "/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/0123456789abcdef0123456789abcdef/files/..%2F..%2Fx",
])
def test_job_ids_and_names_cannot_leave_the_store(backend, path):
    before = tree_listing(backend.store.parent)
    request = urllib.request.Request(backend.client.url + path)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert 400 <= err.value.code < 500
    assert tree_listing(backend.store.parent) == before


def test_output_names_cannot_leave_the_job(backend):
    done = next(s for s in backend.client.jobs() if s["state"] == "done")
    for name in ("..%2Fstatus.json", "..%2F..%2F..%2Fserver.log", "%2Fetc%2Fpasswd"):
        request = urllib.request.Request(f"{backend.client.url}/v1/jobs/{done['id']}/files/{name}")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert 400 <= err.value.code < 500


def test_restart_keeps_finished_results_and_marks_running_jobs_interrupted(tmp_path):
    store = tmp_path / "store"
    first = BackendProcess(store)
    try:
        finished = first.client.submit(panorama_job().to_bytes())
        assert first.client.wait(finished["id"], poll=0.05, timeout=240)["state"] == "done"
        running = first.client.submit(texture_job(steps=400).to_bytes())
        wait_for(lambda: first.client.status(running["id"])["step"] >= 1, timeout=120)
    finally:
        first.stop(kill=True)  # no chance to clean up: as in a crash or a power cut
    second = BackendProcess(store)
    try:
        assert second.client.status(finished["id"])["state"] == "done"
        files = {p.name for p in second.client.result(finished["id"], tmp_path / "out")}
        assert {"panorama.exr", "panorama.hdr"} <= files
        interrupted = second.client.status(running["id"])
        assert interrupted["state"] == "interrupted" and "resubmit" in interrupted["error"]
        again = second.client.resubmit(running["id"])
        assert again["state"] == "queued"
        wait_for(lambda: second.client.status(running["id"])["state"] == "running", timeout=60)
        second.client.cancel(running["id"])
        assert second.client.wait(running["id"], poll=0.05, timeout=60)["state"] == "cancelled"
    finally:
        second.stop()


def test_token_guards_every_route_but_health(tmp_path):
    server = BackendProcess(tmp_path / "store", host="0.0.0.0", token=TOKEN)
    try:
        anonymous = BackendClient(server.client.url)
        assert anonymous.health()["status"] == "ok"
        for call in (anonymous.version, anonymous.jobs, lambda: anonymous.submit(panorama_job().to_bytes()),
                     lambda: anonymous.status("0123456789abcdef0123456789abcdef")):
            with pytest.raises(BackendError) as err:
                call()
            assert err.value.status == 401
        wrong = BackendClient(server.client.url, token="not-the-token")
        with pytest.raises(BackendError) as err:
            wrong.jobs()
        assert err.value.status == 401
        assert server.client.jobs() == []
    finally:
        server.stop()
