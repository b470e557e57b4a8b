"""Shared fixtures: one small local Ray instance per test session, and a tiny model folder.

Tiers: `make check` runs ``-m "not slow"`` (pure maths, formats and in-process jobs, for the inner
loop); `make test` runs everything. A test is slow when it needs Ray (either Ray fixture) or is
marked ``@pytest.mark.slow`` (the end-to-end pipeline runs).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


RAY_FIXTURES = {"ray_session", "ray_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 2 CPUs shared by every test that needs actors."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained (random-weight) class-conditional 8x8 model folder: enough for shape, I/O and
    determinism tests without spending minutes on training."""
    from diffusers import DDPMScheduler

    from tailforge.gen.models.diffusion import ModelMeta, save_diffusion_model
    from tailforge.gen.models.unet import build_unet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    unet = build_unet("tiny", image_size=8, channels=1, num_classes=10)
    save_diffusion_model(folder, unet, DDPMScheduler(num_train_timesteps=1000),
                         ModelMeta(image_size=8, channels=1, num_classes=10, class_names=tuple("0123456789"),
                                   dataset="digits"))
    return folder


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are picked, so the kernel
    cannot hand the same port out twice (Ray refuses to start when two components share one)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head started the cluster way, `ray start --head`, on free non-default ports (other Ray
    instances run on this machine at the same time), with the dashboard and job server on 127.0.0.1
    and token authentication on. It runs in its own session and is stopped by signalling exactly
    the processes of that session (`ray stop` would stop every Ray instance of this user)."""
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path
    from types import SimpleNamespace

    import psutil

    bin_dir = Path(sys.executable).parent
    names = ("port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")
    ports = dict(zip(names, _free_ports(len(names))))
    temp_dir = tempfile.mkdtemp(prefix="rtf", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
             "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}",
             "--object-store-memory=500000000", *(f"--{name}={port}" for name, port in ports.items())],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def session_processes():
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == head.pid:
                    found.append(proc)
            except (ProcessLookupError, PermissionError):
                pass
        return found

    def stop():
        procs = session_processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
        for proc in session_processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)

    address_file = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + 180
    try:
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up in 180 s: {log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", ports["dashboard-port"]), timeout=1).close()
                if address_file.is_file() and address_file.read_text().strip():
                    break
            except OSError:
                pass
            time.sleep(0.5)
    except BaseException:
        stop()
        raise
    yield SimpleNamespace(address=address_file.read_text().strip(), dashboard=f"http://127.0.0.1:{ports['dashboard-port']}",
                          env=env, session=head.pid, processes=session_processes)
    stop()
