"""Command-line entry point: one click subcommand per pipeline stage, each its own MLflow run."""
from __future__ import annotations

import click

from core.manifest import make_manifest_command
from core.mlflow_models import register_command
from transformer.generate import generate_command
from transformer.train import train_command
from vqvae.decode import decode_command
from vqvae.evaluate import evaluate_command
from vqvae.pretrained import export_vqvae_command, import_vqvae_command
from vqvae.quantize import quantize_command
from vqvae.train import train_vqvae_command
from workflows.demo import demo_command
from workflows.pipeline import pipeline_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """VQGAN + transformer image synthesis, tracked in MLflow.

    Stages chain by run ID: train-vqvae -> quantize -> train -> generate -> decode.
    Each prints its run ID as the last line of stdout.
    """


for command in (train_vqvae_command, quantize_command, train_command, generate_command, decode_command,
                make_manifest_command, evaluate_command, pipeline_command, demo_command, import_vqvae_command,
                export_vqvae_command, register_command):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
