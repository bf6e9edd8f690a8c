"""``lattice corpus`` and ``lattice tokenizer``: local text and tokenizers (nothing is downloaded)."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app


@app.command()
def corpus(
    out_dir: Path = typer.Argument(Path("out/corpus"), help="Where to write train/, val/ and tokenizer/."),
    vocab_size: int = typer.Option(4096, help="Size of the BPE vocabulary trained on the training text."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT_DIR."),
    passkey_docs: int = typer.Option(
        0,
        help="Also write train/passkey.txt: this many answered pass-key documents in lattice_passkey's format, so "
        "that a model trained on the text can then be scored on the task beyond its training length.",
    ),
    passkey_words: int = typer.Option(160, help="Longest pass-key training document, in words (shortest: 32)."),
) -> None:
    """Write the shipped English text (train/ and held-out val/) and a BPE tokenizer trained on train/."""
    from lattice_plugin.corpus import prepare_corpus

    prepare_corpus(out_dir, vocab_size=vocab_size, force=force, passkey_docs=passkey_docs, passkey_words=passkey_words)
    extra = f" (with {passkey_docs} pass-key documents)" if passkey_docs else ""
    typer.echo(f"wrote {out_dir}/train{extra}, {out_dir}/val and {out_dir}/tokenizer")


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
