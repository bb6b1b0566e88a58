"""`aurora-rl serve` left running: the real command line, the official openai client under concurrent load,
SIGKILL of a rollout worker and of the learner, SIGTERM, and a restart that resumes the draft.

Tiny random target (``experiment=smoke``: prompts are token ids, text is the ids) and two rollout
workers on a local Ray started by the server itself; every process is found through ``/health``
(``processes``: the actors' ``pid()``) and the server is always stopped (SIGTERM, then SIGKILL of its
process group if it hangs), which also ends its Ray cluster.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0  # Ray + two workers + learner on a loaded two-core machine


class Server:
    """``python -m aurora_rl.cli serve`` in its own process group; ``url`` once it prints it."""

    def __init__(self, tmp: Path, state: Path, name: str) -> None:
        args = [sys.executable, "-m", "aurora_rl.cli", "serve", "experiment=smoke", "serve.port=0",
                f"serve.state_dir={state}", f"hydra.run.dir={tmp / name}", "cluster.rollout_workers=2",
                "cluster.rollout_cpus=0.5", "cluster.learner_cpus=0.5", "learner.checkpoint_every=2",
                "engine.max_len=256", "serve.stall_after_s=600"]
        self.log = open(tmp / f"{name}.log", "w+")
        self.proc = subprocess.Popen(args, cwd=tmp, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.url is None:
            self.kill()
            raise AssertionError(f"server did not start: {self.lines} {self.tail()}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def terminate(self, timeout_s: float = 240.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def wait_for(cond, timeout_s: float, what: str, server: Server):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {server.health()}")


class Load:
    """Client threads sending greedy completions (half streamed) until stopped; every outcome recorded."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            prompt, stream = [3 + (i * 31 + n) % 120, 7, 11], (i + n) % 2 == 0
            try:
                if stream:
                    chunks = list(self.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                                                 temperature=0, stream=True))
                    assert chunks[-1].choices[0].finish_reason == "length"
                else:
                    r = self.client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0)
                    assert r.usage.completion_tokens == 60 or r.choices[0].finish_reason == "stop"
                self.outcomes["answered"] += 1
            except openai.APIStatusError as exc:  # an HTTP error: it must say to retry
                kind = "retry_503" if exc.status_code == 503 and "retry" in str(exc) else "other"
                self.outcomes[kind] += 1
                if kind == "other":
                    self.failures.append(f"{exc.status_code}: {exc}")
            except openai.APIError as exc:  # an error event inside a stream
                kind = "retry_stream" if "retry the request" in str(exc) else "other"
                self.outcomes[kind] += 1
                if kind == "other":
                    self.failures.append(f"stream: {exc}")
            except Exception as exc:  # noqa: BLE001 - a vanished request (connection refused, ...) fails the test
                self.outcomes["other"] += 1
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> Counter:
        self._stop.set()
        for t in self.threads:
            t.join(180)
        return self.outcomes


def _kill_and_recover(server: Server, load: Load, which: str) -> None:
    before = server.health()
    version = before["policy_version"]
    pid = before["processes"]["workers"][0] if which == "worker" else before["processes"]["learner"]
    assert pid, before
    # Kill while the victim has work: worker 0 with requests of its own in flight.
    busy = (lambda: server.health()["workers"][0]["in_flight"] > 0) if which == "worker" else \
        (lambda: server.health()["in_flight"] > 0)
    wait_for(busy, 60, f"requests in flight before killing the {which}", server)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    # The port answers again (here: a request is answered) within 30 s.
    answered = load.outcomes["answered"]
    wait_for(lambda: load.outcomes["answered"] > answered, 30, f"an answer after killing the {which}", server)
    assert time.monotonic() - t0 < 30
    if which == "worker":
        wait_for(lambda: all(server.health()["processes"]["workers"]) and
                 server.health()["processes"]["workers"][0] != pid and all(
                     w["alive"] for w in server.health()["workers"]), 120, "the restarted worker in rotation", server)
    else:
        wait_for(lambda: server.health()["learner"]["restarts"] >= 1, 120, "the learner restart", server)
    wait_for(lambda: server.health()["policy_version"] > version, 180, f"a newer draft after killing the {which}",
             server)


def _non_loopback_listeners(pid: int) -> list[str]:
    """Listening TCP sockets of the server's process tree (the HTTP front, Ray's GCS, raylet, workers)
    bound to anything but loopback."""
    import psutil

    tree = {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in tree]
    assert len(listening) >= 3, listening  # the front, and Ray's servers
    return [f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})" for c in listening
            if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]


@pytest.mark.smoke
def test_serve_survives_sigkill_of_worker_and_learner_and_resumes_after_sigterm(tmp_path):
    state = tmp_path / "state"
    server = Server(tmp_path, state, "first")
    try:
        assert not _non_loopback_listeners(server.proc.pid)
        load = Load(server.url)
        wait_for(lambda: server.health()["policy_version"] >= 1, 180, "the first learned draft", server)
        _kill_and_recover(server, load, "worker")
        _kill_and_recover(server, load, "learner")
        outcomes = load.stop()
        health = server.health()
        routing = health["routing"]
        assert not load.failures, (load.failures[:5], outcomes)
        assert outcomes["answered"] > 0 and outcomes["other"] == 0, outcomes
        assert routing["worker_failures"] >= 1 and routing["worker_returns"] >= 1, routing
        # Requests in flight at the kill were retried (none had sent a token) or cut with a retryable error.
        assert routing.get("retried", 0) + routing.get("cut_streams", 0) >= 1, routing
        assert routing.get("cut_streams", 0) <= outcomes["retry_stream"] + outcomes["retry_503"], (routing, outcomes)
        assert all(w["routed"] > 0 for w in health["workers"]), health["workers"]  # both workers served
        # The status returns to ok once the restarted learner answers (not necessarily the same second).
        wait_for(lambda: server.health()["status"] == "ok", 60, "status ok after both restarts", server)
        served_version = server.health()["policy_version"]
        assert server.terminate() == 0, server.tail()
    finally:
        server.kill()
    saved = [line for line in server.lines if line.startswith("saved policy version")]
    assert saved, server.lines
    final = int(saved[-1].split()[3])
    assert final >= served_version
    assert (state / "checkpoints" / "latest").is_file() and (state / "draft" / "model.safetensors").is_file()

    again = Server(tmp_path, state, "second")
    try:
        assert any(f"(policy version {final})" in line for line in again.lines), again.lines
        assert again.health()["policy_version"] == final  # the version continues, no random day-0 draft
        load = Load(again.url, clients=2)
        wait_for(lambda: again.health()["policy_version"] > final, 180, "learning after the restart", again)
        outcomes = load.stop()
        assert not load.failures and outcomes["answered"] > 0, (load.failures[:5], outcomes)
        assert again.terminate() == 0, again.tail()
    finally:
        again.kill()
