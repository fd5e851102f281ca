"""What each command can be asked: its request, with the defaults, and the choices of its options.

The stages take their requests and choices from here, and so does `cli.py` for its options' defaults and
help. This module imports neither torch nor zarr: `gsae --help`, a command's `--help` and a bad option's
message took 3 s, all of it importing torch through the stages (now about 0.3 s; docs/cli.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stores.held_out import HELD_OUT_FRACTION

# --- choices shared by several commands ---
DEVICES = ("auto", "cpu", "cuda")
#: who compresses and writes (`gsae cache --writer`) or decodes (`gsae train --reader`) the chunks
WORKER_KINDS = ("auto", "threads", "processes")

# --- gsae cache ---
CACHE_ROOT = "gsae-cache"


@dataclass
class CacheRequest:
    """Everything ``gsae cache`` was asked to do."""

    model: str | None = None
    revision: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    tokens: int = 100_000
    context_length: int = 256
    batch_size: int = 16
    cache: str | None = None
    compression: str = "lossless"
    keep_bits: int | None = None
    dtype: str = "float16"
    device: str = "auto"
    prepend_bos: bool | None = None
    keep_bos: bool = False
    chunk_tokens: int | None = None
    write_threads: int | None = None  # None: one per core
    writer: str = "auto"  # WORKER_KINDS; auto: threads (pipeline.processes.AUTO_PROCESSES)


# --- gsae group ---
METRICS = ("amad", "uniform")
DEFAULT_SAMPLE_TOKENS = 300_000
DEFAULT_THRESHOLD = 0.2


@dataclass
class GroupRequest:
    cache: str
    metric: str = "amad"
    tokens: int = DEFAULT_SAMPLE_TOKENS
    threshold: float = DEFAULT_THRESHOLD
    layers: str | None = None
    seed: int = 0
    scheduler: str | None = None
    allow_partial: bool = False
    force: bool = False
    device: str = "auto"  # where the distance products run; not part of the grouping's arguments


# --- gsae train ---
RUNS_ROOT = "runs"
ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
TOP_K_ARCHITECTURES = ("topk", "batchtopk")  # those with a k (and AuxK); ReLU and JumpReLU have none
L1_COEFFICIENT = 5.0  # ReLU's L1 weight and JumpReLU's L0 weight (--l1-coefficient)
PRECISIONS = ("float32", "bfloat16")


@dataclass
class TrainRequest:
    cache: str | None  # None only with --resume: the cache the run recorded
    groups: int | None = None
    baseline: bool = False
    metric: str = "amad"
    tokens: int = 1_000_000
    expansion: float = 16
    k: int | None = None
    architecture: str = "topk"
    batch_size: int = 4096
    lr: float | None = None
    out: str | None = None
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    eval_fraction: float = HELD_OUT_FRACTION
    dead_tokens: int | None = None
    checkpoint_every: int = 200
    log_every: int = 10
    window_chunks: int = 8
    tf32: bool = True  # TF32 matmuls on CUDA, as sparsify sets them; no effect on the CPU
    precision: str = "float32"  # or "bfloat16": the forward under autocast
    l1_coefficient: float = L1_COEFFICIENT  # ReLU's L1 weight, JumpReLU's L0 weight
    given: tuple[str, ...] = ()  # the options typed on the command line: --resume refuses those that differ
    reader: str = "auto"  # who decodes the chunks (WORKER_KINDS); not recorded: it changes no result


# --- gsae eval ---
EVAL_TOKENS = 16384  # held-out rows per layer for reconstruction and sparsity
EVAL_WINDOWS = 32  # held-out text windows for the downstream metrics

# --- gsae export ---
FORMATS = ("saelens", "sparsify")


# --- gsae run ---
@dataclass
class PaperRequest:
    cache: str
    groups: list[int] = field(default_factory=list)  # empty: G* and its neighbours
    tokens: int = TrainRequest.tokens
    expansion: float = TrainRequest.expansion
    batch_size: int = TrainRequest.batch_size
    windows: int = 16  # fewer held-out windows than `gsae eval`'s default: the comparison evaluates many runs
    out: str = RUNS_ROOT
    layers: str | None = None  # `gsae group --layers`: the layers every run covers (default: all but the last)
