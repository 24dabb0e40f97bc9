"""The `igpt` command: one typed function per stage, each a thin call into the library.

A stage's options are generated from its config dataclass's fields (`cli_options`), so a setting's default,
type and help are written once, in `config.py`. Errors in user input (a bad option, a source that cannot
be read) end the command with a one-line message naming the flag or input and exit status 2, never a
traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from igpt_core import sample as sampling
from igpt_core.checkpoint import (
    CLASSIFIER_KEY,
    PALETTE_FILE,
    CheckpointError,
    load_classifier,
    read_config,
    save_model,
)
from igpt_core.classify import DEFAULT_BATCH_SIZE, ClassifyError
from igpt_core.classify import classify as run_classify
from igpt_core.cli_options import Fields, options
from igpt_core.config import (
    DEFAULT_PRESET,
    DEFAULT_RESOLUTION,
    ConfigError,
    ModelConfig,
    PaletteConfig,
    ProbeConfig,
    TokenizeConfig,
    TrainConfig,
    field_docs,
    preset,
    preset_names,
)
from igpt_core.features import ProbeError
from igpt_core.finetune import FinetuneConfig, format_finetune_table
from igpt_core.finetune import finetune as run_finetune
from igpt_core.palette import Palette
from igpt_core.palette_fit import fit_palette
from igpt_core.pretrain import pretrain as run_pretrain
from igpt_core.probe import format_probe_table, run_probe
from igpt_core.progress import TrainProgress
from igpt_core.shards import read_meta
from igpt_core.sources import SourceError
from igpt_core.tokens import tokenize as run_tokenize
from igpt_core.tracking import format_lineage
from igpt_core.tracking import lineage as walk_lineage

app = typer.Typer(
    name="igpt",
    help="ImageGPT: palette → tokens → pretraining → probe, samples and completions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Manage the watched data folder that triggers retraining.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_TRAIN = field_docs(TrainConfig)


def _home() -> Path:
    return Path(os.environ.get("IGPT_HOME", "igpt-home"))


RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="Address of an existing Ray cluster; a local Ray is started when unset.",
    ),
]
JsonLines = Annotated[
    bool,
    typer.Option(
        "--json", help="Print each training report as one JSON line on stdout instead of a progress bar."
    ),
]
RayLogs = Annotated[
    bool,
    typer.Option(
        "--ray-logs",
        help="Show Ray's own output (Ray Train's controller and workers) here; by default it stays in "
        "Ray's log files under /tmp/ray/session_latest/logs.",
    ),
]
Source = Annotated[
    str,
    typer.Option(
        "--source",
        help="Images: a folder (class sub-folders = labels), webdataset tars (path, folder or glob), "
        "parquet (Hugging Face image layout), .npz, or builtin:digits.",
    ),
]


def _fail(message: str) -> None:
    typer.echo(f"igpt: error: {message}", err=True)
    raise typer.Exit(2)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@app.command()
@options(config=Fields(PaletteConfig, ("clusters", "method", "resolution", "seed")))
def palette(
    source: Source = "builtin:digits",
    *,
    config: PaletteConfig,
    out: Annotated[Path | None, typer.Option(help="Output folder (default $IGPT_HOME/palette).")] = None,
    ray_address: RayAddress = None,
) -> None:
    """Fit a K-colour k-means palette on the source's pixels (distributed on Ray)."""
    out_dir = out or _home() / "palette"
    fitted = fit_palette(source, config=config, ray_address=ray_address, progress=True)
    path = fitted.save(out_dir, meta=getattr(fitted, "meta", {}) or {})
    typer.echo(f"palette: {fitted.clusters} colours, digest {fitted.digest()[:12]} → {path}")


@app.command()
@options(config=Fields(TokenizeConfig, ("resolution", "split", "shard_size")))
def tokenize(
    palette: Annotated[
        Path, typer.Option("--palette", help="Palette folder (or openai kmeans_centers.npy).")
    ],
    source: Source = "builtin:digits",
    *,
    config: TokenizeConfig,
    out: Annotated[Path | None, typer.Option(help="Output folder (default $IGPT_HOME/shards).")] = None,
    ray_address: RayAddress = None,
) -> None:
    """Quantize images with a palette and write webdataset shards, manifest.parquet and meta.json."""
    result = run_tokenize(
        source,
        palette,
        out or _home() / "shards",
        resolution=config.resolution,
        split=config.split,
        shard_size=config.shard_size,
        ray_address=ray_address,
    )
    counts = result.counts
    typer.echo(f"tokenize: {json.dumps(counts)} → {result.out_dir}")


@app.command()
@options(
    model=Fields(ModelConfig, ("n_layer", "n_head", "n_embd"), overrides="Overrides the preset."),
    train=Fields(
        TrainConfig,
        ("steps", "batch_size", "lr", "warmup_steps", "eval_every", "checkpoint_every", "workers", "seed")
        + ("precision", "compile"),
    ),
)
def pretrain(
    shards: Annotated[Path, typer.Option("--shards", help="Folder of token shards from `igpt tokenize`.")],
    preset_name: Annotated[
        str, typer.Option("--preset", help=f"Model size: {', '.join(preset_names())}.")
    ] = DEFAULT_PRESET,
    resolution: Annotated[int | None, typer.Option(help="Image side R (default: the shards' R).")] = None,
    *,
    model: dict[str, int],
    train: TrainConfig,
    palette_dir: Annotated[
        Path | None, typer.Option("--palette", help="Palette folder to store with the checkpoint.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default $IGPT_HOME/run). Reruns resume.")
    ] = None,
    ray_address: RayAddress = None,
    json_lines: JsonLines = False,
    ray_logs: RayLogs = False,
) -> None:
    """Pretrain a GPT on next-pixel prediction with Ray Train; a rerun resumes from the last checkpoint."""
    meta = read_meta(shards)
    model_config = preset(
        preset_name,
        vocab_size=int(meta["clusters"]) if "clusters" in meta else int(meta["K"]),
        resolution=resolution or int(meta.get("resolution", meta.get("R", DEFAULT_RESOLUTION))),
        **model,
    )
    with TrainProgress("pretrain", train.steps, json_lines=json_lines) as progress:
        result = run_pretrain(
            shards,
            out or _home() / "run",
            model=model_config,
            train=train,
            palette_dir=palette_dir,
            ray_address=ray_address,
            ray_logs=ray_logs,
            on_report=progress,
        )
    typer.echo(f"pretrain: step {result.step} → {result.checkpoint_dir}")


@app.command()
@options(
    config=Fields(
        FinetuneConfig,
        ("objective", "gen_weight", "head_layer", "flip", "steps", "batch_size", "lr", "warmup_steps")
        + ("eval_every", "val_fraction", "max_train", "max_test", "workers", "seed", "from_scratch")
        + ("precision",),
    ),
)
def finetune(
    checkpoint: Annotated[Path, typer.Option(help="Pretrained checkpoint folder (from `igpt pretrain`).")],
    train: Annotated[Path, typer.Option(help="Labelled token folder to train on (its `train` split).")],
    test: Annotated[Path, typer.Option(help="Labelled token folder to test on (its `test` split).")],
    *,
    config: FinetuneConfig,
    val: Annotated[
        Path | None,
        typer.Option(help="Labelled token folder to validate on (default: a share of --train)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Classifier folder (default $IGPT_HOME/finetune). Reruns resume.")
    ] = None,
    ray_address: RayAddress = None,
    json_lines: JsonLines = False,
    ray_logs: RayLogs = False,
) -> None:
    """Fine-tune a pretrained checkpoint into a classifier with Ray Train; keeps the best validation step."""
    with TrainProgress("finetune", config.steps, json_lines=json_lines) as progress:
        result = run_finetune(
            checkpoint,
            train,
            test,
            out or _home() / "finetune",
            config=config,
            val_shards=val,
            ray_address=ray_address,
            ray_logs=ray_logs,
            on_report=progress,
        )
    report = result.report
    counts = {name: part["n"] for name, part in report["splits"].items()}
    if report["absent_test_classes"]:
        typer.echo(f"finetune: test classes never in the training subset: {report['absent_test_classes']}")
    typer.echo(format_finetune_table(report))
    typer.echo(
        f"finetune: {counts} images, best step {report['best_step']}, test accuracy "
        f"{report['test_accuracy']:.4f} → {result.checkpoint_dir}"
    )


@app.command()
def sample(
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint folder (model.safetensors, config.json, palette).")
    ],
    n: Annotated[int, typer.Option(help="Images to draw (or to complete with --complete).")] = 16,
    complete: Annotated[
        str | None, typer.Option(help="Complete held-out images from this source or shard folder.")
    ] = None,
    rows: Annotated[int | None, typer.Option(help="Rows given when completing (default R // 2).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely colours.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("samples.png"),
) -> None:
    """Draw unconditional samples, or complete the bottom of held-out images, as an upscaled PNG grid."""
    if complete is None:
        images = sampling.sample_images(
            checkpoint, n=n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        path = sampling.save_grid(images, out)
    else:
        originals, completions = sampling.complete_images(
            checkpoint, complete, n=n, rows=rows, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        path = sampling.save_completion_grid(originals, completions, out)
    typer.echo(f"sample: {path}")


@app.command()
@options(config=Fields(ProbeConfig, ("layer", "max_train", "max_test", "max_iter", "precision")))
def probe(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder.")],
    train: Annotated[Path, typer.Option("--train", help="Labelled training shards.")],
    test: Annotated[Path, typer.Option("--test", help="Labelled test shards.")],
    *,
    config: ProbeConfig,
    out: Annotated[Path | None, typer.Option(help="Folder for probe.json (default: the checkpoint).")] = None,
) -> None:
    """Linear probe on layer features, beside raw-pixel and random-init baselines."""
    try:
        # the image counts come before the work, the bars (stderr) during it, the table after
        result = run_probe(
            checkpoint, train, test, config, out_dir=out or checkpoint, progress=True, announce=typer.echo
        )
    except ProbeError as error:
        # probe errors name the input ("max_train: ..."); the user typed the flag
        field, colon, rest = str(error).partition(":")
        flag = "--" + field.replace("_", "-")
        _fail(f"{flag}{colon}{rest}" if colon and field.isidentifier() else str(error))
    # the table opens with any test classes absent from train, before the numbers
    typer.echo(format_probe_table(result))


def _flagged(error: ValueError, flags: tuple[str, ...]) -> str:
    """`error`'s message with its leading parameter name ("checkpoint: ...") as the flag ("--checkpoint: ...")."""
    name, colon, rest = str(error).partition(":")
    if colon and name in flags:
        return f"--{name.replace('_', '-')}{colon}{rest}"
    return str(error)


@app.command()
def classify(
    checkpoint: Annotated[
        Path, typer.Option(help="Classifier checkpoint folder (from `igpt finetune` or `igpt import-hf`).")
    ],
    source: Source,
    out: Annotated[
        Path, typer.Option(help="Predictions to write; the rejects go beside it (<name>.rejects.parquet).")
    ] = Path("predictions.parquet"),
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = DEFAULT_BATCH_SIZE,
) -> None:
    """Predict the class of every image of a source: one parquet row per image, rejects listed beside it."""
    try:
        result = run_classify(checkpoint, source, out, batch_size=batch_size, announce=typer.echo)
    except ClassifyError as error:
        _fail(_flagged(error, ("checkpoint", "source", "out", "batch_size")))
    except SourceError as error:
        _fail(f"--source: {error}")
    counts = result.counts
    typer.echo(
        f"classify: {counts['images']} images = {counts['classified']} classified + {counts['rejected']} rejected"
    )
    typer.echo(f"  predictions (key, class, name, probability, top5) → {result.out}")
    typer.echo(f"  rejects (key, reason) → {result.rejects_path}")
    for key, reason in result.rejects[:3]:
        typer.echo(f"    {key}: {reason}")
    if len(result.rejects) > 3:
        typer.echo(f"    ... and {len(result.rejects) - 3} more")
    if result.accuracy is not None:
        typer.echo(f"  accuracy on the {result.labelled} labelled images: {result.accuracy:.4f}")
    elif result.note:
        typer.echo(f"  {result.note}")


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder (pretraining or classifier).")],
    out: Annotated[Path, typer.Option(help="Folder for the transformers `save_pretrained` layout.")],
) -> None:
    """Write a checkpoint as a transformers folder: ImageGPTForCausalImageModeling, or
    ImageGPTForImageClassification for a classifier checkpoint."""
    from igpt_core import hf, hf_classifier  # heavy: torch
    from igpt_core.model import ImageGPT  # heavy: torch

    try:
        if isinstance(read_config(checkpoint).get(CLASSIFIER_KEY), dict):
            hf_classifier.save_hf_classifier(load_classifier(checkpoint)[0], out)
            kind = hf_classifier.ARCHITECTURE
        else:
            hf.save_hf(ImageGPT.load(checkpoint), out)
            kind = hf.ARCHITECTURE
    except CheckpointError as error:
        _fail(_flagged(error, ("checkpoint",)))
    except hf.HFFormatError as error:  # a head transformers cannot hold
        _fail(f"--checkpoint: {error}")
    typer.echo(f"export-hf: {kind} → {out}")


@app.command("import-hf")
def import_hf(
    hf: Annotated[
        Path,
        typer.Option(
            "--hf",
            help="A transformers ImageGPT folder (save_pretrained layout): causal, or a classifier "
            "(ImageGPTForImageClassification).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    palette_path: Annotated[
        Path | None,
        typer.Option("--palette", help="Palette folder or openai kmeans_centers.npy to store with it."),
    ] = None,
) -> None:
    """Import a transformers ImageGPT checkpoint (e.g. openai/imagegpt-small, or an image classifier) as
    an igpt checkpoint; a classifier becomes a classifier checkpoint that `igpt classify` runs."""
    from igpt_core.classifier import ImageGPTClassifier  # heavy: torch
    from igpt_core.hf import HFFormatError, load_hf  # heavy: torch
    from igpt_core.hf_classifier import is_classifier_folder, load_hf_classifier  # heavy: torch
    from igpt_core.model import ImageGPT  # heavy: torch

    model: ImageGPT | ImageGPTClassifier
    try:
        model = load_hf_classifier(hf) if is_classifier_folder(hf) else load_hf(hf)
    except HFFormatError as error:
        _fail(f"--hf: {error}")
    pal = None if palette_path is None else Palette.load(palette_path)
    if pal is not None and pal.clusters != model.config.vocab_size:
        _fail(f"--palette: {pal.clusters} colours, but the model has {model.config.vocab_size}")
    save_model(model, out, extra={"palette_digest": pal.digest()} if pal is not None else None)
    if pal is not None:
        np.save(Path(out) / PALETTE_FILE, pal.centers)
    else:  # a palette an earlier import left there is not this model's
        (Path(out) / PALETTE_FILE).unlink(missing_ok=True)
    kind = "classifier" if isinstance(model, ImageGPTClassifier) else "causal model"
    typer.echo(f"import-hf: {kind} → {out}")


@app.command()
def run(
    source: Source = "builtin:digits",
    steps: Annotated[
        int | None, typer.Option(help=_TRAIN["steps"] + " Default: the pipeline's demo value.")
    ] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="Model size.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image side R.")] = None,
    workers: Annotated[int | None, typer.Option(help=_TRAIN["workers"])] = None,
    probe: Annotated[bool, typer.Option(help="Run the linear probe stage.")] = True,
) -> None:
    """Run the whole pipeline as the Prefect flow `igpt`, locally, with nothing started beforehand."""
    # heavy: prefect; the flow commands are the only place igpt_core calls flows/
    from flows.pipeline import PipelineParams, run_pipeline

    given: dict[str, Any] = dict(
        source=source, steps=steps, preset=preset_name, resolution=resolution, workers=workers, probe=probe
    )
    params = PipelineParams(**{k: v for k, v in given.items() if v is not None})
    summary = run_pipeline(params)
    typer.echo(str(summary))


@app.command()
def lineage(
    ref: Annotated[
        str,
        typer.Argument(
            help="A registered model version (igpt/3, 3), an alias (igpt@champion) or an MLflow run id."
        ),
    ],
) -> None:
    """Print the chain from a model back to its source data, palette and code version."""
    typer.echo(format_lineage(walk_lineage(ref)))


@data_app.command("add")
def data_add(
    paths: Annotated[list[Path], typer.Argument(help="Image files, folders or tars to add.")],
    to: Annotated[Path, typer.Option("--to", help="The watched source folder.")],
) -> None:
    """Copy new images into the watched folder and emit the new-data event that triggers retraining."""
    from flows.retrain import add_data  # heavy: prefect (see `run`)

    typer.echo(str(add_data(paths, to)))


def main() -> None:
    """Console entry point: user errors become one-line messages with exit status 2."""
    try:
        app()
    except (ConfigError, SourceError, FileNotFoundError) as error:
        typer.echo(f"igpt: error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
