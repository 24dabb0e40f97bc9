"""Registered versions are MLflow Models: `mlflow.pyfunc.load_model` in a fresh process and `mlflow models
serve` give what `igpt classify` and the probe's features give on the same images, and bad inputs get a
400 with a message, never a dead server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from igpt_core import tracking
from igpt_core.checkpoint import PALETTE_FILE, load, save_model
from igpt_core.classifier import ImageGPTClassifier
from igpt_core.classify import classify
from igpt_core.config import ModelConfig
from igpt_core.features import extract_features
from igpt_core.model import ImageGPT
from igpt_core.palette import Palette
from igpt_core.sources import Sample, iter_source, open_source

REPO = Path(__file__).resolve().parents[1]
R = 8
CLASSES = ["cat", "dog", "owl"]
CHAMPION = "models:/igpt-classifier@champion"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _palette() -> Palette:
    return Palette(centers=np.random.default_rng(0).uniform(-1, 1, size=(16, 3)).astype(np.float32))


def _tiny(folder: Path, *, classifier: bool) -> Path:
    """A 2-layer R=8 checkpoint with its palette: a classifier (head spread out so classes differ) or not."""
    torch.manual_seed(0)
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=R, n_layer=2, n_head=2, n_embd=32))
    trained: ImageGPT | ImageGPTClassifier = model
    if classifier:
        trained = ImageGPTClassifier(model, len(CLASSES), class_names=CLASSES)
        with torch.no_grad():
            trained.score.weight.mul_(50.0)
    save_model(trained, folder, extra={"palette_digest": _palette().digest()})
    np.save(folder / PALETTE_FILE, _palette().centers)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with `igpt` v1 (checkpoint logged by its run first, as the pipeline does) and
    `igpt-classifier` v1 (registered with its folder) aliased `champion`; images of odd sizes beside."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = "sqlite:///" + str(root / "mlflow.db")
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "igpt", root / "artifacts")

    pretrained = _tiny(root / "pretrained", classifier=False)
    pretrain_run = tracking.start_run(client, experiment, "pretrain")
    tracking.log_artifact(client, pretrain_run, pretrained, tracking.CHECKPOINT_ARTIFACT)
    assert tracking.register_model(client, pretrain_run, name="igpt") == "1"

    fine_tuned = _tiny(root / "classifier", classifier=True)
    finetune_run = tracking.start_run(client, experiment, "finetune")
    version = tracking.register_model(
        client, finetune_run, name=tracking.CLASSIFIER_NAME, checkpoint_dir=fine_tuned
    )
    client.set_registered_model_alias(tracking.CLASSIFIER_NAME, "champion", version)

    rng = np.random.default_rng(1)
    folder = root / "images"
    folder.mkdir()
    for i in range(6):  # odd sizes: the crop and resize are tokenize's
        Image.fromarray(rng.integers(0, 256, size=(R + i, R + 2 * i, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    pixels = rng.integers(0, 256, size=(5, 11, 13, 3), dtype=np.uint8)
    np.save(root / "pixels.npy", pixels)
    return {
        "uri": uri,
        "root": root,
        "pretrained": pretrained,
        "classifier": fine_tuned,
        "folder": folder,
        "pixels": pixels,
    }


def _encoded(folder: Path) -> tuple[list[str], list[str]]:
    """(keys, base64 of each file) of a folder of images, in the folder source's order."""
    keys = [r.key for r in iter_source(open_source(str(folder)), R)]
    return keys, [base64.b64encode((folder / f"{key}.png").read_bytes()).decode() for key in keys]


def _classified(checkpoint: Path, source, out: Path) -> list[dict]:
    """`igpt classify --precision fp32`'s rows (predictions.parquet) of a source."""
    result = classify(checkpoint, source, out, progress=False, precision="fp32")
    assert result.counts["rejected"] == 0
    return pq.read_table(result.out).to_pylist()


def _probe_features(checkpoint: Path, source) -> np.ndarray:
    """The probe's features (default layer) of a source's images, tokenized as `igpt tokenize` does."""
    model, palette, _ = load(checkpoint)
    images = [r.image for r in iter_source(open_source(source), R) if isinstance(r, Sample)]
    tokens = palette.quantize(np.stack(images))
    layer = model.config.n_layer // 2
    return extract_features(model, tokens, [layer], precision="fp32")[layer]


def _same_as_classify(predicted: list[dict], expected: list[dict]) -> None:
    assert [(p["class"], p["name"], p["top5"]) for p in predicted] == [
        (e["class"], e["name"], e["top5"]) for e in expected
    ]
    np.testing.assert_allclose(
        [p["probability"] for p in predicted], [e["probability"] for e in expected], atol=1e-6
    )
    np.testing.assert_allclose(
        [p["top5_probability"] for p in predicted], [e["top5_probability"] for e in expected], atol=1e-6
    )


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pandas as pd
    import mlflow.pyfunc

    pixels, encoded_path, out = np.load(sys.argv[1]), sys.argv[2], sys.argv[3]
    encoded = pd.DataFrame({"image": json.load(open(encoded_path))})
    classifier = mlflow.pyfunc.load_model("models:/igpt-classifier@champion")
    pretrained = mlflow.pyfunc.load_model("models:/igpt/1")
    fp32 = {"precision": "fp32"}
    errors = {}
    for name, bad in {
        "float": pixels.astype(np.float32),
        "shape": pixels[0, 0],
        "bytes": pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}),
        "base64": pd.DataFrame({"image": ["%%%"]}),
        "column": pd.DataFrame({"pixels": [1]}),
    }.items():
        try:
            classifier.predict(bad)
            errors[name] = None
        except Exception as error:
            errors[name] = [type(error).__name__, getattr(error, "error_code", None), str(error)]
    try:
        classifier.predict(pixels, params={"precision": "fp16"})
        errors["precision"] = None
    except Exception as error:
        errors["precision"] = [type(error).__name__, getattr(error, "error_code", None), str(error)]
    json.dump(
        {
            "pixels": classifier.predict(pixels, params=fp32).to_dict(orient="records"),
            "encoded": classifier.predict(encoded, params=fp32).to_dict(orient="records"),
            "pixels_auto": classifier.predict(pixels).to_dict(orient="records"),
            "features_pixels": pretrained.predict(pixels, params=fp32).tolist(),
            "features_encoded": pretrained.predict(encoded, params=fp32).tolist(),
            "features_layer_0": pretrained.predict(pixels, params={"layer": 0, **fp32}).tolist(),
            "features_auto": pretrained.predict(pixels).tolist(),
            "signature": classifier.metadata.signature.to_dict(),
            "errors": errors,
        },
        open(out, "w"),
    )
    """
)


def _environment(store) -> dict[str, str]:
    """The test's store, this checkout's code, and this interpreter's scripts first on PATH (the server
    runs `uvicorn` by name, as an activated environment would find it)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PYTHONPATH": str(REPO), "PATH": path}


def test_load_model_in_a_fresh_process_gives_classify_and_probe_results_for_pixels_and_encoded_images(
    store, tmp_path
):
    keys, encoded = _encoded(store["folder"])
    (tmp_path / "encoded.json").write_text(json.dumps(encoded))
    (tmp_path / "script.py").write_text(FRESH_PROCESS)
    out = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "script.py"),
            str(store["root"] / "pixels.npy"),
            str(tmp_path / "encoded.json"),
            str(out),
        ],
        cwd=tmp_path,  # not the checkout: the project is found as an installed package would be
        env=_environment(store),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(out.read_text())

    by_pixels = _classified(store["classifier"], store["pixels"], tmp_path / "a.parquet")
    by_files = _classified(store["classifier"], str(store["folder"]), tmp_path / "b.parquet")
    assert [row["key"] for row in by_files] == keys
    _same_as_classify(got["pixels"], by_pixels)
    _same_as_classify(got["encoded"], by_files)
    assert len({row["class"] for row in by_files + by_pixels}) > 1  # not one class for everything

    np.testing.assert_allclose(
        got["features_pixels"], _probe_features(store["pretrained"], store["pixels"]), atol=1e-5
    )
    np.testing.assert_allclose(
        got["features_encoded"], _probe_features(store["pretrained"], str(store["folder"])), atol=1e-5
    )
    model, palette, _ = load(store["pretrained"])
    tokens = palette.quantize(np.stack([r.image for r in iter_source(open_source(store["pixels"]), R)]))
    np.testing.assert_allclose(
        got["features_layer_0"], extract_features(model, tokens, [0], precision="fp32")[0], atol=1e-5
    )
    # the default precision (auto: bf16 on a CPU with AVX512-BF16 or AMX) within bf16's rounding of fp32
    auto = [row["probability"] for row in got["pixels_auto"]]
    np.testing.assert_allclose(auto, [row["probability"] for row in by_pixels], atol=2e-2)
    np.testing.assert_allclose(got["features_auto"], got["features_pixels"], atol=0.1, rtol=0.05)
    assert np.shape(got["features_pixels"]) == (len(store["pixels"]), 32)

    assert json.loads(got["signature"]["outputs"])[0] == {"type": "long", "name": "class", "required": True}
    errors = got["errors"]
    assert all(error[:2] == ["MlflowException", "INVALID_PARAMETER_VALUE"] for error in errors.values())
    assert "dtype float32" in errors["float"][2]
    assert "got shape (13, 3)" in errors["shape"][2]
    assert "image 0: not a recognised image" in errors["bytes"][2]
    assert "image 0: a string must be base64" in errors["base64"][2]
    assert "needs an 'image' column" in errors["column"][2]
    assert "precision: must be auto, bf16 or fp32, got 'fp16'" in errors["precision"][2]


def test_the_registered_version_keeps_its_checkpoint_folder_and_points_at_the_mlflow_model(store, tmp_path):
    client = tracking.client(store["uri"])
    version = client.get_model_version_by_alias(tracking.CLASSIFIER_NAME, "champion")
    assert version.source == f"runs:/{version.run_id}/{tracking.MODEL_ARTIFACT}"
    folder = tracking.load_registered(
        tracking.CLASSIFIER_NAME, version.version, dst=tmp_path, tracking_uri=store["uri"]
    )
    assert (folder / "config.json").read_text() == (store["classifier"] / "config.json").read_text()
    model_files = {a.path for a in client.list_artifacts(version.run_id, "model/artifacts/checkpoint")}
    assert model_files == {
        f"model/artifacts/checkpoint/{n}" for n in ("config.json", "model.safetensors", "palette.npy")
    }
    assert "python_model.pkl" not in {
        a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(version.run_id, "model")
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for_ping(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Polls /ping until it answers 200; fails with the server's log if it exits or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:  # the poll interval: returns at once if the server exits
            server.wait(timeout=0.5)
            pytest.fail(f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-4000:]}")
        except subprocess.TimeoutExpired:
            pass
    pytest.fail(f"mlflow models serve did not answer /ping in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_classify_and_survives_bad_requests(store, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                CHAMPION,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=tmp_path,
            env=_environment(store),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server and its workers stop together
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(f"{base}/ping", server, log, timeout=300)
        keys, encoded = _encoded(store["folder"])
        # fp32: compared with `igpt classify --precision fp32` (auto is bf16 on AVX512-BF16/AMX CPUs)
        request = {
            "dataframe_split": {"columns": ["image"], "data": [[item] for item in encoded]},
            "params": {"precision": "fp32"},
        }
        started = time.perf_counter()
        status, answer = _post(f"{base}/invocations", request)
        seconds = time.perf_counter() - started
        assert status == 200, answer
        expected = _classified(store["classifier"], str(store["folder"]), tmp_path / "p.parquet")
        _same_as_classify(answer["predictions"], expected)
        print(f"\n/invocations: {len(encoded)} base64 PNGs in {seconds * 1000:.0f} ms (first request)")

        status, answer = _post(
            f"{base}/invocations",
            {"dataframe_records": [{"image": encoded[0]}, {"image": "bm90IGFuIGltYWdl"}]},
        )
        assert status == 400 and "image 1: not a recognised image" in answer["message"], answer
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        status, answer = _post(f"{base}/invocations", {"inputs": [[1, 2, 3]]})
        assert status == 400 and "expected uint8 pixels of shape (N, H, W, 3)" in answer["message"], answer

        pixels = store["pixels"]
        status, answer = _post(  # still serving
            f"{base}/invocations", {"inputs": pixels.tolist(), "params": {"precision": "fp32"}}
        )
        assert status == 200, answer
        _same_as_classify(
            answer["predictions"], _classified(store["classifier"], pixels, tmp_path / "q.parquet")
        )
        many = {"dataframe_split": {"columns": ["image"], "data": [[e] for e in (encoded * 11)[:64]]}}
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            assert _post(f"{base}/invocations", many)[0] == 200
            timings.append(time.perf_counter() - started)
        print(f"/invocations: 64 base64 PNGs, median of 5: {np.median(timings) * 1000:.0f} ms")
    finally:
        _stop_group(server)
    assert server.returncode is not None


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it leads it), SIGKILL if it has not exited in 60 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.parametrize(
    ("request_input", "message"),
    [
        (
            np.zeros((2, 9, 9, 3), np.float32),
            "pixels must be uint8 (integers in [0, 255]), got dtype float32",
        ),
        (np.full((1, 4, 4, 3), 300), "pixel values must be in [0, 255], got [300, 300]"),
        (np.zeros((2, 9), np.uint8), "expected uint8 pixels of shape (N, H, W, 3)"),
        ([np.zeros((1, 9, 9, 3), np.uint8)], "image 0: one image's pixels must be (H, W, 3)"),
        (np.array([["aGk="]]), "encoded images must be a flat list"),
        ({"image": ["%%"]}, "image 0: a string must be base64"),
        ({"pixels": []}, "a dict needs exactly the key 'image'"),
        ([b"\x89PNG\r\n\x1a\n" + b"\0" * 20], "image 0: "),
        ([], "input: no images"),
        (5, "expected uint8 pixels (N, H, W, 3) or encoded images, got int"),
    ],
)
def test_a_bad_request_is_a_model_input_error_that_names_what_is_wrong(request_input, message):
    from igpt_core.tracking.pyfunc import ModelInputError, input_images

    with pytest.raises(ModelInputError) as caught:
        input_images(request_input, R)
    assert message in str(caught.value)


def test_integer_pixels_from_json_are_the_same_images_as_uint8_ones(store):
    from igpt_core.tracking.pyfunc import input_images

    pixels = store["pixels"]
    expected = np.stack([r.image for r in iter_source(open_source(pixels), R)])
    np.testing.assert_array_equal(input_images(pixels.astype(np.int64), R), expected)
    np.testing.assert_array_equal(input_images(pixels[0], R), expected[:1])
    np.testing.assert_array_equal(input_images(list(pixels), R), expected)
