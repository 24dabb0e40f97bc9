"""The `igpt` command: one typed function per stage, each a thin call into the library.

Option help comes from the stage config dataclasses' field docstrings, so the library and the command
line describe a setting in one place. Errors in user input (a bad option, a source that cannot be read)
end the command with a one-line message naming the input and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from igpt_core.config import (
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

app = typer.Typer(
    name="igpt",
    help="ImageGPT: palette → tokens → pretraining → probe, samples and completions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Manage the watched data folder that triggers retraining.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_PALETTE = field_docs(PaletteConfig)
_TOKENIZE = field_docs(TokenizeConfig)
_MODEL = field_docs(ModelConfig)
_TRAIN = field_docs(TrainConfig)
_PROBE = field_docs(ProbeConfig)


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
def palette(
    source: Source = "builtin:digits",
    clusters: Annotated[int, typer.Option(help=_PALETTE["clusters"])] = 512,
    method: Annotated[str, typer.Option(help=_PALETTE["method"])] = "histogram",
    resolution: Annotated[int, typer.Option(help=_PALETTE["resolution"])] = 32,
    seed: Annotated[int, typer.Option(help=_PALETTE["seed"])] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default $IGPT_HOME/palette).")] = None,
    ray_address: RayAddress = None,
) -> None:
    """Fit a K-colour k-means palette on the source's pixels (distributed on Ray)."""
    from igpt_core.palette import fit_palette

    config = PaletteConfig(clusters=clusters, method=method, resolution=resolution, seed=seed)  # type: ignore[arg-type]
    out_dir = out or _home() / "palette"
    fitted = fit_palette(source, config=config, ray_address=ray_address, progress=True)
    path = fitted.save(out_dir, meta=getattr(fitted, "meta", {}) or {})
    typer.echo(f"palette: {fitted.clusters} colours, digest {fitted.digest()[:12]} → {path}")


@app.command()
def tokenize(
    palette: Annotated[
        Path, typer.Option("--palette", help="Palette folder (or openai kmeans_centers.npy).")
    ],
    source: Source = "builtin:digits",
    resolution: Annotated[int, typer.Option(help=_TOKENIZE["resolution"])] = 32,
    split: Annotated[str, typer.Option(help=_TOKENIZE["split"])] = "train",
    shard_size: Annotated[int, typer.Option(help=_TOKENIZE["shard_size"])] = 10_000,
    out: Annotated[Path | None, typer.Option(help="Output folder (default $IGPT_HOME/shards).")] = None,
    ray_address: RayAddress = None,
) -> None:
    """Quantize images with a palette and write webdataset shards, manifest.parquet and meta.json."""
    from igpt_core.tokens import tokenize as run_tokenize

    config = TokenizeConfig(resolution=resolution, split=split, shard_size=shard_size)
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
def pretrain(
    shards: Annotated[Path, typer.Option("--shards", help="Folder of token shards from `igpt tokenize`.")],
    preset_name: Annotated[
        str, typer.Option("--preset", help=f"Model size: {', '.join(preset_names())}.")
    ] = "tiny",
    resolution: Annotated[int | None, typer.Option(help="Image side R (default: the shards' R).")] = None,
    n_layer: Annotated[int | None, typer.Option(help=_MODEL["n_layer"] + " Overrides the preset.")] = None,
    n_head: Annotated[int | None, typer.Option(help=_MODEL["n_head"] + " Overrides the preset.")] = None,
    n_embd: Annotated[int | None, typer.Option(help=_MODEL["n_embd"] + " Overrides the preset.")] = None,
    steps: Annotated[int, typer.Option(help=_TRAIN["steps"])] = 1000,
    batch_size: Annotated[int, typer.Option(help=_TRAIN["batch_size"])] = 32,
    lr: Annotated[float, typer.Option(help=_TRAIN["lr"])] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help=_TRAIN["warmup_steps"])] = 100,
    eval_every: Annotated[int, typer.Option(help=_TRAIN["eval_every"])] = 100,
    checkpoint_every: Annotated[int, typer.Option(help=_TRAIN["checkpoint_every"])] = 100,
    workers: Annotated[int, typer.Option(help=_TRAIN["workers"])] = 1,
    seed: Annotated[int, typer.Option(help=_TRAIN["seed"])] = 0,
    precision: Annotated[str, typer.Option(help=_TRAIN["precision"])] = "auto",
    compile_step: Annotated[bool, typer.Option("--compile", help=_TRAIN["compile"])] = False,
    palette_dir: Annotated[
        Path | None, typer.Option("--palette", help="Palette folder to store with the checkpoint.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default $IGPT_HOME/run). Reruns resume.")
    ] = None,
    ray_address: RayAddress = None,
) -> None:
    """Pretrain a GPT on next-pixel prediction with Ray Train; a rerun resumes from the last checkpoint."""
    from igpt_core.pretrain import pretrain as run_pretrain
    from igpt_core.tokens import read_meta

    meta = read_meta(shards)
    overrides = {
        k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd).items() if v is not None
    }
    model = preset(
        preset_name,
        vocab_size=int(meta["clusters"]) if "clusters" in meta else int(meta["K"]),
        resolution=resolution or int(meta.get("resolution", meta.get("R", 32))),
        **overrides,
    )
    train = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=min(warmup_steps, steps),
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        workers=workers,
        seed=seed,
        precision=precision,  # type: ignore[arg-type]  # checked by TrainConfig
        compile=compile_step,
    )
    result = run_pretrain(
        shards,
        out or _home() / "run",
        model=model,
        train=train,
        palette_dir=palette_dir,
        ray_address=ray_address,
        on_report=lambda metrics: typer.echo(json.dumps(metrics, default=str)),
    )
    typer.echo(f"pretrain: step {result.step} → {result.checkpoint_dir}")


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
    from igpt_core import sample as sampling

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
def probe(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder.")],
    train: Annotated[Path, typer.Option("--train", help="Labelled training shards.")],
    test: Annotated[Path, typer.Option("--test", help="Labelled test shards.")],
    layer: Annotated[str | None, typer.Option(help=_PROBE["layer"])] = None,
    max_train: Annotated[int | None, typer.Option(help=_PROBE["max_train"])] = None,
    max_test: Annotated[int | None, typer.Option(help=_PROBE["max_test"])] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for probe.json (default: the checkpoint).")] = None,
) -> None:
    """Linear probe on layer features, beside raw-pixel and random-init baselines."""
    from igpt_core.probe import format_probe_table, run_probe

    parsed: int | str | None = layer
    if layer is not None and layer != "all":
        if not layer.isdigit():
            _fail(f"--layer: expected an integer or 'all', got {layer!r}")
        parsed = int(layer)
    config = ProbeConfig(layer=parsed, max_train=max_train, max_test=max_test)  # type: ignore[arg-type]
    result = run_probe(checkpoint, train, test, config, out_dir=out or checkpoint)
    typer.echo(format_probe_table(result))


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the transformers `save_pretrained` layout.")],
) -> None:
    """Write a checkpoint as a transformers ImageGPTForCausalImageModeling folder."""
    from igpt_core.model import ImageGPT

    ImageGPT.load(checkpoint).save_hf(out)
    typer.echo(f"export-hf: {out}")


@app.command("import-hf")
def import_hf(
    hf: Annotated[
        Path, typer.Option("--hf", help="A transformers ImageGPT folder (save_pretrained layout).")
    ],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    palette_path: Annotated[
        Path | None,
        typer.Option("--palette", help="Palette folder or openai kmeans_centers.npy to store with it."),
    ] = None,
) -> None:
    """Import a transformers ImageGPT checkpoint (e.g. openai/imagegpt-small) as an igpt checkpoint."""
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

    model = ImageGPT.from_hf(hf)
    model.save(out)
    if palette_path is not None:
        pal = Palette.load(palette_path)
        if pal.clusters != model.config.vocab_size:
            _fail(f"--palette: {pal.clusters} colours, but the model has {model.config.vocab_size}")
        import numpy as np

        np.save(Path(out) / "palette.npy", pal.centers)
    typer.echo(f"import-hf: {out}")


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
    from flows.pipeline import PipelineParams, run_pipeline

    given: dict[str, Any] = dict(
        source=source, steps=steps, preset=preset_name, resolution=resolution, workers=workers, probe=probe
    )
    params = PipelineParams(**{k: v for k, v in given.items() if v is not None})
    summary = run_pipeline(params)
    typer.echo(str(summary))


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="A registered model version (igpt/3, 3) or an MLflow run id.")],
) -> None:
    """Print the chain from a model back to its source data, palette and code version."""
    from igpt_core.tracking import format_lineage
    from igpt_core.tracking import lineage as walk

    typer.echo(format_lineage(walk(ref)))


@data_app.command("add")
def data_add(
    paths: Annotated[list[Path], typer.Argument(help="Image files, folders or tars to add.")],
    to: Annotated[Path, typer.Option("--to", help="The watched source folder.")],
) -> None:
    """Copy new images into the watched folder and emit the new-data event that triggers retraining."""
    from flows.retrain import add_data

    typer.echo(str(add_data(paths, to)))


def main() -> None:
    """Console entry point: user errors become one-line messages with exit status 2."""
    from igpt_core.sources import SourceError

    try:
        app()
    except (ConfigError, SourceError, FileNotFoundError) as error:
        typer.echo(f"igpt: error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
