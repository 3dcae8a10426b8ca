"""Two CPU processes (gloo) train with DDP on their own data shards and stay identical."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, data_bin: str, save_dir: str, out_dir: str, port: int) -> None:
    # What torchrun would set for each process.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moelab.train import train

    # Different dropout masks per rank would not break anything, but different data does:
    # without the gradient all-reduce the ranks' weights would drift apart at the first update.
    result = train(data_bin, method="hMoElp", num_experts=2, max_update=4, update_freq=2,
                   arch="tiny", decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                   decoder_attention_heads=2, tokens_per_sample=64, max_tokens=512,
                   warmup_updates=2, lr=3e-3, log_interval=2, save_dir=save_dir,
                   device="cpu", progress_bar=False)
    torch.save({"params": result.model.state_dict(), "valid_loss": result.valid.loss,
                "history": result.history is not None},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tiny_bin, tmp_path):
    mp.spawn(_worker, args=(str(tiny_bin), str(tmp_path / "ckpt"), str(tmp_path),
                            _free_port()), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    initial = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    for name, p0 in ranks[0]["params"].items():
        assert torch.equal(p0, ranks[1]["params"][name]), name
        assert torch.equal(p0, initial["model"][name]), name  # rank 0 saved these weights
    assert ranks[0]["valid_loss"] == ranks[1]["valid_loss"]  # validation is all-reduced
    assert ranks[0]["history"] and not ranks[1]["history"]  # only rank 0 writes the log
    assert len(initial["rng"]) == WORLD_SIZE  # every rank's RNG state, for exact resume
    assert initial["data_position"]["world_size"] == WORLD_SIZE
    log = (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3  # two train lines and one valid line, written once
