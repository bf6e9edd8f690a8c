"""``lattice corpus`` and ``lattice tokenizer``: local text and tokenizers (nothing is downloaded)."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app


@app.command()
def corpus(
    out_dir: Path = typer.Argument(Path("out/corpus"), help="Where to write train/, val/ and tokenizer/."),
    vocab_size: int = typer.Option(4096, help="Size of the BPE vocabulary trained on the training text."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT_DIR."),
) -> None:
    """Write the shipped English text (train/ and held-out val/) and a BPE tokenizer trained on train/."""
    from lattice_plugin.corpus import prepare_corpus

    prepare_corpus(out_dir, vocab_size=vocab_size, force=force)
    typer.echo(f"wrote {out_dir}/train, {out_dir}/val and {out_dir}/tokenizer")


@app.command()
def tokenizer(
    text: list[Path] = typer.Option(..., "--text", help="Text file to train on (repeat for several)."),
    out_dir: Path = typer.Option(..., "--out", help="Directory for tokenizer.json and tokenizer_config.json."),
    vocab_size: int = typer.Option(4096, help="Size of the BPE vocabulary."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Train a byte-level BPE tokenizer from local text into a (checkpoint) directory."""
    from lattice_plugin.corpus import train_tokenizer

    train_tokenizer(text, out_dir, vocab_size=vocab_size, force=force)
    typer.echo(f"wrote {out_dir}/tokenizer.json")
