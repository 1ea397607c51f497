"""Two CPU processes under ``accelerate launch``: sharded feature extraction, logits, pipeline sampling and a whole
sweep gather to exactly what one process computes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evals_dist_worker import compute, sweep_spec

from vqsuite.evals.distributed import get_accelerator, shard, sharded_map
from vqsuite.evals.sweep import read_results, run_sweep

pytest.importorskip("accelerate")
WORKER = Path(__file__).resolve().parent / "evals_dist_worker.py"
#: metrics of a sweep whose shards cut batches differently from one process (float32 round-off of batched kernels)
SWEEP_METRIC_RTOL = 1e-5


def test_single_process_helpers() -> None:
    assert get_accelerator() is None  # not launched: everything stays in this process
    assert shard([1, 2, 3]) == [1, 2, 3]
    out = sharded_map(lambda idx: torch.tensor(idx).view(-1, 1) * 2, 5, batch_size=2, progress=False)
    assert out.view(-1).tolist() == [0, 2, 4, 6, 8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_gather_equals_single_process(tmp_path) -> None:
    pytest.importorskip("tiny_pipelines")
    from safetensors.torch import load_file

    out = tmp_path / "dist.safetensors"
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA the worker's Accelerator(cpu=True) joins a
    # gloo process group (accelerate's --cpu flag alone starts one process, multi-CPU needs mpirun)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(_free_port()), str(WORKER), str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(str(out) + ".ranks").read_text() == "2"
    dist = load_file(str(out))
    single = compute(None)
    for key in ("features", "logits", "samples"):
        assert torch.equal(dist[key], single[key]), key
    dist_rows = read_results(Path(str(out) + ".sweep") / "results.jsonl")
    single_rows = run_sweep(sweep_spec(), tmp_path / "single", accelerator=None, progress=False, stop_on_error=True)
    assert [r["hash"] for r in dist_rows] == [r["hash"] for r in single_rows]
    assert len(dist_rows) == 4  # written once, by the main process
    for d, s in zip(dist_rows, single_rows):
        assert d["metrics"].keys() == s["metrics"].keys()
        for k, v in s["metrics"].items():
            want = pytest.approx(v, rel=SWEEP_METRIC_RTOL, abs=1e-9) if isinstance(v, float) else v
            assert d["metrics"][k] == want, (d["model"], d["config_name"], k)
