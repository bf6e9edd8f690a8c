"""A tiny attention teacher and its Lattice conversion for the distillation tests (random weights, made in a second;
the tokenizer and text are conftest's ``tiny_corpus``)."""

import shutil
from pathlib import Path

import torch
from lattice_plugin.conversion.convert import ConversionOptions, convert_checkpoint
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.utils import save_config

from conftest import TINY_MODEL


def make_teacher(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A litgpt checkpoint directory (model_config.yaml, lit_model.pth, tokenizer) of the conftest tiny model."""
    config = Config(**TINY_MODEL)
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():  # litgpt's default init is tiny; give the attention outputs some size
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    out_dir.mkdir(parents=True)
    save_config(config, out_dir)
    torch.save(model.state_dict(), out_dir / "lit_model.pth")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def make_pair(root: Path, tokenizer_dir: Path, keep_attention: str | None = None) -> tuple[Path, Path]:
    """(teacher, converted student) under ``root``."""
    teacher = make_teacher(root / "teacher", tokenizer_dir)
    student = convert_checkpoint(teacher, root / "student", ConversionOptions(keep_attention=keep_attention))
    return teacher, student


def distill_flags(student: Path, teacher: Path, out_dir: Path, corpus: Path, *extra: str) -> list[str]:
    """Flags of a seconds-long run: 256-token steps, checkpoints every 2 steps, whole-split validation at the ends."""
    return [
        "--student_dir",
        str(student),
        "--teacher_dir",
        str(teacher),
        "--out_dir",
        str(out_dir),
        "--data.class_path",
        "litgpt.data.TextFiles",
        "--data.train_data_path",
        str(corpus / "train"),
        "--data.val_data_path",
        str(corpus / "val"),
        "--data.num_workers",
        "0",
        "--train.global_batch_size",
        "4",
        "--train.micro_batch_size",
        "2",
        "--train.max_seq_length",
        "64",
        "--train.save_interval",
        "2",
        "--train.log_interval",
        "1",
        "--stage1.max_steps",
        "4",
        "--stage1.lr",
        "0.05",
        "--stage2.max_steps",
        "4",
        "--stage2.lr",
        "0.002",
        "--eval.interval",
        "2",
        "--eval.max_iters",
        "2",
        "--eval.final_max_iters",
        "4",
        "--eval.decode_tokens",
        "8",
        "--eval.prompt_tokens",
        "8",
        "--eval.cache_lengths",
        "[64, 4096]",
        "--precision",
        "32-true",
        *extra,
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_gloo(rank: int, world_size: int, port: int) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` sharded with the trainer's FSDP units, on the CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lattice_plugin.distill.fabric import FSDP_UNITS

    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy(FSDP_UNITS), use_orig_params=True, device_id=torch.device("cpu")
    )


def sharded_transfer_step(
    rank: int, world_size: int, port: int, student: str, teacher_forcing: bool, result: str
) -> None:
    """One attention-transfer SGD step of ``student`` sharded with FSDP like ``lattice distill --strategy fsdp`` (the
    trainer's units, ``through_outputs``), on the CPU over gloo; rank 0 writes the loss after the step to ``result``."""
    import torch.distributed as dist

    from lattice_plugin.distill.losses import set_trainable

    _init_gloo(rank, world_size, port)
    try:
        model, tokens = transfer_setup(Path(student))
        set_trainable(model, "lattice")
        loss = transfer_losses(_fsdp(model), tokens, teacher_forcing, through_outputs=True)
        if rank == 0:
            Path(result).write_text(repr(loss))
    finally:
        dist.destroy_process_group()


class CpuFabric:
    """What ``heldout_loss`` uses of a Fabric, on the CPU, over the process group when there is one."""

    device = torch.device("cpu")

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        assert reduce_op == "sum"
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor


def heldout_batches(student: Path, count: int) -> list[torch.Tensor]:
    """``count`` held-out batches of different lengths for ``student``'s vocabulary."""
    vocab = transfer_setup(student)[0].config.vocab_size
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, vocab, (2, 9 + 3 * i), generator=generator) for i in range(count)]


def sharded_heldout_loss(rank: int, world_size: int, port: int, student: str, count: int, result: str) -> None:
    """``heldout_loss`` of the FSDP-sharded ``student`` with the held-out batches dealt round-robin to the ranks (so
    the shards differ in length); rank 0 writes the result as JSON to ``result``."""
    import json

    import torch.distributed as dist

    from lattice_plugin.distill.evaluation import heldout_loss

    _init_gloo(rank, world_size, port)
    try:
        model = _fsdp(transfer_setup(Path(student))[0])
        shard = heldout_batches(Path(student), count)[rank::world_size]
        metrics = heldout_loss(CpuFabric(world_size), model, shard, None, autocast=False)
        if rank == 0:
            Path(result).write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def transfer_setup(student: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    from lattice_plugin.checkpoint import load_model

    model = load_model(student)
    torch.manual_seed(1)
    return model, torch.randint(0, model.config.vocab_size, (2, 24))


def transfer_losses(
    model: torch.nn.Module, tokens: torch.Tensor, teacher_forcing: bool, through_outputs: bool
) -> float:
    """Attention-transfer loss after one SGD step (lr 0.5) on ``tokens`` (every rank sees the same batch)."""
    from lattice_plugin.distill.losses import AttentionTransfer

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    with AttentionTransfer(model, teacher_forcing=teacher_forcing, through_outputs=through_outputs) as transfer:
        for step in range(2):
            loss, _ = transfer.pop(model(tokens))
            if step == 1:
                return loss.item()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def validation_split_rows(rank: int, world_size: int, port: int, corpus: str, result: str) -> None:
    """The held-out rows this rank scores (``whole_split`` of litgpt's TextFiles validation loader, as ``lattice
    distill`` builds it), written as JSON lists of token ids to ``result`` + rank."""
    import json

    import torch.distributed as dist

    from lattice_plugin.distill.evaluation import whole_split

    _init_gloo(rank, world_size, port)
    try:
        rows = [row.tolist() for batch in whole_split(text_files(Path(corpus)).val_dataloader()) for row in batch]
        Path(f"{result}{rank}").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def text_files(corpus: Path):
    """litgpt's TextFiles data module over ``corpus`` (train/, val/, tokenizer/; prepared by the caller), batches of 4
    sequences of 31 tokens, as ``lattice distill`` sets it up."""
    from litgpt import Tokenizer
    from litgpt.data import TextFiles

    data = TextFiles(train_data_path=corpus / "train", val_data_path=corpus / "val", num_workers=1)
    data.connect(tokenizer=Tokenizer(corpus / "tokenizer"), batch_size=4, max_seq_length=31)
    return data
