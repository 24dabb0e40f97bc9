"""A registered igpt version as an MLflow Model: the pyfunc flavour, written as a model from code.

`save_pyfunc` writes an MLflow Model folder whose code is `pyfunc_model.py` (a `PythonModel` subclass
that `mlflow.models.set_model` names; nothing is pickled) and whose one artifact, `checkpoint`, is the
checkpoint folder's model files (`model.safetensors`, `config.json`, `palette.npy`; the optimizer state
stays in the run's own `checkpoint` artifact). `log_pyfunc` logs that folder to a run as `model`, the
source the registry's versions point at, so `mlflow.pyfunc.load_model("models:/igpt-classifier@champion")`
and `mlflow models serve` load it in any process that has the project installed.

`ImageModel` is what the pyfunc model runs (no MLflow in it). Input, one request:

- uint8 pixels: an array (N, H, W, 3) (also (N, H, W, 1|4), or one (H, W, 3) image), or integers in
  [0, 255] of another integer dtype (JSON `{"inputs": [...]}` arrives as int64);
- encoded images (PNG, JPEG, ... any format `igpt tokenize` reads): a DataFrame column `image` (or a
  dict `{"image": [...]}`, or a list) of bytes or of base64 strings (JSON carries base64).

Each image is decoded, centre-cropped and resized with `igpt_core.imaging` and quantized with the
checkpoint's own palette (`Palette.quantize`): the tokens `igpt tokenize` writes for it. Output: for a
classifier, one row per image with `class`, `name`, `probability`, `top5`, `top5_probability` (the
columns of `igpt classify`'s predictions.parquet, computed by `igpt_core.classify`); for a pretrained
model, float32 features (N, n_embd): the probe's feature (`igpt_core.features.extract_features`) at layer
`params["layer"]` (default the probe's, n_layer // 2). `params["precision"]` (auto, bf16, fp32; default
auto) is `igpt classify`'s: bf16 where the hardware has it natively, else fp32. A bad input raises
`ModelInputError` naming the image and the reason; the pyfunc model turns it into MLflow's
INVALID_PARAMETER_VALUE (HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import Array
from PIL import Image

from igpt_core import __version__
from igpt_core.checkpoint import CLASSIFIER_KEY, CONFIG_FILE, PALETTE_FILE, WEIGHTS_FILE, load, read_config
from igpt_core.classify import load as load_classifier_folder
from igpt_core.classify import predict_tokens as classify_tokens
from igpt_core.features import extract_features, fast_inference, feature_dtype, resolve_layers
from igpt_core.imaging import ImageRejected, array_image, decode_image
from igpt_core.tracking.runs import TrackingError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from igpt_core.classifier import ImageGPTClassifier
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The model-from-code file MLflow copies into every model folder and runs when it loads one."""
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, PALETTE_FILE)
"""The checkpoint files a served model needs (its artifact `checkpoint`)."""
ARTIFACT = "checkpoint"
"""The pyfunc model's artifact name: `context.artifacts["checkpoint"]` is the checkpoint folder."""
IMAGE_COLUMN = "image"
DEFAULT_BATCH_SIZE = 64


class ModelInputError(ValueError):
    """One request's input cannot become images; the message names the image (by index) and why."""


# ----------------------------------------------------------------------------------------- input


def _encoded(value: Any, index: int) -> bytes:
    """The bytes of one encoded image: bytes as they are, a str as base64."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ModelInputError(
                f"image {index}: a string must be base64 of an encoded image ({error})"
            ) from None
    raise ModelInputError(
        f"image {index}: expected encoded image bytes or a base64 string, got {type(value).__name__}"
    )


def _pixels(array: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, H, W, C) of an array input; ModelInputError for a wrong dtype or shape."""
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise ModelInputError(
                f"images: pixels must be uint8 (integers in [0, 255]), got dtype {array.dtype}; "
                "send encoded images as base64 strings in an 'image' column instead"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ModelInputError(
                f"images: pixel values must be in [0, 255], got [{array.min()}, {array.max()}]"
            )
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ModelInputError(
            f"images: expected uint8 pixels of shape (N, H, W, 3) (or (H, W, 3) for one image), "
            f"got shape {array.shape}"
        )
    return array


def _values(model_input: Any) -> list[Any] | np.ndarray:
    """The request as an array of pixels or a list of encoded images."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ModelInputError(
                f"input: a DataFrame needs an {IMAGE_COLUMN!r} column of encoded images "
                f"(base64 strings in JSON), got columns {list(map(str, model_input.columns))}"
            )
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, dict):
        if set(model_input) != {IMAGE_COLUMN}:
            raise ModelInputError(
                f"input: a dict needs exactly the key {IMAGE_COLUMN!r}, got {sorted(map(str, model_input))}"
            )
        return _values(model_input[IMAGE_COLUMN])
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind not in "OSU":
            return model_input
        if model_input.ndim > 1:  # bytes or base64 strings, one per image
            raise ModelInputError(
                f"images: encoded images must be a flat list, got an array of shape {model_input.shape}"
            )
        return list(model_input.reshape(-1))
    if isinstance(model_input, list | tuple):
        return list(model_input)
    raise ModelInputError(
        f"input: expected uint8 pixels (N, H, W, 3) or encoded images, got {type(model_input).__name__}"
    )


def input_images(model_input: Any, resolution: int) -> np.ndarray:
    """uint8 (N, R, R, 3) images of one request, as `igpt tokenize` makes them; ModelInputError otherwise."""
    values = _values(model_input)
    if len(values) == 0:
        raise ModelInputError("input: no images")
    if isinstance(values, np.ndarray):
        return np.stack([array_image(pixels, resolution) for pixels in _pixels(values)])
    images = []
    for index, value in enumerate(values):
        try:
            if isinstance(value, np.ndarray) and value.dtype.kind not in "OSU":
                if value.ndim != 3:
                    raise ModelInputError(f"one image's pixels must be (H, W, 3), got shape {value.shape}")
                images.append(array_image(_pixels(value)[0], resolution))
            else:
                images.append(decode_image(_encoded(value, index), resolution))
        except ImageRejected as error:
            raise ModelInputError(f"image {index}: {error}") from None
        except ModelInputError as error:
            message = str(error)
            raise ModelInputError(
                message if message.startswith("image ") else f"image {index}: {message}"
            ) from None
    return np.stack(images)


# ----------------------------------------------------------------------------------------- model


class ImageModel:
    """A checkpoint folder ready to answer requests: a classifier's classes or a pretrained model's features."""

    def __init__(
        self,
        model: ImageGPT | ImageGPTClassifier,
        palette: Palette,
        config: dict[str, Any],
        device: str,
    ) -> None:
        self.model, self.palette, self.config, self.device = model, palette, config, device
        section = config.get(CLASSIFIER_KEY)
        self.is_classifier = isinstance(section, dict)
        self.class_names: list[str] | None = section.get("class_names") if isinstance(section, dict) else None
        self.resolution = int(model.config.resolution)
        self.n_layer = int(model.config.n_layer)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str | None = None) -> ImageModel:
        """The model of a checkpoint folder (a classifier's checks are `igpt classify`'s)."""
        import torch  # heavy: torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = read_config(folder)
        if isinstance(config.get(CLASSIFIER_KEY), dict):
            classifier, palette, config = load_classifier_folder(folder, device)
            return cls(classifier, palette, config, device)
        model, maybe_palette, config = load(folder, device)
        if maybe_palette is None:
            raise ValueError(f"checkpoint: {folder} has no {PALETTE_FILE}; images cannot become its tokens")
        if maybe_palette.clusters != model.config.vocab_size:
            raise ValueError(
                f"checkpoint: {folder}/{PALETTE_FILE} has {maybe_palette.clusters} colours, the model "
                f"{model.config.vocab_size} tokens"
            )
        return cls(model, maybe_palette, config, device)

    def tokens(self, model_input: Any) -> np.ndarray:
        """uint16 (N, R*R) tokens of a request: its images quantized with this model's palette."""
        return self.palette.quantize(input_images(model_input, self.resolution))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame | np.ndarray:
        """Classes (a DataFrame, see the module doc) or features float32 (N, n_embd) of a request."""
        params = params or {}
        batch_size = int(params.get("batch_size") or DEFAULT_BATCH_SIZE)
        if batch_size < 1:
            raise ModelInputError(f"params: batch_size must be positive, got {batch_size}")
        precision = str(params.get("precision") or "auto")
        try:
            feature_dtype(precision, self.device)
        except ValueError as error:
            raise ModelInputError(f"params: {error}") from None
        tokens = self.tokens(model_input)
        if self.is_classifier:
            return self._classes(tokens, batch_size, precision)
        layer = params.get("layer")
        try:
            (chosen,) = resolve_layers(None if layer is None or int(layer) < 0 else int(layer), self.n_layer)
        except ValueError as error:
            raise ModelInputError(f"params: {error}") from None
        features = extract_features(self.model, tokens, [chosen], batch_size=batch_size, precision=precision)  # type: ignore[arg-type]
        return features[chosen]

    def _classes(self, tokens: np.ndarray, batch_size: int, precision: str) -> pd.DataFrame:
        classes, probabilities = [], []
        with fast_inference(self.model, precision):  # type: ignore[arg-type]
            for start in range(0, len(tokens), batch_size):
                top, chance = classify_tokens(self.model, tokens[start : start + batch_size], self.device)  # type: ignore[arg-type]
                classes.append(top)
                probabilities.append(chance)
        top_classes, top_probabilities = np.concatenate(classes), np.concatenate(probabilities)
        names = self.class_names
        best = top_classes[:, 0]
        return pd.DataFrame(
            {
                "class": best.astype(np.int64),
                "name": [names[i] if names else None for i in best],
                "probability": top_probabilities[:, 0].astype(np.float32),
                "top5": [row.tolist() for row in top_classes],
                "top5_probability": [row.tolist() for row in top_probabilities.astype(np.float32)],
            }
        )


# ------------------------------------------------------------------------------------------ save


def _example_png(resolution: int) -> str:
    """A base64 PNG of a small colour gradient: the input example, as a JSON client sends it."""
    ramp = np.linspace(0, 255, resolution, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _signature(config: dict[str, Any]) -> Any:
    """Outputs and params of the model. Inputs are left open: an MLflow schema is either a tensor or a
    table, and a request may be either (pixels, or a column of encoded images); `ImageModel` checks it."""
    params = [
        ParamSpec("batch_size", DataType.long, DEFAULT_BATCH_SIZE),
        ParamSpec("precision", DataType.string, "auto"),
    ]
    if isinstance(config.get(CLASSIFIER_KEY), dict):
        outputs = Schema(
            [
                ColSpec(DataType.long, "class"),
                ColSpec(DataType.string, "name", required=False),
                ColSpec(DataType.float, "probability"),
                ColSpec(Array(DataType.long), "top5"),
                ColSpec(Array(DataType.float), "top5_probability"),
            ]
        )
    else:
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, int(config.get("n_embd", -1))))])
        # -1: the probe's layer, n_layer // 2
        params.append(ParamSpec("layer", DataType.long, -1))
    return ModelSignature(inputs=None, outputs=outputs, params=ParamSchema(params))


def _metadata(config: dict[str, Any]) -> dict[str, Any]:
    section = config.get(CLASSIFIER_KEY)
    kind = "classifier" if isinstance(section, dict) else "features"
    meta: dict[str, Any] = {
        "igpt_kind": kind,
        "igpt_resolution": config.get("resolution"),
        "igpt_palette_digest": config.get("palette_digest"),
        "igpt_version": __version__,
    }
    if isinstance(section, dict):
        meta["igpt_class_names"] = json.dumps(section.get("class_names"))
    elif "n_layer" in config:
        meta["igpt_feature_layer"] = resolve_layers(None, int(config["n_layer"]))[0]
    return meta


def save_pyfunc(checkpoint_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Writes the MLflow Model of a checkpoint folder to `path` (a new folder); see the module doc."""
    folder = Path(checkpoint_dir)
    config = json.loads((folder / CONFIG_FILE).read_text())
    with tempfile.TemporaryDirectory(prefix="igpt-pyfunc-") as staging:
        files = Path(staging) / ARTIFACT
        files.mkdir()
        for name in MODEL_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, files / name)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT: str(files)},
            signature=_signature(config),
            input_example=pd.DataFrame({IMAGE_COLUMN: [_example_png(int(config.get("resolution", 32)))]}),
            # Explicit, so MLflow does not load the model to guess them.
            pip_requirements=[f"igpt=={__version__}"],
            metadata=_metadata(config),
        )
    return Path(path)


def log_pyfunc(
    client: MlflowClient,
    run_id: str,
    artifact_path: str,
    checkpoint_dir: str | os.PathLike[str] | None,
    logged_checkpoint: str,
) -> None:
    """Logs the MLflow Model of `checkpoint_dir` (None: the run's `logged_checkpoint` artifact folder,
    whose model files are downloaded) to run `run_id` under `artifact_path`."""
    with tempfile.TemporaryDirectory(prefix="igpt-pyfunc-") as work:
        if checkpoint_dir is None:
            local = Path(work) / "downloaded"
            local.mkdir()
            present = {Path(item.path).name for item in client.list_artifacts(run_id, logged_checkpoint)}
            if CONFIG_FILE not in present:
                raise TrackingError(
                    f"run {run_id}: no {logged_checkpoint}/{CONFIG_FILE} artifact to register"
                )
            for name in MODEL_FILES:
                if name in present:
                    downloaded = client.download_artifacts(run_id, f"{logged_checkpoint}/{name}", work)
                    shutil.move(downloaded, local / name)
            checkpoint_dir = local
        model_dir = save_pyfunc(checkpoint_dir, Path(work) / "model")
        client.log_artifacts(run_id, str(model_dir), artifact_path)
