"""l2l on FSDP2-sharded parameters (2 CPU processes, gloo): the block statistics, the
per-block <grad, z> and the in-place shift of the meta-step equal those of the unsharded model,
with row counts that do not divide evenly and z chunks that straddle the shard boundary."""

from __future__ import annotations

import socket

import pytest
import shard_worker
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_blocks_match_unsharded():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=shard_worker.run, args=(rank, 2, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    reports = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert reports == {0: "ok", 1: "ok"}


def test_local_rows_of_a_plain_tensor_is_the_whole_tensor():
    from l2l.shards import local_chunks, local_rows

    t = torch.arange(12.0).reshape(4, 3)
    rows, start = local_rows(t)
    assert start == 0 and rows.data_ptr() == t.data_ptr()
    assert [(c, v.shape[0], idx) for c, v, idx in local_chunks(t)] == [(0, 4, slice(0, 4))]
