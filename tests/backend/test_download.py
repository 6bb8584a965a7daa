"""Checkpoint downloads against a loopback HTTP server started in the test: resume, size, HTML, sha256."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from backend.models import manifest
from backend.models.download import download, partial_path
from backend.validation import InputError

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Paths: /file (honours Range), /norange (ignores it), /cut (drops the connection mid-file once),
    /html (a web page), /lies (announces more bytes than it has)."""

    cuts = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.path = self.path.split("?")[0]
        if self.path == "/html":
            page = b"<!DOCTYPE html><html><body>Sign in to Dropbox</body></html>"
            self._send(200, page, "text/html; charset=utf-8")
        elif self.path == "/html-as-binary":
            self._send(200, b"  <!DOCTYPE html><html>nope</html>", "application/octet-stream")
        elif self.path == "/lies":
            self._send(200, BODY, "application/octet-stream", length=len(BODY) + 10_000)
        elif self.path == "/cut" and Handler.cuts == 0:
            Handler.cuts += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:100_000])
            self.wfile.flush()
            self.close_connection = True
        elif self.path in ("/file", "/cut", "/norange"):
            start = 0
            header = self.headers.get("Range")
            if header and self.path != "/norange":
                start = int(header.removeprefix("bytes=").rstrip("-"))
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
                self.send_header("Content-Length", str(len(BODY) - start))
                self.end_headers()
                self.wfile.write(BODY[start:])
            else:
                self._send(200, BODY, "application/octet-stream")
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, code, body, content_type, length=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        if length is not None:
            self.close_connection = True


@pytest.fixture
def server():
    Handler.cuts = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_records_the_sha256_and_leaves_no_partial(server, tmp_path):
    result = download(server + "/file", tmp_path / "pano.ckpt", progress=False)
    assert result.sha256 == SHA and (tmp_path / "pano.ckpt").read_bytes() == BODY
    assert not partial_path(tmp_path / "pano.ckpt").exists()
    assert manifest.read_manifest(tmp_path)["pano.ckpt"]["sha256"] == SHA
    assert manifest.check(tmp_path / "pano.ckpt") == SHA


def test_cut_connection_keeps_the_partial_and_the_next_download_resumes(server, tmp_path):
    dest = tmp_path / "depth_gen.ckpt"
    with pytest.raises(InputError) as err:
        download(server + "/cut", dest, progress=False)
    assert "cut after" in err.value.problem and "run the same command again to resume" in err.value.problem
    assert not dest.exists() and partial_path(dest).stat().st_size == 100_000
    result = download(server + "/cut", dest, progress=False)
    assert result.resumed and result.sha256 == SHA and manifest.sha256_of(dest) == SHA
    assert not partial_path(dest).exists()


def test_a_server_ignoring_range_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "pano.ckpt"
    partial_path(dest).write_bytes(b"x" * 5000)  # not even this file's start
    result = download(server + "/norange", dest, progress=False)
    assert result.sha256 == SHA and dest.read_bytes() == BODY


def test_wrong_size_is_refused_and_nothing_is_kept(server, tmp_path):
    dest = tmp_path / "pano.ckpt"
    with pytest.raises(InputError) as err:
        download(server + "/file", dest, expected_size=len(BODY) + 1, progress=False)
    assert f"{len(BODY) + 1} bytes" in err.value.problem and "nothing was kept" in err.value.problem
    assert not dest.exists() and not partial_path(dest).exists()


def test_a_server_announcing_more_than_it_sends_leaves_only_a_partial(server, tmp_path):
    dest = tmp_path / "pano.ckpt"
    with pytest.raises(InputError) as err:
        download(server + "/lies", dest, progress=False)
    assert f"cut after {len(BODY)} of {len(BODY) + 10_000} bytes" in err.value.problem
    assert not dest.exists()


@pytest.mark.parametrize("path", ["/html", "/html-as-binary"])
def test_an_html_page_is_refused_and_deleted(server, tmp_path, path):
    dest = tmp_path / "pano.ckpt"
    with pytest.raises(InputError) as err:
        download(server + path + "?dl=0", dest, progress=False)
    assert "web page" in err.value.problem and "dl=1" in err.value.problem
    assert not dest.exists() and not partial_path(dest).exists()


def test_http_errors_and_unreachable_hosts_name_the_fix(server, tmp_path):
    with pytest.raises(InputError, match="HTTP 404"):
        download(server + "/missing", tmp_path / "a.ckpt", progress=False)
    with pytest.raises(InputError, match="Allow Online Access"):
        download("http://127.0.0.1:9/x", tmp_path / "a.ckpt", progress=False, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_file_fails_its_sha_check_naming_both_hashes(server, tmp_path):
    dest = tmp_path / "pano.ckpt"
    download(server + "/file", dest, progress=False)
    dest.write_bytes(BODY[:-1] + b"\0")
    with pytest.raises(InputError) as err:
        manifest.check(dest)
    changed = hashlib.sha256(dest.read_bytes()).hexdigest()
    assert SHA in err.value.problem and changed in err.value.problem
    assert "Delete it and download it again" in err.value.problem and "pano.ckpt" in err.value.problem
    assert manifest.status(dest) == "mismatch"


def test_progress_lines_for_the_blender_add_on(server, tmp_path, monkeypatch, capsys):
    """``models download --progress-lines --json``: rising PROGRESS lines on stdout, one JSON object last."""
    import dataclasses
    import json

    from backend.__main__ import main
    from backend.models import catalog

    entry = dataclasses.replace(catalog.CHECKPOINTS["pano.ckpt"], url=server + "/file")
    monkeypatch.setitem(catalog.CHECKPOINTS, "pano.ckpt", entry)
    assert main(["models", "download", "pano", "--progress-lines", "--json", "--models-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line.split(" ", 2) for line in lines if line.startswith("PROGRESS ")]
    fractions = [float(fraction) for _, fraction, _ in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0, lines
    assert progress[-1][2].startswith("pano.ckpt:"), progress
    result = json.loads(lines[-1])
    assert result["ok"] and result["downloaded"][0]["sha256"] == SHA
    assert (tmp_path / "pano.ckpt").read_bytes() == BODY
