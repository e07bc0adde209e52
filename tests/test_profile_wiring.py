"""Profiler trace capture wired into the tools: Engine.start_profile / stop_profile on the
embedded model (the trace has annotated steps the report finds), the server's /start_profile
and /stop_profile over a fake engine (in-process, no real server), and the CLI flags."""

from __future__ import annotations

import threading
import time

import pytest

from atom_jax.engine import Engine, EngineConfig, SamplingParams

SMALL = dict(num_slots=2, num_pages=16, page_tokens=32, max_pages_per_seq=8, max_tokens_per_step=32,
             buckets=(16, 32))


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(**SMALL))


def test_engine_traces_the_given_number_of_steps(engine, tmp_path):
    from atom_jax.trace.report import report

    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.generate([[1, 2, 3, 4, 5]], params)  # compile outside the trace (slow under it)
    engine.start_profile(str(tmp_path), steps=2)
    with pytest.raises(ValueError, match="already running"):
        engine.start_profile(str(tmp_path / "other"))
    engine.generate([[1, 2, 3, 4, 5]], params)
    assert engine.stop_profile() is None  # stopped by itself after 2 model steps
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    rep = report(tmp_path)
    assert [s["num"] for s in rep["annotated_steps"]] == [0, 1]
    from atom_jax.trace.events import find_trace_file, read_xplane

    raw, _ = read_xplane(find_trace_file(tmp_path).read_bytes())
    assert raw and not [r for r in raw if r.name.startswith("$")]  # no Python tracer events


def test_steps_that_compile_do_not_count_as_traced_steps(engine, tmp_path):
    from atom_jax.trace.report import report

    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))  # bucket 16
    engine.start_profile(str(tmp_path), steps=1)
    # a 20-token prompt: its prefill is the first bucket-32 step (compiles), then decode steps
    engine.generate([list(range(1, 21))], SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.stop_profile() is None  # stopped after one step that did not compile
    rep = report(tmp_path)
    assert [s["num"] for s in rep["annotated_steps"]] == [0, 1]
    assert rep["compiled_steps"] == [0]


def test_stop_without_a_trace_returns_none_and_a_manual_stop_returns_the_dir(engine, tmp_path):
    assert engine.stop_profile() is None
    engine.start_profile(str(tmp_path))
    assert engine.stop_profile() == str(tmp_path)
    assert engine.stop_profile() is None


# ---- server endpoints over a fake engine ---------------------------------------------------
def _fake_engine():
    from test_serve_units import FakeEngine

    class ProfilingFake(FakeEngine):
        def __init__(self):
            super().__init__()
            self.profile, self.profile_threads = None, set()

        def start_profile(self, log_dir, steps=None):
            self.profile_threads.add(threading.get_ident())
            if self.profile is not None:
                from atom_jax.engine.profiling import ProfilerBusy

                raise ProfilerBusy("a profiler trace is already running")
            self.profile = (log_dir, steps)

        def stop_profile(self):
            self.profile_threads.add(threading.get_ident())
            log_dir, self.profile = (self.profile or (None,))[0], None
            return log_dir

    return ProfilingFake()


def _client(fake, **settings):
    from fastapi.testclient import TestClient

    from atom_jax.serve.app import ServerSettings, create_app

    app = create_app(ServerSettings(**settings), lambda: fake)
    return TestClient(app, base_url="http://localhost"), app.state.engine_loop


def _wait_ready(loop):
    deadline = time.monotonic() + 10
    while not loop.ready.is_set():
        assert time.monotonic() < deadline and not loop.failure
        time.sleep(0.01)


def test_profile_endpoints(tmp_path):
    fake = _fake_engine()
    root = tmp_path / "traces"
    client, loop = _client(fake, enable_profiling=True, profile_dir=str(root))
    with client:
        _wait_ready(loop)
        r = client.post("/stop_profile")
        assert r.status_code == 400 and r.json()["error"]["code"] == "profile_not_running"
        r = client.post("/start_profile", json={"dir": "a", "steps": 3})
        assert r.status_code == 200 and r.json() == {"dir": str(root / "a"), "steps": 3}
        assert fake.profile == (str(root / "a"), 3)
        r = client.post("/start_profile")
        assert r.status_code == 400 and r.json()["error"]["code"] == "profile_running"
        r = client.post("/stop_profile")
        assert r.status_code == 200 and r.json() == {"dir": str(root / "a")}
        r = client.post("/start_profile")  # no body: the --profile-dir itself
        assert r.json()["dir"] == str(root) and fake.profile[1] is None
        assert client.post("/stop_profile").status_code == 200
        # a request names only a sub-directory of --profile-dir, never a path of its own
        for bad in (str(tmp_path / "elsewhere"), "../up", "a/b", "..", ".hidden", ""):
            r = client.post("/start_profile", json={"dir": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "dir", (bad, r.text)
        assert client.post("/start_profile", json={"steps": 0}).status_code == 400
        # JSON only with a JSON Content-Type
        r = client.post("/start_profile", content=b'{"steps": 2}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        assert fake.profile is None
    assert fake.profile_threads and threading.get_ident() not in fake.profile_threads
    assert len(fake.profile_threads | fake.thread_ids) == 1  # all on the engine thread


def test_profiling_is_off_unless_enabled(tmp_path):
    client, loop = _client(_fake_engine(), profile_dir=str(tmp_path))
    with client:
        _wait_ready(loop)
        for path in ("/start_profile", "/stop_profile"):
            assert client.post(path, json={}).status_code == 404
        assert "/start_profile" not in client.get("/openapi.json").json()["paths"]


def test_profile_endpoints_need_the_api_key_and_startup_profile(tmp_path):
    fake = _fake_engine()
    client, loop = _client(fake, api_key="k", enable_profiling=True, profile_dir=str(tmp_path),
                           profile_steps=4)
    with client:
        _wait_ready(loop)
        assert fake.profile == (str(tmp_path), 4)  # --profile-dir DIR --profile-steps 4
        assert client.post("/stop_profile").status_code == 401
        assert client.post("/start_profile").status_code == 401
        r = client.post("/stop_profile", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json() == {"dir": str(tmp_path)}


def test_a_trace_that_cannot_be_written_fails_no_step_and_the_profiler_recovers(tmp_path):
    """The engine's profiler: a dir that cannot hold a trace is refused at start; a trace whose
    writing fails at the end of its last step is logged, the step's requests finish, and a
    new trace can start."""
    from atom_jax.engine.profiling import ProfilerBusy, StepProfiler

    prof = StepProfiler()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot use"):
        prof.start(str(tmp_path / "file"))
    assert not prof.active
    prof.start(str(tmp_path / "ok"), steps=1)
    with pytest.raises(ProfilerBusy):
        prof.start(str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()  # a refused start leaves no directory
    import jax

    from jax._src import profiler as jax_profiler

    real_stop = jax.profiler.stop_trace

    def failing_stop():  # as when exporting fails: the session stopped, jax's state left set
        jax_profiler._profile_state.profile_session.stop()
        raise OSError("disk full")

    jax.profiler.stop_trace = failing_stop
    try:
        with prof.step():  # the last traced step: the failing write must not escape it
            pass
    finally:
        jax.profiler.stop_trace = real_stop
    assert not prof.active
    prof.start(str(tmp_path / "again"))
    assert prof.stop() == str(tmp_path / "again")


# ---- CLI flags -----------------------------------------------------------------------------
def test_generate_and_serve_profile_flags():
    from atom_jax.generate.cli import build_parser as generate_parser
    from atom_jax.serve.cli import build_parser as serve_parser

    args = generate_parser().parse_args(["--input", "i", "--output", "o", "--profile", "/tmp/t"])
    assert (args.profile, args.profile_steps) == ("/tmp/t", 5)
    args = generate_parser().parse_args(["--input", "i", "--output", "o", "--profile-steps", "2"])
    assert (args.profile, args.profile_steps) == (None, 2)
    args = serve_parser().parse_args(["--profile", "/tmp/t", "--profile-steps", "3"])
    assert (args.profile, args.profile_steps) == ("/tmp/t", 3)
    args = serve_parser().parse_args(["--profile-dir", "/tmp/u", "--enable-profiling"])
    assert (args.profile, args.enable_profiling) == ("/tmp/u", True)
    args = serve_parser().parse_args([])
    assert args.profile is None and not args.enable_profiling
