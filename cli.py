"""Command-line entry point: one click subcommand per pipeline stage, each its own MLflow run."""
from __future__ import annotations

import click

from vqvae.train import train_vqvae_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """VQGAN + transformer image synthesis, tracked in MLflow.

    Stages chain by run ID: train-vqvae -> quantize -> train -> generate -> decode.
    Each prints its run ID as the last line of stdout.
    """


cli.add_command(train_vqvae_command)

if __name__ == "__main__":
    cli()
