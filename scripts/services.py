"""A throwaway PostgreSQL and MLflow tracking server on 127.0.0.1: for the tests, CI, and trying the
multi-machine setup on one box (and the headless chromium the tests render pages in).

    python scripts/services.py install                            # apt-get install postgresql, chromium, if missing
    python scripts/services.py start DIR && . DIR/services.env   # the environment that points clients at them
    python scripts/services.py stop DIR                           # stops both and deletes DIR

PostgreSQL (installed with apt-get when missing, which needs root) gets a fresh cluster in DIR/pg on a free
port, password (scram-sha-256) authentication only, and two databases: `optuna` (searches) and `mlflow` (the
tracking server's backend store). The MLflow server runs its basic-auth app and serves artifacts itself
(--serve-artifacts, stored in DIR/artifacts), so clients need nothing but its URL and credentials.
Passwords never appear in a URL: PostgreSQL's come from DIR/pgpass (libpq's PGPASSFILE), MLflow's from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

USER = "pipeline"
STATE = "services.json"


class Unavailable(RuntimeError):
    """The services cannot run on this machine (and why)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apt_install(package: str, what: str) -> None:
    """Debian's `package`, with apt-get (which needs root)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"{what} is not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}")


def postgres_bin() -> Path:
    """The directory of initdb/pg_ctl, installing Debian's postgresql package first if there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    if not found:
        apt_install("postgresql", "PostgreSQL")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise Unavailable("apt-get installed postgresql, but no initdb was found")
    return Path(found[-1]).resolve().parent


def browser() -> str:
    """Debian's chromium, installed first if missing: the tests render pages in it (headless)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    apt_install("chromium", "chromium")
    found = shutil.which("chromium")
    if not found:
        raise Unavailable("apt-get installed chromium, but no chromium command was found")
    return found


def _as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user the package creates."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start(directory: Path) -> dict[str, str]:
    """Start both services; returns (and saves) the environment a client needs."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    bin_dir = postgres_bin()
    pg_password, mlflow_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    pg_port, mlflow_port = _free_port(), _free_port()
    # the server's own folder, reachable by the `postgres` user (DIR may sit in a folder only root can enter)
    server_dir = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    (server_dir / "pwfile").write_text(pg_password + "\n")
    if os.geteuid() == 0:
        for path in (server_dir, server_dir / "pwfile"):
            shutil.chown(path, "postgres", "postgres")
    state = {"pg_bin": str(bin_dir), "pg_dir": str(server_dir), "pg_data": str(server_dir / "data")}
    _save(directory, state)

    def run(*command: str) -> None:
        done = subprocess.run([*_as_server_user(), *command], capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()[-300:]}")

    try:
        run(str(bin_dir / "initdb"), "-D", state["pg_data"], "-U", USER, "--auth=scram-sha-256",
            f"--pwfile={server_dir / 'pwfile'}", "-E", "UTF8")
        (server_dir / "pwfile").unlink()
        run(str(bin_dir / "pg_ctl"), "-D", state["pg_data"], "-l", str(server_dir / "server.log"), "-w",
            "-o", f"-p {pg_port} -k {server_dir} -c listen_addresses=127.0.0.1 -c max_connections=300", "start")
    except Unavailable:
        stop(directory, remove=False)
        raise
    pgpass = directory / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_port}:*:{USER}:{pg_password}\n")
    os.chmod(pgpass, 0o600)  # libpq ignores a pgpass others can read
    env = {"PGPASSFILE": str(pgpass)}
    for database in ("optuna", "mlflow"):
        done = subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", USER,
                               database], capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode:
            stop(directory, remove=False)
            raise Unavailable(f"createdb {database} failed: {done.stderr.strip()[-300:]}")
    state.update(optuna_storage=f"postgresql://{USER}@127.0.0.1:{pg_port}/optuna",
                 mlflow_backend=f"postgresql+psycopg://{USER}@127.0.0.1:{pg_port}/mlflow")
    _save(directory, state)

    auth = directory / "basic_auth.ini"
    auth.write_text("[mlflow]\ndefault_permission = EDIT\n"
                    f"database_uri = sqlite:///{directory / 'basic_auth.db'}\nadmin_username = {USER}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    # a PBKDF2 check per request costs more than most requests: cache verified credentials
                    "auth_cache_ttl_seconds = 60\n")
    server_env = {**os.environ, **env, "MLFLOW_AUTH_CONFIG_PATH": str(auth),
                  "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_password,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                  # no job runners (huey consumers, a process each) for GenAI jobs the pipeline never submits
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    log = open(directory / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", state["mlflow_backend"], "--serve-artifacts",
         "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    state["mlflow_pid"] = server.pid
    _save(directory, state)
    uri = f"http://127.0.0.1:{mlflow_port}"
    deadline = time.monotonic() + 180
    while not _answers(uri + "/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop(directory, remove=False)
            raise Unavailable(f"the MLflow server did not start; see {directory / 'mlflow-server.log'}")
        time.sleep(0.5)
    client_env = {**env, "OPTUNA_STORAGE": state["optuna_storage"], "MLFLOW_TRACKING_URI": uri,
                  "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": mlflow_password}
    state["env"] = client_env
    _save(directory, state)
    env_file = directory / "services.env"
    env_file.write_text("".join(f"export {key}={value}\n" for key, value in client_env.items()))
    os.chmod(env_file, 0o600)
    return client_env


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _save(directory: Path, state: dict) -> None:
    path = directory / STATE
    path.write_text(json.dumps(state, indent=2))
    os.chmod(path, 0o600)


def stop(directory: Path, remove: bool = True) -> None:
    """Stop whatever `start` left running in `directory`; nothing keeps running afterwards."""
    directory = directory.resolve()
    state_file = directory / STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    pid = state.get("mlflow_pid")
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)  # the server and its workers
            for _ in range(100):
                with contextlib.suppress(ChildProcessError):  # started by this process: reap it, or it lingers
                    os.waitpid(pid, os.WNOHANG)              # as a zombie that killpg(pid, 0) still finds
                os.killpg(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if state.get("pg_data") and Path(state["pg_data"]).exists():
        subprocess.run([*_as_server_user(), str(Path(state["pg_bin"]) / "pg_ctl"), "-D", state["pg_data"], "-m",
                        "fast", "-w", "stop"], capture_output=True)
    if state.get("pg_dir"):
        shutil.rmtree(state["pg_dir"], ignore_errors=True)
    if remove:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "start", "stop"])
    parser.add_argument("directory", type=Path, nargs="?")
    args = parser.parse_args()
    if args.action == "install":
        try:
            print(f"PostgreSQL: {postgres_bin()}")
            print(f"chromium: {browser()}")
        except Unavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.directory is None:
        parser.error(f"{args.action} needs a directory")
    if args.action == "stop":
        stop(args.directory)
        return 0
    try:
        env = start(args.directory)
    except Unavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"PostgreSQL: {env['OPTUNA_STORAGE']} (password in {env['PGPASSFILE']})\n"
          f"MLflow server: {env['MLFLOW_TRACKING_URI']} (user {USER})\n"
          f"environment for clients: . {args.directory.resolve() / 'services.env'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
