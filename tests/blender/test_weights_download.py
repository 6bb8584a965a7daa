"""The multi-view weights warning and its download button in the real Blender.

A fake backend Python stands in for the real one (whose download is GBs from Dropbox): it speaks
the ``models download --progress-lines --json`` protocol and writes down the command it got.
"""

import json
import stat
import time

import pytest

pytestmark = pytest.mark.blender


def fake_python(tmp_path, lines, code=0):
    script = tmp_path / "python"
    echo = "\n".join(f"echo '{line}'; sleep 0.05" for line in lines)
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\necho "PYTHONPATH=$PYTHONPATH" >> "{tmp_path}/args"\n'
                      f"{echo}\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def follow(module, timeout=20.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        again = module.poll()
        run = module.current()
        seen.append((run.fraction, run.message))
        if again is None:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the download did not finish: {seen}")


@pytest.fixture
def weights(addon):
    module = addon.multiview_weights
    module.forget()
    yield module
    module.cancel()
    module.forget()


def test_the_warning_follows_what_the_backend_says(weights):
    weights.remember({"depth": {"base_model": "x", "multiview_weights": "none"},
                      "panorama": {"base_model": "y", "multiview_weights": "/models/pano.ckpt"}})
    assert weights.independent("depth") and not weights.independent("panorama")
    assert "training-free" in weights.warning("depth")
    assert weights.warning("panorama") is None
    assert weights.summary("panorama") == "360 Worlds: y + pano.ckpt"
    assert weights.summary("depth") == "Texturing: x + no multi-view weights"


def test_download_runs_the_models_command_and_reports_progress(weights, addon, tmp_path):
    done = json.dumps({"ok": True, "downloaded": [{"item": "depth_gen"}]})
    python = fake_python(tmp_path, ["PROGRESS 0.000 depth_gen: starting", "PROGRESS 0.500 depth_gen.ckpt: 1 of 2 MB",
                                    "PROGRESS 1.000 depth_gen.ckpt: 2 of 2 MB", done])
    weights.remember({"depth": {"multiview_weights": "none"}})
    weights.start(str(python), addon.preferences.EXTENSION_ROOT, ["depth"], tmp_path / "download.log")
    seen = follow(weights)
    run = weights.current()
    assert run.state == "done" and "downloaded" in run.message, seen
    assert any(0.4 < fraction < 0.6 and "1 of 2 MB" in message for fraction, message in seen), seen
    args = (tmp_path / "args").read_text()
    assert args.startswith("-u -m backend models download depth_gen --progress-lines --json"), args
    assert str(addon.preferences.EXTENSION_ROOT) in args
    assert not weights.independent("depth"), "after a download the backend is asked again"


def test_a_failed_download_says_why(weights, addon, tmp_path):
    failed = json.dumps({"ok": False, "field": "download", "error": "cannot reach www.dropbox.com"})
    python = fake_python(tmp_path, ["PROGRESS 0.000 pano: starting", failed], code=2)
    weights.start(str(python), addon.preferences.EXTENSION_ROOT, ["panorama"], tmp_path / "download.log")
    follow(weights)
    run = weights.current()
    assert run.state == "failed" and "cannot reach www.dropbox.com" in run.message


def test_no_python_is_refused_with_the_fix(weights, addon, tmp_path):
    with pytest.raises(addon.connection.SetupError) as err:
        weights.start("", addon.preferences.EXTENSION_ROOT, ["depth"], tmp_path / "download.log")
    assert "Backend Python" in err.value.fix
