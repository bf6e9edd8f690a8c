"""Local text and tokenizers: nothing is downloaded, so the plugin ships a slice of real English text and trains its
byte-level BPE tokenizers itself (with Hugging Face ``tokenizers``), in the files litgpt's ``Tokenizer`` reads."""

import json
import shutil
from importlib import resources
from pathlib import Path

from lattice_plugin.checkpoint import atomic_directory
from lattice_plugin.errors import LatticeError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"


def shipped_corpus() -> Path:
    """The folder with the shipped ``train/`` and held-out ``val/`` text (see its README.md)."""
    return Path(str(resources.files("lattice_plugin") / "corpus"))


def train_tokenizer(text_files: list[Path], out_dir: Path, vocab_size: int = 4096, force: bool = False) -> Path:
    """Train a byte-level BPE tokenizer on ``text_files`` and write ``tokenizer.json`` + ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    missing = [str(path) for path in text_files if not Path(path).is_file()]
    if not text_files or missing:
        raise LatticeError(f"no text to train the tokenizer on: missing {', '.join(missing) or 'text files'}")
    if vocab_size < 300:
        raise LatticeError(f"vocab size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(path) for path in text_files], trainer)
    with atomic_directory(out_dir, force=force) as tmp_dir:
        tokenizer.save(str(tmp_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "add_bos_token": True,
        }
        (tmp_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def prepare_corpus(
    out_dir: Path, vocab_size: int = 4096, force: bool = False, passkey_docs: int = 0, passkey_words: int = 160
) -> Path:
    """Copy the shipped text to ``out_dir/{train,val}`` (litgpt's TextFiles writes its token cache next to the text,
    so it cannot read from the installed package) and train a tokenizer on the training split into
    ``out_dir/tokenizer``. ``passkey_docs > 0`` adds ``train/passkey.txt``
    (:func:`~lattice_plugin.evaluation.data.passkey_training_text`, up to ``passkey_words`` words each)."""
    source = shipped_corpus()
    if passkey_docs:
        from lattice_plugin.evaluation.data import passkey_training_text

        passkey_text = passkey_training_text(passkey_docs, passkey_words)  # refuses bad settings before writing
    with atomic_directory(out_dir, force=force) as tmp_dir:
        for split in ("train", "val"):
            shutil.copytree(source / split, tmp_dir / split)
        shutil.copy(source / "README.md", tmp_dir / "README.md")
        if passkey_docs:
            (tmp_dir / "train" / "passkey.txt").write_text(passkey_text, encoding="utf-8")
        train_tokenizer(sorted((tmp_dir / "train").glob("*.txt")), tmp_dir / "tokenizer", vocab_size=vocab_size)
    return Path(out_dir)
