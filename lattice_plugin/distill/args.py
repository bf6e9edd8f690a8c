"""The ``lattice distill`` recipe: dataclasses parsed by jsonargparse (litgpt's own parser), so every recipe key is
also a command-line flag (``--stage2.temperature 2``), ``--config recipe.yaml`` loads a recipe, and an unknown or
mistyped key is refused with one line naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lattice_plugin.errors import LatticeError

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
TRAINABLE = ("full", "lattice", "lora", "lora+lattice")
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


@dataclass
class TrainArgs:
    """Batching, clipping, logging and checkpointing, shared by both stages."""

    global_batch_size: int = 16
    """Sequences per optimizer step, over all devices (gradient accumulation makes up the difference)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one device."""
    max_seq_length: int | None = None
    """Tokens per training sequence (default: the student's block size)."""
    max_norm: float | None = 1.0
    """Gradient clipping norm (None: no clipping)."""
    log_interval: int = 1
    """Optimizer steps between log lines / logger rows."""
    save_interval: int | None = 100
    """Optimizer steps between resumable checkpoints (None: only the stage's final checkpoint)."""
    keep_last: int | None = None
    """Step checkpoints each stage keeps, the newest (None: all); older ones are deleted once a new one is complete."""


@dataclass
class StageArgs:
    """Budget and optimizer of one stage (AdamW, linear warm-up then cosine decay to ``min_lr``)."""

    enabled: bool = True
    """Run this stage."""
    max_tokens: int | None = None
    """Training tokens of the stage over all devices (rounded up to whole optimizer steps)."""
    max_steps: int | None = None
    """Optimizer steps of the stage (takes precedence over ``max_tokens``)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float | None = None
    """Final learning rate of the cosine decay (default: lr / 10)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""


@dataclass
class AttentionTransferArgs(StageArgs):
    """Stage 1: the Lattice layers learn to reproduce the attention output of the layer they replaced."""

    teacher_forcing: bool = True
    """Feed each layer the attention output of the layer before (the teacher's hidden states, as in LoLCATs and
    RADLADS); False feeds it the student's own output."""


@dataclass
class LogitDistillArgs(StageArgs):
    """Stage 2: the student matches the teacher's next-token distribution (and optionally the data)."""

    temperature: float = 1.0
    """Softmax temperature T of the KL term (the term is scaled by T^2)."""
    kl_weight: float = 1.0
    """Weight of KL(teacher || student)."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy on the next token of the data."""
    trainable: str = "full"
    """What trains: full (every parameter), lattice (the new Lattice parameters only), lora (LoRA adapters only) or
    lora+lattice (LoRA adapters and the Lattice parameters). LoRA is merged into the final checkpoint."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_query: bool = True
    lora_key: bool = True
    lora_value: bool = True
    lora_projection: bool = True
    lora_mlp: bool = False
    lora_head: bool = False


@dataclass
class EvalArgs:
    """Validation during training and the final report."""

    interval: int | None = 50
    """Optimizer steps between validations (None: only at the start and end of each stage)."""
    max_iters: int = 8
    """Validation batches per periodic validation."""
    final_max_iters: int | None = None
    """Validation batches of the report's perplexities (None: the whole held-out split)."""
    decode_tokens: int = 64
    """Tokens generated (greedy, batch 1, through the cache) to time decoding; 0 skips the timing."""
    prompt_tokens: int = 32
    """Prompt tokens (taken from the held-out text) before the timed generation."""
    cache_lengths: list[int] = field(default_factory=lambda: [2048, 131072])
    """Context lengths at which the report gives the generation-cache bytes of teacher and student."""


def recipe(
    student_dir: Path,
    teacher_dir: Path | None = None,
    out_dir: Path = Path("out/distill"),
    data: Any = None,
    train: TrainArgs = TrainArgs(),
    stage1: AttentionTransferArgs = AttentionTransferArgs(),
    stage2: LogitDistillArgs = LogitDistillArgs(),
    eval: EvalArgs = EvalArgs(),
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    resume: bool | Path = False,
    logger_name: str = "csv",
    seed: int = 42,
) -> DistillConfig:
    """Distill a converted Lattice checkpoint from its attention teacher: attention transfer, then logit KD.

    The recipe as a signature, for jsonargparse (the keys and their help) and for Python:
    ``distill(recipe(student_dir=..., ...))`` (:func:`lattice_plugin.distill.trainer.distill`).

    Args:
        student_dir: The converted checkpoint (``lattice convert`` output) to distill.
        teacher_dir: The attention teacher (default: the source recorded in the student's conversion.json).
        out_dir: Where checkpoints, logs, the final student (``final/``) and ``report.json`` go.
        data: A litgpt data module that yields token sequences, e.g. ``litgpt.data.TextFiles``; its validation split
            is the held-out text of the report.
        train: Batching, clipping, logging and checkpointing.
        stage1: Attention transfer (MSE between each Lattice layer and the attention it replaced).
        stage2: End-to-end logit distillation (KL to the teacher, optional cross-entropy), full or LoRA.
        eval: Validation and the final report.
        devices: Devices per node (an integer, or "auto").
        num_nodes: Nodes (launch every node with Fabric's launcher or torchrun).
        strategy: auto, ddp or fsdp.
        precision: 32-true, bf16-mixed, bf16-true or 16-mixed (default: bf16-mixed on CUDA, else 32-true).
        resume: True continues from the newest checkpoint in out_dir; a path continues from that checkpoint.
        logger_name: csv, tensorboard, wandb or mlflow.
        seed: Random seed (data order, LoRA initialisation).
    """
    return DistillConfig(**locals())


@dataclass
class DistillConfig:
    """The parsed recipe (:func:`recipe`'s arguments)."""

    student_dir: Path
    teacher_dir: Path | None = None
    out_dir: Path = Path("out/distill")
    data: Any = None
    train: TrainArgs = field(default_factory=TrainArgs)
    stage1: AttentionTransferArgs = field(default_factory=AttentionTransferArgs)
    stage2: LogitDistillArgs = field(default_factory=LogitDistillArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    resume: bool | Path = False
    logger_name: str = "csv"
    seed: int = 42

    def __post_init__(self) -> None:
        self.student_dir = Path(self.student_dir)
        self.out_dir = Path(self.out_dir)
        if self.teacher_dir is not None:
            self.teacher_dir = Path(self.teacher_dir)
        if isinstance(self.resume, str) and not isinstance(self.resume, Path):
            self.resume = Path(self.resume)
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for the report and the checkpoints); the data module as in a recipe: its class path
        and constructor arguments (not what ``connect`` set later)."""
        import dataclasses

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value) and type(value).__module__ == __name__:
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, Path):
                return str(value)
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            arguments = dataclasses.fields(value) if dataclasses.is_dataclass(value) else ()
            return {
                "class_path": f"{type(value).__module__}.{type(value).__qualname__}",
                "init_args": {f.name: plain(getattr(value, f.name)) for f in arguments if f.init},
            }

        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


# What a resumed run may change: these keys decide what is logged, saved, validated or reported, never what is trained.
MAY_CHANGE_ON_RESUME = (
    "resume",
    "out_dir",
    "logger_name",
    "train.log_interval",
    "train.save_interval",
    "train.keep_last",
    "eval",
    "data.init_args.num_workers",
)
_MISSING = "(not set)"


def recipe_difference(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted, in the stored recipe's order) whose value differs between two ``to_dict()`` recipes,
    with both values; None when they agree on every key outside :data:`MAY_CHANGE_ON_RESUME`."""
    for key in [*stored, *(key for key in current if key not in stored)]:
        name = f"{prefix}{key}"
        if any(name == allowed or name.startswith(f"{allowed}.") for allowed in MAY_CHANGE_ON_RESUME):
            continue
        old, new = stored.get(key, _MISSING), current.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            difference = recipe_difference(old, new, f"{name}.")
            if difference is not None:
                return difference
        elif old != new:
            return name, old, new
    return None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LatticeError(message)


def _positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be an integer >= 1, got {value!r}",
    )


def validate(config: DistillConfig) -> None:
    """Refuse values no run could use, before anything starts."""
    train = config.train
    _positive_int(train.global_batch_size, "train.global_batch_size")
    _positive_int(train.micro_batch_size, "train.micro_batch_size")
    _positive_int(train.max_seq_length, "train.max_seq_length", allow_none=True)
    _positive_int(train.log_interval, "train.log_interval")
    _positive_int(train.save_interval, "train.save_interval", allow_none=True)
    _positive_int(train.keep_last, "train.keep_last", allow_none=True)
    _check(train.max_norm is None or train.max_norm > 0, f"train.max_norm must be > 0, got {train.max_norm!r}")
    _check(
        train.global_batch_size % train.micro_batch_size == 0,
        f"train.global_batch_size ({train.global_batch_size}) must be a multiple of train.micro_batch_size "
        f"({train.micro_batch_size})",
    )
    for name in ("stage1", "stage2"):
        stage: StageArgs = getattr(config, name)
        if stage.enabled:
            _positive_int(stage.max_steps, f"{name}.max_steps", allow_none=True)
            _positive_int(stage.max_tokens, f"{name}.max_tokens", allow_none=True)
            _check(
                stage.max_steps is not None or stage.max_tokens is not None,
                f"{name} needs a budget: set {name}.max_tokens or {name}.max_steps (or {name}.enabled false)",
            )
        _check(stage.lr > 0 and math.isfinite(stage.lr), f"{name}.lr must be a positive number, got {stage.lr!r}")
        _check(stage.min_lr is None or 0 <= stage.min_lr <= stage.lr, f"{name}.min_lr must be in [0, lr]")
        _check(stage.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0")
        _check(stage.weight_decay >= 0, f"{name}.weight_decay must be >= 0")
    _check(config.stage1.enabled or config.stage2.enabled, "both stages are disabled: nothing to do")
    stage2 = config.stage2
    _check(stage2.temperature > 0, f"stage2.temperature must be > 0, got {stage2.temperature!r}")
    _check(stage2.kl_weight >= 0 and stage2.ce_weight >= 0, "stage2.kl_weight and stage2.ce_weight must be >= 0")
    _check(stage2.kl_weight > 0 or stage2.ce_weight > 0, "stage2.kl_weight and stage2.ce_weight are both 0")
    _check(
        stage2.trainable in TRAINABLE,
        f"stage2.trainable must be one of {', '.join(TRAINABLE)}; got {stage2.trainable!r}",
    )
    if "lora" in stage2.trainable:
        _positive_int(stage2.lora_r, "stage2.lora_r")
        _check(
            any(
                (
                    stage2.lora_query,
                    stage2.lora_key,
                    stage2.lora_value,
                    stage2.lora_projection,
                    stage2.lora_mlp,
                    stage2.lora_head,
                )
            ),
            "stage2.trainable uses LoRA but every stage2.lora_* target is off",
        )
    evaluation = config.eval
    _positive_int(evaluation.interval, "eval.interval", allow_none=True)
    _positive_int(evaluation.max_iters, "eval.max_iters")
    _positive_int(evaluation.final_max_iters, "eval.final_max_iters", allow_none=True)
    _check(evaluation.decode_tokens >= 0, "eval.decode_tokens must be >= 0")
    _positive_int(evaluation.prompt_tokens, "eval.prompt_tokens")
    _check(all(isinstance(n, int) and n >= 1 for n in evaluation.cache_lengths), "eval.cache_lengths must be >= 1")
    _check(config.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}; got {config.strategy!r}")
    _check(
        config.precision is None or config.precision in PRECISIONS,
        f"precision must be one of {', '.join(PRECISIONS)}; got {config.precision!r}",
    )
    _check(
        config.logger_name in LOGGERS, f"logger_name must be one of {', '.join(LOGGERS)}; got {config.logger_name!r}"
    )
    _positive_int(config.num_nodes, "num_nodes")
    _check(
        config.devices == "auto" or (isinstance(config.devices, int) and config.devices >= 1),
        f"devices must be an integer >= 1 or 'auto', got {config.devices!r}",
    )
    if config.data is not None:
        from litgpt.data import DataModule

        _check(
            isinstance(config.data, DataModule), f"data must be a litgpt data module, got {type(config.data).__name__}"
        )


def build_parser():
    """The jsonargparse parser of :func:`recipe` with ``--config`` (errors raised, not printed: see :func:`parse`)."""
    import jsonargparse
    from jsonargparse import ActionConfigFile, ArgumentParser
    from litgpt.data import DataModule

    if hasattr(jsonargparse, "set_parsing_settings"):
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    parser = ArgumentParser(
        prog="lattice distill",
        description="Distill a converted Lattice checkpoint from its attention teacher (attention transfer, then "
        "logit distillation). Every recipe key is also a flag.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML recipe (recipes/distill/*.yaml).")
    parser.add_function_arguments(recipe, skip={"data"})
    parser.add_subclass_arguments(DataModule, "data", required=False, instantiate=True, default=None)
    return parser


def parse(argv: list[str]) -> DistillConfig:
    """Parse a recipe and flags into a :class:`DistillConfig`; any problem is one :class:`LatticeError` line."""
    import argparse

    parser = build_parser()
    try:
        namespace = parser.parse_args(recipes_first(argv))
        namespace = parser.instantiate_classes(namespace)
    except (argparse.ArgumentError, TypeError, ValueError) as error:
        if isinstance(error, LatticeError):
            raise
        raise LatticeError(f"bad recipe or flag: {summarize_error(str(error))}") from None
    values = {name: namespace.get(name) for name in DistillConfig.__dataclass_fields__}
    for name, cls in (
        ("train", TrainArgs),
        ("stage1", AttentionTransferArgs),
        ("stage2", LogitDistillArgs),
        ("eval", EvalArgs),
    ):
        value = values[name]
        if not isinstance(value, cls):  # a Namespace when jsonargparse did not instantiate the group
            value = cls(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))
        values[name] = value
    return DistillConfig(**values)


def recipes_first(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config`` recipes moved to the front, after checking that they exist: a flag overrides
    the recipe wherever it stands (jsonargparse applies arguments in order, so a flag before ``--config`` was silently
    undone by the recipe, or refused as "not expected" before the recipe said which data module it belongs to)."""
    recipes: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                index += 1
                if index == len(argv):
                    raise LatticeError("--config needs a recipe file")
                path = argv[index]
            else:
                path = arg.removeprefix("--config=")
            if not Path(path).is_file():
                raise LatticeError(f"recipe file {path!r} does not exist")
            recipes += ["--config", path]
        else:
            rest.append(arg)
        index += 1
    return recipes + rest


def summarize_error(message: str) -> str:
    """jsonargparse errors span many lines (every Union alternative it tried): keep the lines that say what is wrong."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    key = lines[0].rstrip(":")
    specific = [
        line.lstrip("- ")
        for line in lines[1:]
        if any(
            marker in line
            for marker in (
                "not expected",
                "does not accept",
                "is required",
                "Expected a",
                "does not exist",
                "Got value",
            )
        )
        and "NoneType" not in line
    ]
    if specific:
        return f"{key}: {specific[-1]}" if key.startswith("Parser key") else f"{key}; {specific[-1]}"
    return key
