"""A local Flower deployment: a SuperLink and N SuperNodes on 127.0.0.1, real processes.

    python -m rblora.flower.local --nodes 3 -- --config configs/embedded.yaml --num_clients 3 ...

starts ``flower-superlink`` and one ``flower-supernode`` per client (node config
``partition-id=k lora-rank=r data-path=...``, ranks from the train options), submits the run
with ``flwr run`` (the Flower App in ``src/rblora/flower/app``, the train options in its run
config ``train-args``), waits for it to finish and stops every process it started, by process
group, also when something fails. Ports are free ones picked at start; each process gets its
own ``FLWR_HOME`` under the work folder, where its log is written too. Telemetry, update checks
and Flower's runtime dependency installation are switched off.

This is the demonstration of a deployment; on real machines run the same commands by hand (see
docs/flower.md), with TLS and node authentication.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
CONNECTION = "rblora-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _descendants(pid: int) -> list[int]:
    """Processes whose parent chain leads to ``pid`` (from /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 (see the module doc). Use as a context manager."""

    def __init__(self, workdir: Path, node_configs: list[dict], *, startup_timeout: float = 60):
        self.workdir = Path(workdir)
        self.node_configs = node_configs
        self.startup_timeout = startup_timeout
        self.processes: dict[str, subprocess.Popen] = {}
        self.link_port = 0

    # ------------------------------------------------------------------ processes
    def _env(self, name: str) -> dict[str, str]:
        home = self.workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)  # flower-superexec is started by name
        env.update(
            PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        )
        return env

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (kept open by the child)
        process = subprocess.Popen(
            argv, env=self._env(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def start(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        bin_dir = Path(sys.executable).parent
        link = self._spawn(
            "superlink",
            [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
             "--port", str(self.link_port), "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        _wait_for_port(self.link_port, link, "the SuperLink", self.startup_timeout)
        for i, config in enumerate(self.node_configs):
            port = free_port()
            node = self._spawn(
                f"supernode{i}",
                [str(bin_dir / "flower-supernode"), "--insecure",
                 "--superlink", f"127.0.0.1:{self.link_port}", "--port", str(port),
                 "--node-config", node_config_text(config)],
            )  # fmt: skip
            _wait_for_port(port, node, f"SuperNode {i}", self.startup_timeout)
        home = self.workdir / "home-cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        return self

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``index`` and what it started (its process group)."""
        os.killpg(self.processes[f"supernode{index}"].pid, sig)

    def stop(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL after 10 s), and the
        ServerApp processes the SuperLink started in their own sessions."""
        orphans = [
            pid for p in self.processes.values() if p.poll() is None for pid in _descendants(p.pid)
        ]
        for p in self.processes.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.processes.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ runs
    def _flwr(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        flwr = str(Path(sys.executable).parent / "flwr")
        return subprocess.run(
            [flwr, *argv], env=self._env("cli"), capture_output=True, text=True, timeout=timeout
        )

    def submit(self, train_args: list[str], app_dir: Path = APP_DIR) -> int:
        """``flwr run`` of a Flower App (rblora's unless ``app_dir`` names another) with
        ``train_args``; returns the run id."""
        text = shlex.join(train_args).replace("\\", "\\\\").replace('"', '\\"')
        done = self._flwr(
            "run", str(app_dir), CONNECTION, "--run-config", f'train-args="{text}"',
            "--format", "json",
        )  # fmt: skip
        try:
            return int(json.loads(done.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr run failed:\n{done.stdout}\n{done.stderr}") from None

    def status(self, run_id: int) -> dict:
        done = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(done.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"flwr ls failed:\n{done.stdout}\n{done.stderr}") from None

    def wait(self, run_id: int, timeout: float) -> dict:
        """Poll until the run has finished; returns its ``flwr ls`` entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.status(run_id)
            if str(entry.get("status", "")).startswith("finished"):
                return entry
            time.sleep(2)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")

    def server_log(self, run_id: int) -> str:
        done = self._flwr("log", str(run_id), CONNECTION, "--show")
        return done.stdout + done.stderr


def node_config_text(config: dict) -> str:
    """``--node-config`` text: ``key=value`` pairs, strings quoted."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in config.items())


def node_configs(args, data_path: str | None = None) -> list[dict]:
    """One node config per client of ``args``: its partition, rank and data folder."""
    path = str(Path(data_path or args.data_path).resolve())
    return [
        {"partition-id": k, "lora-rank": r, "data-path": path} for k, r in enumerate(args.ranks())
    ]


def main(argv: list[str] | None = None) -> int:
    from rblora.utils.options import OptionParser, is_number

    parser = OptionParser(
        prog="python -m rblora.flower.local",
        description="Run train.py's options on a local Flower deployment (SuperLink + one "
        "SuperNode per client on 127.0.0.1), then stop it. Options after -- go to train.py.",
    )
    parser.add_argument("--workdir", help="logs and FLWR_HOMEs (default: a temporary folder)")
    parser.add_argument("--timeout", default="3600", help="seconds to wait for the run")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    from rblora.federation.options import parse_args

    try:
        ns = parser.parse_args(argv)
        if not is_number(ns.timeout) or not float(ns.timeout) > 0:
            raise ValueError(f"--timeout {ns.timeout!r}: give seconds > 0, e.g. 3600")
        train_args = [a for a in ns.train_args if a != "--"]
        args, _ = parse_args(train_args)
    except ValueError as err:
        print(f"rblora.flower.local: error: {err}", file=sys.stderr)
        return 2
    for key in ("data_path", "output_dir"):  # the ServerApp runs elsewhere: absolute paths
        train_args += [f"--{key}", str(Path(getattr(args, key)).resolve())]
    workdir = Path(ns.workdir or tempfile.mkdtemp(prefix="rblora-flower-"))
    print(f"local deployment: {args.num_clients} SuperNodes, logs in {workdir}", file=sys.stderr)
    with LocalDeployment(workdir, node_configs(args)) as deployment:
        run_id = deployment.submit(train_args)
        print(f"run {run_id} submitted; waiting", file=sys.stderr)
        entry = deployment.wait(run_id, float(ns.timeout))
        print(deployment.server_log(run_id))
    print(f"run {run_id}: {entry['status']} ({entry.get('status-details')})", file=sys.stderr)
    return 0 if entry["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
