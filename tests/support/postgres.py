"""A PostgreSQL server of our own for tests and benchmarks: initdb in a temporary folder as the
``postgres`` user, listening only on a unix socket there; stopped and removed afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.servers import free_port


class Unavailable(Exception):
    """PostgreSQL cannot be started here (not installed, or not root)."""


def _as_postgres(*cmd: str | Path) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)], check=True, capture_output=True, timeout=120)


@contextmanager
def running_postgres(max_connections: int = 200) -> Iterator[str]:
    """Yield the URL of the maintenance database of a fresh PostgreSQL server."""
    initdbs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not initdbs:
        raise Unavailable("PostgreSQL is not installed (.ci/setup installs it)")
    if os.geteuid() != 0:
        raise Unavailable("starting PostgreSQL as the postgres user needs root")
    bindir = initdbs[-1].parent
    base = Path(tempfile.mkdtemp(prefix="keybroker-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data, sockets, port = base / "data", base / "sockets", free_port()
    started = False
    try:
        _as_postgres(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        _as_postgres("mkdir", "-m", "0700", sockets)
        _as_postgres(bindir / "pg_ctl", "-D", data, "-l", base / "postgres.log", "-w", "-t", "60", "-o",
                     f"-c listen_addresses='' -c unix_socket_directories={sockets} -p {port} "
                     f"-c max_connections={max_connections}", "start")
        started = True
        yield f"postgresql://postgres@/postgres?host={sockets}&port={port}"
    finally:
        if started:
            subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new database on ``server`` (a maintenance-database URL); dropped afterwards."""
    import psycopg

    name = f"kbs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    try:
        yield server.replace("/postgres?", f"/{name}?", 1)
    finally:
        with psycopg.connect(server, autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
