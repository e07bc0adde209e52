"""Multi-host data parallelism on CPU: local processes joined through jax.distributed (gloo
collectives on 127.0.0.1), each with its own simulated devices.

- 2 processes x 2 devices and 4 processes x 1 device give the same outputs (greedy and seeded
  sampling) as 1 process with dp=4, through `python -m atom_jax.generate`.
- A follower killed mid-request: the server answers the request with an error and exits 3
  within the bound; a follower frozen (SIGSTOP) while idle: the watchdog stops the server
  after --step-timeout; the leader killed: the follower exits 3; the leader stopped by
  SIGTERM: the follower exits 0.
- Plan encoding round trips (with the overflow broadcast) and flag / env / SLURM resolution.

The model is a 2-layer transformers-saved checkpoint and XLA's CPU optimisation is turned
down: every process compiles its own step (4 at once on a small CI machine), and
`random_model`'s eager init alone costs ~13 s per process."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from atom_jax.distributed import DistributedConfig, resolve
from atom_jax.distributed.init import add_distributed_args
from atom_jax.distributed.plan_channel import NOOP, STEP, STOP, ChannelError, PlanChannel, encode_step
from atom_jax.engine.runner import SamplingRows, StepInputs
from conftest import FAST_CPU_XLA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FLAGS = ["--num-slots", "4", "--num-pages", "64", "--page-tokens", "32", "--max-pages-per-seq", "16",
                "--max-tokens-per-step", "32", "--chunk-size", "16", "--buckets", "32", "--tbo", "off"]
FAST_XLA = FAST_CPU_XLA  # the same flags the suite compiles its own CPU programs with (conftest)
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer (sliding + CSA, hash-routed first layer) random DeepSeek-V4 checkpoint."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from hf_reference import hf_tiny_kwargs

    kw = hf_tiny_kwargs("a")
    kw.update(num_hidden_layers=2, compress_ratios=[0, 4], num_hash_layers=1)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("mh_model")
    DeepseekV4ForCausalLM(DeepseekV4Config(**kw)).eval().save_pretrained(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ATOM_JAX_", "JAX_COORDINATOR", "SLURM_", "JAX_COMPILATION_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} {FAST_XLA}")
    return env


def _spawn(module: str, args: list[str], local_devices: int, log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=_env(local_devices),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _multihost(num: int, i: int, port: int) -> list[str]:
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(num), "--process-id", str(i)]


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


# ---- same outputs as one process -----------------------------------------------------------
REQUESTS = [{"id": f"g{i}", "prompt_token_ids": [(7 * i + 3 * j) % 256 for j in range(5 + 9 * i)],
             "max_tokens": 6, "ignore_eos": True, "temperature": 0} for i in range(7)]
REQUESTS.append({"id": "sampled", "prompt_token_ids": list(range(40, 71)), "max_tokens": 8, "ignore_eos": True,
                 "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7})


def _generate(tmp_path, model_dir, processes: int, local_devices: int, flags=()) -> tuple[dict, list[str]]:
    """Run the batch over `processes` x `local_devices`; -> ({id: token_ids}, each process's log)."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        out, log = tmp_path / f"out{processes}.{i}.jsonl", tmp_path / f"gen{processes}.{i}.log"
        extra = _multihost(processes, i, port) if processes > 1 else ["--dp", str(local_devices)]
        procs.append(_spawn("atom_jax.generate", ["--model", model_dir, "--input", str(src), "--output", str(out),
                                                  "--no-progress", *ENGINE_FLAGS, *flags, *extra], local_devices, log))
        logs.append(log)
    try:
        codes = [p.wait(timeout=RUN_TIMEOUT) for p in procs]
    finally:
        _kill_all(procs)
    texts = [log.read_text() for log in logs]
    assert codes == [0] * processes, "\n----\n".join(t[-3000:] for t in texts)
    for i in range(1, processes):  # only process 0 writes results
        assert not (tmp_path / f"out{processes}.{i}.jsonl").exists()
    records = [json.loads(line) for line in (tmp_path / f"out{processes}.0.jsonl").read_text().splitlines()]
    assert all(r["finish_reason"] == "length" for r in records)
    return {r["id"]: r["token_ids"] for r in records}, texts


@pytest.fixture(scope="module")
def single_process(model_dir, tmp_path_factory):
    # the synchronous loop is the oracle; the multi-host runs use the overlap schedule (default)
    out, _ = _generate(tmp_path_factory.mktemp("mh_ref"), model_dir, 1, 4, ["--overlap-schedule", "off"])
    assert len(out) == len(REQUESTS)
    assert [len(out[r["id"]]) for r in REQUESTS] == [r["max_tokens"] for r in REQUESTS]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("processes,local_devices", [(2, 2), (4, 1)])
def test_processes_match_one_process(model_dir, single_process, tmp_path, processes, local_devices):
    out, logs = _generate(tmp_path, model_dir, processes, local_devices)
    assert out == single_process
    # every follower ran the same number of steps as process 0 planned (dp=4 over all hosts)
    assert "dp=4" in logs[0]
    steps = {re.search(r"after (\d+) steps", log).group(1) for log in logs[1:]}
    assert len(steps) == 1 and int(steps.pop()) > 0, logs[1:]


# ---- failures ------------------------------------------------------------------------------
def _serve(tmp_path, model_dir, extra: list[str]):
    """Process 0 (HTTP) and one follower, one device each. -> (procs, logs, base url)."""
    port, http = _free_port(), _free_port()
    procs, logs = [], []
    for i in range(2):
        log = tmp_path / f"serve.{i}.log"
        args = ["--model", model_dir, "--served-model-name", "m", "--port", str(http), "--no-access-log", "--no-warmup", "--log-level", "warning",
                *ENGINE_FLAGS, *extra, *_multihost(2, i, port)]
        procs.append(_spawn("atom_jax.serve", args, 1, log))
        logs.append(log)
    base = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "\n----\n".join(log.read_text()[-3000:] for log in logs)
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return procs, logs, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    _kill_all(procs)
    raise AssertionError("the server did not become ready")


def _wait_exit(proc, bound: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    try:
        return proc.wait(timeout=bound), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0


@pytest.mark.slow
def test_killed_follower_fails_request_in_flight_and_stops_server(model_dir, tmp_path):
    procs, logs, base = _serve(tmp_path, model_dir, ["--heartbeat-timeout", "60"])
    answer = {}

    def request():
        body = {"model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 400, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        answer.update(status=r.status_code, body=r.json(), at=time.monotonic())

    thread = threading.Thread(target=request)
    try:
        thread.start()
        deadline = time.monotonic() + RUN_TIMEOUT
        while httpx.get(f"{base}/debug/engine", timeout=5).json()["stats"]["steps"] < 3:  # decoding
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGKILL)
        t_kill = time.monotonic()
        thread.join(60)
        code, waited = _wait_exit(procs[0], 60)
    finally:
        _kill_all(procs)
    log = logs[0].read_text()
    assert answer["status"] == 503 and answer["body"]["error"]["code"] == "cluster_failure", answer
    assert "multi-host run failed" in answer["body"]["error"]["message"]
    assert answer["at"] - t_kill < 60
    assert code == 3, log[-3000:]
    assert "process 0 of 2 stops" in log and "Another process died or hung" in log


@pytest.mark.slow
def test_frozen_follower_trips_the_watchdog(model_dir, tmp_path):
    procs, logs, base = _serve(tmp_path, model_dir, ["--step-timeout", "3", "--keepalive", "0.5",
                                                     "--heartbeat-timeout", "120"])
    try:
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive but silent: collectives wait, nothing errors
        code, waited = _wait_exit(procs[0], 45)
    finally:
        _kill_all(procs)
    log = logs[0].read_text()
    assert code == 3, log[-3000:]
    assert waited < 20  # keepalive 0.5 s + step timeout 3 s, well before jax's 120 s heartbeat
    assert "did not finish within 3 s" in log


@pytest.mark.slow
def test_sigterm_on_process_0_releases_the_followers(model_dir, tmp_path):
    procs, logs, base = _serve(tmp_path, model_dir, [])
    try:
        time.sleep(1.5)  # a few idle keepalives
        os.kill(procs[0].pid, signal.SIGTERM)
        follower, waited = _wait_exit(procs[1], 60)
        leader, _ = _wait_exit(procs[0], 30)
    finally:
        _kill_all(procs)
    # uvicorn re-raises the signal after its graceful shutdown, as with one process
    assert leader == -signal.SIGTERM, logs[0].read_text()[-3000:]
    assert follower == 0, logs[1].read_text()[-3000:]


@pytest.mark.slow
def test_follower_stops_when_process_0_dies(model_dir, tmp_path):
    procs, logs, _ = _serve(tmp_path, model_dir, ["--heartbeat-timeout", "60"])
    try:
        os.kill(procs[0].pid, signal.SIGKILL)
        code, waited = _wait_exit(procs[1], 60)
    finally:
        _kill_all(procs)
    log = logs[1].read_text()
    assert code == 3, log[-3000:]
    assert "process 1 of 2 stops" in log and "waiting for plan" in log


# ---- plan channel --------------------------------------------------------------------------
class _Wire:
    """broadcast_one_to_all between one sender and one receiver, in order, in one process."""

    def __init__(self):
        self.sent = []

    def source(self, x):
        self.sent.append(np.array(x))
        return x

    def sink(self, x):
        got = self.sent.pop(0)
        assert got.shape == x.shape and got.dtype == x.dtype  # every process uses the same shape
        return got


def _inputs(rng, dp, tokens_per_chunk) -> StepInputs:
    chunks = [[(s, int(rng.integers(0, 500)), rng.integers(0, 256, tokens_per_chunk).astype(np.int32), bool(s % 2),
                rng.integers(-1, 9, tokens_per_chunk).astype(np.int32) if s else None)  # window-state entries
               for s in range(r + 1)] for r in range(dp)]
    n = sum(c[3] for rank in chunks for c in rank)
    sampling = SamplingRows(rows=np.arange(n, dtype=np.int32), temperature=rng.random(n).astype(np.float32),
                            top_k=rng.integers(0, 50, n).astype(np.int32), top_p=rng.random(n).astype(np.float32),
                            seed=rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
                            counter=rng.integers(0, 9, n).astype(np.uint32))
    rows = [(1, 0, np.array([3, 9, 4], np.int32)), (0, 1, np.array([7], np.int32))]
    restores = [(2, 1, 64, (-1, 5)), (0, 0, 128, (3, 4))]
    return StepInputs(32, True, chunks, rows, sampling, restores)


def _same(a: StepInputs, b: StepInputs):
    assert (a.bucket, a.tbo) == (b.bucket, b.tbo)
    for ra, rb in zip(a.chunks, b.chunks, strict=True):
        for ca, cb in zip(ra, rb, strict=True):
            assert ca[:2] == cb[:2] and ca[3] == cb[3] and np.array_equal(ca[2], cb[2])
            assert (ca[4] is None) == (cb[4] is None) and (ca[4] is None or np.array_equal(ca[4], cb[4]))
    for pa, pb in zip(a.page_rows, b.page_rows, strict=True):
        assert pa[:2] == pb[:2] and np.array_equal(pa[2], pb[2])
    assert a.restores == b.restores
    for f in ("rows", "temperature", "top_k", "top_p", "seed", "counter"):
        x, y = getattr(a.sampling, f), getattr(b.sampling, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f  # bit-exact floats


@pytest.mark.parametrize("tokens_per_chunk", [3, 400])  # 400: past the inline part, a 2nd broadcast
def test_plan_channel_round_trip(tokens_per_chunk):
    rng = np.random.default_rng(tokens_per_chunk)
    wire = _Wire()
    tx = PlanChannel(dp=3, capacity=1024, is_source=True, broadcast=wire.source)
    rx = PlanChannel(dp=3, capacity=1024, is_source=False, broadcast=wire.sink)
    steps = [_inputs(rng, 3, tokens_per_chunk) for _ in range(2)]
    assert (len(encode_step(steps[0])[0]) > 1024) == (tokens_per_chunk > 100)
    tx.send(STEP, steps[0])
    tx.send(NOOP)
    tx.send(STEP, steps[1])
    tx.send(STOP)
    kind, got = rx.recv()
    assert kind == STEP
    _same(got, steps[0])
    assert rx.recv() == (NOOP, None)
    kind, got = rx.recv()
    _same(got, steps[1])
    assert rx.recv() == (STOP, None)
    assert not wire.sent


def test_plan_channel_refuses_out_of_step_messages():
    wire = _Wire()
    tx = PlanChannel(dp=2, capacity=1024, is_source=True, broadcast=wire.source)
    tx.send(NOOP)
    tx.send(NOOP)
    wire.sent.pop(0)  # this receiver missed message 0
    with pytest.raises(ChannelError, match="expected message 0, got 1"):
        PlanChannel(dp=2, capacity=1024, is_source=False, broadcast=wire.sink).recv()
    tx.send(NOOP)
    other = PlanChannel(dp=4, capacity=1024, is_source=False, broadcast=wire.sink)
    other.seq = 2
    with pytest.raises(ChannelError, match="dp=2, this process dp=4"):
        other.recv()


# ---- flags, environment, SLURM -------------------------------------------------------------
def _args(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_distributed_args(p)
    return p.parse_args(list(argv))


def test_resolve_flags_env_and_slurm():
    assert resolve(_args(), environ={}) is None  # single host
    assert resolve(_args("--num-processes", "1"), environ={}) is None
    cfg = resolve(_args("--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "2",
                        "--step-timeout", "7", "--local-device-ids", "0,1"), environ={})
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.step_timeout,
            cfg.local_device_ids) == ("10.0.0.1:1234", 4, 2, 7.0, (0, 1))
    env = {"ATOM_JAX_COORDINATOR": "h:9", "ATOM_JAX_NUM_PROCESSES": "2", "ATOM_JAX_PROCESS_ID": "1"}
    cfg = resolve(_args(), environ=env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("h:9", 2, 1)
    assert resolve(_args("--process-id", "0"), environ=env).process_id == 0  # a flag beats the env
    # inside srun: jax detects address, count and id itself
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "3"}
    cfg = resolve(_args(), environ=slurm)
    assert isinstance(cfg, DistributedConfig) and cfg.num_processes is None and cfg.coordinator_address is None
    assert resolve(_args(), environ={**slurm, "SLURM_NTASKS": "1"}) is None  # one task: single host
    with pytest.raises(ValueError, match="--coordinator-address, --process-id"):
        resolve(_args("--num-processes", "2"), environ={})
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        resolve(_args("--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"), environ={})
    with pytest.raises(ValueError, match="ATOM_JAX_NUM_PROCESSES must be an integer"):
        resolve(_args(), environ={"ATOM_JAX_NUM_PROCESSES": "two"})
