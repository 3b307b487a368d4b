"""Real services for tests: a throwaway PostgreSQL server and a moto S3 server, both on 127.0.0.1.

Nothing here is a mock. ``postgres_server`` runs Debian's PostgreSQL (``bash scripts/install_postgres.sh``) as its own
cluster (fresh data folder, free port, Unix socket in the same temporary folder); ``s3_server`` runs
``moto.server`` (from ``moto[server]`` in the dev extras) as a subprocess. Both are session-scoped, so under
pytest-xdist each worker gets its own servers (own ports, own folders) and nothing is shared between workers. Both are
stopped at teardown.

When a binary is missing the fixtures skip with the reason and the fix, except under CI (``CI=true``), where they fail:
CI never skips.

API::

    postgres_server.host / .port / .user          "127.0.0.1", int, "postgres"
    postgres_server.conninfo(dbname="postgres")   "dbname=... host=127.0.0.1 port=... user=postgres"
    postgres_server.create_database(name)         CREATE DATABASE name; returns conninfo(name)
    postgres_server.psql(sql, dbname="postgres")  run SQL with psql, returns its stdout

    s3_server.endpoint_url                        "http://127.0.0.1:PORT"
    s3_server.host_port                           "127.0.0.1:PORT" (DuckDB's s3 secret ENDPOINT)
    s3_server.env                                 AWS_* variables pointing at it (credentials "testing")
    s3_server.client()                            a boto3 S3 client for it
    s3_server.create_bucket(name)                 creates the bucket; returns name

    postgres_db  (function-scoped)                conninfo of a fresh database with a unique name
    s3_bucket    (function-scoped)                name of a fresh bucket with a unique name
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3
INSTALL_HINT = "install it with `bash scripts/install_postgres.sh` (Debian's `postgresql` package)"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _unavailable(reason: str) -> None:
    """Skip (a user's machine) or fail (CI never skips) because a service cannot be provided."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: CI never skips service tests)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, limit: int = 4000, start: int = 0) -> str:
    """The last ``limit`` characters of a log file, from byte ``start`` on (for error messages)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return text[-limit:] if text else "<empty log>"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------------------------


def find_postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding initdb, pg_ctl and createdb (or $OPENSORA_PG_BIN)."""
    override = os.environ.get("OPENSORA_PG_BIN")
    candidates = [override] if override else glob.glob("/usr/lib/postgresql/*/bin")

    def version(p: str) -> float:
        try:
            return float(Path(p).parent.name)
        except ValueError:
            return 0.0

    for folder in sorted(candidates, key=version, reverse=True):
        tools = ("initdb", "pg_ctl", "postgres", "createdb", "psql")
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in tools):
            return Path(folder)
    return None


@dataclass
class PostgresServer:
    bindir: Path
    base: Path  # temporary folder: data/, sock/, postgres.log
    port: int = 0
    host: str = "127.0.0.1"
    user: str = "postgres"
    _as_postgres: list[str] = field(default_factory=list)
    _running: bool = False

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"dbname={dbname} host={self.host} port={self.port} user={self.user}"

    def _server_cmd(self, *args: str, timeout: float = START_TIMEOUT_S + 30) -> subprocess.CompletedProcess:
        """Run a server-side tool (initdb, pg_ctl) as the cluster's owner."""
        return subprocess.run([*self._as_postgres, *args], cwd=self.base, capture_output=True, text=True,
                              timeout=timeout, env=_pg_env())

    def _client_cmd(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a client tool over TCP (trust authentication, so any OS user may connect as ``postgres``)."""
        return subprocess.run([str(self.bindir / tool), "-h", self.host, "-p", str(self.port), "-U", self.user, *args],
                              capture_output=True, text=True, timeout=timeout, env=_pg_env(), cwd=self.base)

    def create_database(self, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        r = self._client_cmd("createdb", name)
        if r.returncode != 0:
            raise RuntimeError(f"createdb {name} failed ({r.returncode}): {r.stderr.strip()}\n"
                               f"--- server log {self.logfile} ---\n{_tail(self.logfile)}")
        return self.conninfo(name)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        r = self._client_cmd("psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", dbname, "-c", sql)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def start(self) -> None:
        for folder in (self.base, self.sockdir):
            folder.mkdir(parents=True, exist_ok=True)
        if _is_root():
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.sockdir, "postgres", "postgres")
            self.base.chmod(0o755)  # the socket folder is reached through it by clients of any user
        r = self._server_cmd(str(self.bindir / "initdb"), "-A", "trust", "-U", self.user, "-E", "UTF8",
                             "--locale=C", "-D", str(self.datadir))
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        errors = []
        for _ in range(PORT_ATTEMPTS):  # another process may take the free port before the server binds it
            self.port = _free_port()
            log_start = _log_size(self.logfile)
            opts = (f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            r = self._server_cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                                 "-o", opts, "-w", "-t", str(int(START_TIMEOUT_S)), "start")
            if r.returncode == 0:
                self._running = True
                return
            errors.append(f"port {self.port}: pg_ctl start -> {r.returncode}\n{r.stdout}{r.stderr}\n"
                          f"--- {self.logfile} ---\n{_tail(self.logfile, start=log_start)}")
            self._stop()  # in case it came up after pg_ctl gave up waiting
        raise RuntimeError("PostgreSQL did not start:\n" + "\n".join(errors))

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _stop(self) -> None:
        if not self.datadir.exists():
            return
        for mode in ("fast", "immediate"):
            if self._postmaster_pid() is None:
                break
            try:
                self._server_cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                                 "-t", str(int(STOP_TIMEOUT_S)), "stop", timeout=STOP_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                pass
        pid = self._postmaster_pid()
        if pid is not None:  # last resort: our own postmaster, by its pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._running = False

    def close(self) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of its own on 127.0.0.1 (trust auth, user ``postgres``), stopped and deleted at teardown."""
    bindir = find_postgres_bin()
    if bindir is None:
        _unavailable(f"PostgreSQL not found under /usr/lib/postgresql/*/bin; {INSTALL_HINT}")
    as_postgres: list[str] = []
    if _is_root():
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            runuser = None
        if runuser is None:
            _unavailable("running as root, and PostgreSQL refuses root: needs `runuser` and a `postgres` user; "
                         + INSTALL_HINT)
        as_postgres = [runuser, "-u", "postgres", "--"]
    # /tmp, not pytest's tmp_path: the postgres user must reach the folder, and Unix socket paths are short.
    base = Path(tempfile.mkdtemp(prefix="opensora-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    server = PostgresServer(bindir=bindir, base=base, _as_postgres=as_postgres)
    atexit.register(server.close)  # if the session dies before fixture teardown
    try:
        server.start()
        yield server
    finally:
        server.close()
        atexit.unregister(server.close)


@pytest.fixture
def postgres_db(postgres_server) -> str:
    """conninfo of a fresh database on the session's server, unique to this test."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:16]}")


# --------------------------------------------------------------------------------------------------------------------
# S3 (moto)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    port: int
    logfile: Path
    process: subprocess.Popen | None = None
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def create_bucket(self, name: str) -> str:
        if not _BUCKET.match(name):
            raise ValueError(f"not a valid bucket name: {name!r}")
        self.client().create_bucket(Bucket=name)
        return name

    def _answers(self) -> bool:
        """True once an S3 ListBuckets answer comes back (not just any program on the port)."""
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as resp:
                return b"ListAllMyBucketsResult" in resp.read(4096)
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        log = open(self.logfile, "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}:\n{_tail(self.logfile)}")
            if self._answers() and self.process.poll() is None:
                return
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within {START_TIMEOUT_S:.0f} s:\n"
                           f"{_tail(self.logfile)}")

    def close(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # its own session: the server and anything it spawned
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (credentials "testing", region us-east-1), terminated at teardown."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        _unavailable(f"moto[server] is not installed ({exc}); install the dev extras: pip install -e '.[dev]'")
    logdir = tmp_path_factory.mktemp("moto")
    errors = []
    for attempt in range(PORT_ATTEMPTS):  # another process may take the free port before moto binds it
        server = S3Server(port=_free_port(), logfile=logdir / f"moto-{attempt}.log")
        atexit.register(server.close)
        try:
            server.start()
        except RuntimeError as exc:
            server.close()
            atexit.unregister(server.close)
            errors.append(f"port {server.port}: {exc}")
            continue
        try:
            yield server
        finally:
            server.close()
            atexit.unregister(server.close)
        return
    raise RuntimeError("moto S3 server did not start:\n" + "\n".join(errors))


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server, unique to this test."""
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")
