"""Training on many processes and machines with torch.distributed, launched by torchrun.

torchrun (torch's elastic launcher) starts the processes, rendezvouses them (also across
nodes: `--nnodes`, `--rdzv-endpoint`) and restarts them all after a failure
(`--max-restarts`); this module only joins the group it made and wraps the model with
torch's own engines:

- `ddp`: `DistributedDataParallel`, every rank a full replica, gradients all-reduced.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) per block and on the root:
  parameters, gradients and optimizer state sharded over the ranks; checkpoints are
  sharded too (`torch.distributed.checkpoint`) and load on any world size.
- `tp`: tensor parallelism (`torch.distributed.tensor.parallel.parallelize_module`):
  attention `q`/`k`/`v` and MLP `up`/`gate` column-wise, `o`/`down` row-wise, so each
  rank holds its share of the heads and of the MLP's inner width; every rank sees the
  same batches.
- `auto`: none on one process, `ddp` on more.

gloo on the CPU, NCCL on CUDA; `MASTER_ADDR`/`MASTER_PORT` and the ranks come from
torchrun's environment. Every collective has a timeout, so a rank that never arrives
ends the others with an error instead of a hang.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from dapeng.errors import CheckpointError, ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp", "tp")
SHARDED = ("fsdp", "tp")  # strategies whose parameters are DTensors: sharded checkpoints
EXTRA = "trainer.pt"  # the non-tensor trainer state next to a sharded checkpoint's shards


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: global rank (0 writes the run directory).
        size: number of processes.
        local_rank: rank on this node (picks the GPU).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or another launcher that sets its environment) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def restarted() -> bool:
    """Whether torchrun restarted this process after a failure (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def world() -> World:
    """The current world: the initialised process group's, else torchrun's environment's, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if launched():
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def resolve_strategy(strategy: str, world_size: int) -> str:
    """`auto` → `none` on one process, `ddp` on more; `ddp` on one process is `none`."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"config key train.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy == "ddp" and world_size == 1:
        return "none"
    return strategy


def init(strategy: str = "auto", device: str = "auto", timeout_s: float = 300.0) -> World:
    """Join torchrun's process group (idempotent); FSDP/TP on one plain process get a group of one.

    Args:
        strategy: the `train.strategy` to run.
        device: `auto`, `cpu` or `cuda`: NCCL for CUDA, gloo for the CPU.
        timeout_s: how long any collective (the first rendezvous too) may wait for the other ranks.
    """
    if dist.is_initialized():
        return world()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if launched():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timeout,
                                device_id=torch.device("cuda", local) if cuda else None)
    elif strategy in SHARDED:
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return world()


def device_for(device: torch.device) -> torch.device:
    """A CUDA device means this rank's own GPU (`LOCAL_RANK`)."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", world().local_rank)
    return device


def initialized() -> bool:
    """Whether this process is in a process group (torchrun's, or FSDP/TP's group of one)."""
    return dist.is_available() and dist.is_initialized()


def clip_grad_norm(parameters: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global L2 norm, over every rank's shards (`clip_grad_norm_` with DTensors).

    torch's own handles all-plain and all-DTensor gradients (DDP, FSDP); tensor parallelism
    mixes sharded and replicated ones, which no multi-tensor kernel takes together: there
    each norm is taken on its own, sharded ones reduced over their ranks.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if len({isinstance(g, DTensor) for g in grads}) < 2:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
    norms = [g.detach().norm(2.0) for g in grads]
    total = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).norm(2.0)
    scale = min(1.0, max_norm / (total.item() + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.detach().mul_(scale)
    return total


def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled over the process group; itself on one process).

    For what each rank builds but must hold identically, such as a task set up on the data:
    a tokenizer trained on each rank may break ties in its vocabulary differently.
    """
    if not initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(model: nn.Module) -> None:
    """Every parameter and buffer of `model` set to rank 0's: FSDP and TP shard what each rank holds."""
    if not initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (itself on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def data_parallel_ranks(strategy: str) -> tuple[int, int]:
    """`(replicas, rank)` of the data: every rank its own slice, except under TP where all share every batch."""
    here = world()
    return (1, 0) if strategy == "tp" else (here.size, here.rank)


# --------------------------------------------------------------------------- wrapping


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory).

    FSDP and TP turn the model's parameters into DTensors in place; this copy is the plain
    architecture that the gathered full weights are loaded into for the Artifact.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def wrap(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module to train under `strategy`: DDP's wrapper, or `model` itself sharded in place (FSDP, TP)."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    broadcast_module(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # each repeated block its own unit (its weights gathered only while it runs), then the rest.
        # Not the embedding tables on their own: a model that reads a table's weight outside its
        # forward (positions sliced, a tied head) would meet a sharded DTensor there.
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    tensor_parallel(model, mesh)
    return model


def tensor_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard every attention and feed-forward block of `model` over `mesh`'s ranks, in place.

    Attention: `q`, `k`, `v` column-wise (each rank computes its own heads), `o` row-wise
    (partial sums all-reduced); feed-forward: `up` (and SwiGLU's `gate`) column-wise,
    `down` row-wise. One all-reduce per block half, as in Megatron-LM.

    Raises:
        ConfigError: the model has no such blocks, or its head count does not split over the ranks.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dapeng.layers.attention import MultiHeadAttention
    from dapeng.layers.feedforward import FeedForward, SwiGLU

    size = mesh.size()
    plan: dict[str, Any] = {}
    attention = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, MultiHeadAttention):
            if module.num_heads % size or module.num_kv_heads % size:
                raise ConfigError(f"train.strategy tp: {module.num_heads} heads do not split over {size} ranks",
                                  "use a number of processes that divides the head count")
            plan.update({f"{prefix}{p}": ColwiseParallel() for p in ("q", "k", "v")})
            plan[f"{prefix}o"] = RowwiseParallel()
            attention.append(module)
        elif isinstance(module, FeedForward | SwiGLU):
            plan.update({f"{prefix}{p}": ColwiseParallel() for p in ("gate", "up") if hasattr(module, p)})
            plan[f"{prefix}down"] = RowwiseParallel()
    if not plan:
        raise ConfigError(f"train.strategy tp: {type(model).__name__} has no attention or feed-forward blocks",
                          "use ddp or fsdp for this model")
    parallelize_module(model, mesh, plan)
    for module in attention:  # each rank now projects to its own share of the heads
        module.num_heads //= size
        module.num_kv_heads //= size
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's repeated-layer lists (transformer blocks, ResNet stages, ...)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def remap_groups(groups: Sequence[dict[str, Any]] | None, names: dict[int, str], model: nn.Module) -> list[dict] | None:
    """Explicit optimizer groups after sharding replaced the parameters: the same groups by parameter name."""
    if groups is None:
        return None
    current = dict(model.named_parameters())
    return [{**group, "params": [current[names[id(p)]] for p in group["params"]]} for group in groups]


# --------------------------------------------------------------------------- state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights on the CPU of rank 0; {} on the others. A collective under FSDP/TP.

    Only rank 0 holds the gathered copy (it saves checkpoints and the Artifact): a full copy
    on every rank would undo what sharding saves at the moments memory peaks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}  # own storage: views of the gather buffer do not save


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights held by rank 0 (`state`; {} elsewhere) into a sharded model: rank 0 broadcasts, each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
    """Write a sharded checkpoint: each rank its shards (torch.distributed.checkpoint), rank 0 `extra`.

    The folder is written as `path.tmp` and then swapped in, so a process killed at any
    moment leaves the previous checkpoint (`path`, or `path.old` between the two renames).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dapeng.train.checkpoint import save_checkpoint

    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    main = world().is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if main:
        save_checkpoint(tmp / EXTRA, extra)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a sharded checkpoint into the model and optimizer on any world size; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from dapeng.train.checkpoint import load_checkpoint

    path = sharded_checkpoint(path)
    if path is None:
        raise CheckpointError("nothing to resume: no sharded checkpoint found", "run without --resume to start")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_checkpoint(path / EXTRA)


def sharded_checkpoint(path: Path) -> Path | None:
    """The complete sharded checkpoint at `path` (or the `.old` one a kill between renames left), or None."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / EXTRA).is_file() and (candidate / ".metadata").is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- processes


def shutdown(code: int) -> NoReturn:
    """Leave the process group and end the process with `code`.

    `os._exit` after flushing: on the CPU, gloo's threads sometimes abort the interpreter's
    normal teardown (about one run in five), which would turn a finished run into a failure.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized() and code == 0:  # after a failure the peers may be gone: leaving could wait on them
        dist.destroy_process_group()
    os._exit(code)


def torchrun_command(args: Sequence[str], *, nproc: int, nnodes: str = "1", node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, max_restarts: int = 0, run_id: str | None = None) -> list[str]:
    """The torchrun command line that runs `python -m dapeng ARGS` on `nproc` processes per node.

    One node: a rendezvous on a free port of 127.0.0.1 (nothing listens beyond this machine).
    Several: the c10d rendezvous at `rdzv_endpoint` (`host:port`, the same on every node), each
    node started with the same arguments.
    """
    if rdzv_endpoint is None and nnodes != "1":
        raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT", "the same on every node")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", f"--nnodes={nnodes}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={rdzv_endpoint or '127.0.0.1:0'}", f"--rdzv-id={run_id or (rdzv_endpoint and 'dapeng') or uuid.uuid4().hex}"]  # the same on every node
    if node_rank is not None:
        command.append(f"--node-rank={node_rank}")
    return [*command, "-m", "dapeng", *args]
