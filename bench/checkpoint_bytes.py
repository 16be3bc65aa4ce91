"""
Benchmark: what one training checkpoint costs each rank under FSDP2, the way checkpoint.py wrote it before (the
trainable weights and AdamW's state gathered whole onto rank 0's CPU, which wrote them alone) and the way it does
now (torch.distributed.checkpoint: each rank writes its own shards). Run under torchrun (gloo on CPU):

    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/checkpoint_bytes.py
    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/checkpoint_bytes.py --lora-r 64

The model: bench/dpo_step.py's random LLaVA at LLaVA-1.5's proportions (its flags), LoRA on the language model,
sharded per decoder layer as train_ddp.py does, after one AdamW step (so that its state exists). Per rank:
the bytes of the files it writes, and the peak of tensor memory the save allocates above what was live before it
(bench/measure.py's peak_memory: torch's profiler on CPU; tensors only, host = device on a CPU).
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # noqa: E402

import checkpoint  # noqa: E402
import common  # noqa: E402
import dpo_step  # noqa: E402
import fsdp  # noqa: E402
import measure  # noqa: E402


def gathered(model, optimizer, folder, rank):
    """checkpoint.py's save before: both states gathered whole onto rank 0's CPU, rank 0 writes them."""
    weights = get_model_state_dict(model, options=checkpoint.TRAINABLE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=checkpoint.TRAINABLE)
    if rank == 0:
        save_file(weights, os.path.join(folder, "trainable.safetensors"))
        torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    dist.barrier()


def sharded(model, optimizer, folder, rank, world_size):
    """checkpoint.py's save now (everything but the folder's rename and the keep-N)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.save_checkpoint(model, optimizer, scheduler, 1, folder, {}, rank, world_size)


def written_by(folder, rank):
    """The bytes of the files this rank wrote (the manifest and state.json: rank 0's)."""
    names = [n for _, _, files in os.walk(folder) for n in files]
    mine = [n for n in names if n.startswith((f"__{rank}_", f"rng-rank{rank}."))]
    if rank == 0:
        mine += [n for n in names if n in (".metadata", "state.json", "manifest.json", "trainable.safetensors",
                                            "optimizer.pt", "latest")]
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, files in os.walk(folder) for n in files
               if n in mine)


def main():
    args = dpo_step.parse_args()
    rank, world_size, device = common.compute_init(0)
    model = dpo_step.build_model(args, device)
    fsdp.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    trainable = sum(p.numel() for p in params)  # DTensors: the whole tensor's count
    rows = []
    with tempfile.TemporaryDirectory() as shared:  # one folder for all ranks (rank 0 names it)
        names = [shared]
        dist.broadcast_object_list(names, src=0)
        for way, save in (("before: gathered on rank 0", lambda f: gathered(model, optimizer, f, rank)),
                          ("now: each rank its shards (DCP)", lambda f: sharded(model, optimizer, f, rank,
                                                                               world_size))):
            folder = os.path.join(names[0], way.split(":")[0])
            if rank == 0:
                os.makedirs(folder)
            dist.barrier()
            peak = measure.peak_memory(lambda: save(folder), device)
            size = written_by(folder, rank)
            every = [None] * world_size
            dist.all_gather_object(every, (size, peak))
            rows += [f"| {way} | {r} | {s / 2**20:.2f} | {p / 2**20:.2f} |" for r, (s, p) in enumerate(every)]
        dist.barrier()
    common.print0(f"one checkpoint, FSDP2, {world_size} processes, width {args.width} x {args.layers} layers, LoRA r "
                  f"{args.lora_r}: {trainable:,} trainable parameters = {4 * trainable / 2**20:.2f} MiB of fp32 "
                  f"weights + {8 * trainable / 2**20:.2f} MiB of AdamW state\n"
                  "| way | rank | MiB written | peak MiB of tensors allocated |\n|---|---|---|---|\n" + "\n".join(rows))
    common.finish_distributed()


if __name__ == "__main__":
    main()
