"""Multi-node torchrun, simulated on one machine: two launchers (`--nnodes 2 --nproc-per-node 1`) meet through a
c10d rendezvous on 127.0.0.1, exactly as two hosts meet through the first host's address."""
from __future__ import annotations

import json
import socket
import sys
import uuid
from pathlib import Path

import pytest
from conftest import assert_same_metrics, child_env, run_launchers, train_args

from moeclip.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args, cwd: Path, timeout: int = 300) -> list:
    """Start both "nodes" (launchers) at once and wait for both; each launcher runs one worker process.
    Logs and temporary files stay in ``cwd``; every process (launchers and workers) is ended on return."""
    env = child_env(cwd)
    endpoint, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    cmds = []
    for node in range(2):
        cmds.append([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                     # which launcher hosts the rendezvous store: decided up front, as node 0 would on a cluster
                     "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
                     "--log-dir", str(cwd / f"elastic-{run_id}-{node}"), "-m", "moeclip", *args])
    results = run_launchers(cmds, cwd, env, timeout)
    for code, out in results:
        assert code == 0, out[-4000:]
    return [out for _, out in results]


@pytest.mark.slow
def test_two_node_rendezvous_trains_identical_ranks_and_tests_like_one_process(synth, tiny_clip_config, tmp_path):
    run = tmp_path / "run"
    logs = two_nodes(train_args(synth, tiny_clip_config, run, "--epochs", "1", "--max-steps", "3", "--seed", "3",
                                batch_size=2), tmp_path)
    assert any("2 process(es)" in out for out in logs)  # one worker per launcher, one world
    meta = json.loads((run / "checkpoint" / "config.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["step"] == 3
    digests = meta["weight_digests"]  # each rank hashed its own adapters; rank 0 gathered them
    assert len(digests) == 2 and digests[0] == digests[1]
    from safetensors.torch import load_file

    adapters = load_file(str(run / "checkpoint" / "adapters.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # the steps moved the experts

    # the zero-shot test over the same two "nodes" reports the numbers of a single process
    args = ["test", "--checkpoint", str(run / "checkpoint"), "--data", f"folder={synth / 'held'}", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two_nodes([*args, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["datasets"][0]["per_class"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["datasets"][0]["per_class"]
    assert one.keys() == two.keys() == {"wood"}
    for cls, m in one.items():
        assert_same_metrics(m, two[cls])
