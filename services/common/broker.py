"""The embedded broker: a real single-node Apache Kafka (KRaft), assembled from Maven Central.

The jars of `org.apache.kafka:kafka_2.13` and its runtime dependencies are fetched once with Maven
into a cache directory (`WATISTREAM_CACHE`, default `~/.cache/watistream`) and run with the
machine's Java 17+. Tests, `watistream dev` and `watistream demo` all start the broker through
this module. Why not Tansu: see the README ("Brokers").
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

KAFKA_VERSION = os.environ.get("WATISTREAM_KAFKA_VERSION", "4.1.1")
# Kafka's jars log through slf4j 1.7; without a binding it prints warnings on stdout.
SLF4J_BINDING = "org.slf4j:slf4j-simple:1.7.36"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>watistream</groupId><artifactId>embedded-kafka</artifactId><version>1</version>
<dependencies>
<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
<version>{version}</version></dependency>
<dependency><groupId>{sg}</groupId><artifactId>{sa}</artifactId><version>{sv}</version></dependency>
</dependencies></project>
"""


class BrokerError(RuntimeError):
    """The embedded broker could not be fetched, formatted or started; says what to check."""


def cache_root() -> Path:
    return Path(os.environ.get("WATISTREAM_CACHE", Path.home() / ".cache" / "watistream"))


def ensure_jars(version: str = KAFKA_VERSION) -> Path:
    """Fetches Kafka's runtime jars once (Maven, ~45 MB); returns the directory holding them."""
    home = cache_root() / f"kafka-{version}"
    libs = home / "libs"
    done = home / ".complete"
    if done.exists():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel first runs fetch once
        if done.exists():
            return libs
        if shutil.which("mvn") is None or shutil.which("java") is None:
            raise BrokerError("the embedded broker needs Java 17+ and Maven (mvn) on PATH")
        group, artifact, slf4j_version = SLF4J_BINDING.split(":")
        (home / "pom.xml").write_text(
            _POM.format(version=version, sg=group, sa=artifact, sv=slf4j_version)
        )
        shutil.rmtree(libs, ignore_errors=True)
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={libs}"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise BrokerError(f"maven could not fetch Kafka {version}: {result.stdout[-2000:]}")
        # Kafka pins slf4j-api 1.7; drop any 2.x binding Maven might add.
        for jar in libs.glob("slf4j-simple-2*.jar"):
            jar.unlink()
        done.touch()
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent process dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()  # a Ctrl-C in the terminal reaches the parent, which stops us in order


SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")


@dataclass(frozen=True)
class SecuredListener:
    """Makes the client listener SASL_SSL: TLS with a PEM key and certificate, SASL users.

    Every user gets SCRAM-SHA-256 and SCRAM-SHA-512 credentials (created when the storage is
    formatted, as KRaft requires) and a PLAIN login. The broker talks to itself over the same
    listener as the first user, trusting `ca_file`. For tests and secured rehearsals; the default
    broker stays PLAINTEXT.
    """

    cert_file: Path  # PEM: the broker's certificate, then any intermediates
    key_file: Path  # PEM: its unencrypted PKCS#8 private key
    ca_file: Path  # PEM: the CA that signed cert_file
    users: Mapping[str, str]  # user name -> password

    def properties(self) -> dict[str, str]:
        user, password = next(iter(self.users.items()))
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required"
        plain_users = " ".join(f'user_{u}="{p}"' for u, p in self.users.items())
        return {
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": f"{scram};",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                f'{scram} username="{user}" password="{password}";',
            "listener.name.sasl_ssl.plain.sasl.jaas.config":
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{user}" password="{password}" {plain_users};',
            # PEM key and chain inline (a PEM keystore *file* demands an encrypted key)
            "ssl.keystore.type": "PEM",
            "ssl.keystore.key": _one_line(self.key_file.read_text()),
            "ssl.keystore.certificate.chain": _one_line(self.cert_file.read_text()),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
        }

    def scram_format_args(self) -> list[str]:
        """`kafka-storage format` arguments creating every user's SCRAM credentials."""
        args: list[str] = []
        for user, password in self.users.items():
            for mechanism in SASL_MECHANISMS[:2]:
                args += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
        return args


def _one_line(pem: str) -> str:
    """A multi-line PEM as one properties value (`\\n` is a newline to java.util.Properties)."""
    return "\\n".join(pem.strip().splitlines())


@dataclass
class EmbeddedKafka:
    """One broker process. `start()` blocks until it accepts connections."""

    data_dir: Path
    port: int = 0
    controller_port: int = 0
    partitions: int = 8
    heap: str = "512m"
    secured: SecuredListener | None = None  # None: the PLAINTEXT listener of dev/demo
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # For fault drills: a second listener, PROXIED, that binds `proxied_bind_port` but advertises
    # `proxied_port` (where a fault proxy listens and forwards to the bind port). A client that
    # bootstraps through `proxied_bootstrap` is then given only proxy addresses in the metadata,
    # so all its connections go through the proxy. Off (0) by default.
    proxied_port: int = 0
    proxied_bind_port: int = 0
    #: Extra broker properties (e.g. a lower `group.min.session.timeout.ms` for drills).
    extra_config: dict[str, str] = field(default_factory=dict)

    @property
    def proxied_bootstrap(self) -> str:
        """The address a proxied client bootstraps from (the proxy's); "" without the listener."""
        return f"127.0.0.1:{self.proxied_port}" if self.proxied_port else ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def gc_log_file(self) -> Path:
        """The JVM's GC log (one line per pause, with its wall time and duration)."""
        return self.data_dir / "gc.log"

    def _write_config(self) -> Path:
        client = "SASL_SSL" if self.secured else "PLAINTEXT"
        listeners = f"{client}://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        advertised = f"{client}://127.0.0.1:{self.port}"
        protocols = f"{client}:{client},CONTROLLER:PLAINTEXT"
        if self.proxied_port:
            listeners += f",PROXIED://127.0.0.1:{self.proxied_bind_port}"
            advertised += f",PROXIED://127.0.0.1:{self.proxied_port}"
            protocols += ",PROXIED:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": protocols,
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
            **(self.secured.properties() if self.secured else {}),
            **self.extra_config,
        }
        if self.proxied_port:  # brokers talk to each other on PLAINTEXT, never through the proxy
            props["inter.broker.listener.name"] = "PLAINTEXT"
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def start(self, timeout: float = 90.0) -> str:
        """Formats storage on first use, starts Kafka, waits for it; returns the bootstrap address."""
        if self.process is not None and self.process.poll() is None:
            return self.bootstrap
        libs = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_file = self.data_dir / "ports"
        if not self.port and ports_file.exists():  # restart on the same data: same addresses
            self.port, self.controller_port = map(int, ports_file.read_text().split())
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        if self.proxied_port:
            self.proxied_bind_port = self.proxied_bind_port or free_port()
        ports_file.write_text(f"{self.port} {self.controller_port}\n")
        config = self._write_config()
        classpath = f"{libs}/*"
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = "-"
            while cluster_id.startswith("-"):  # StorageTool would read a leading "-" as an option
                cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
            fmt = subprocess.run(
                ["java", "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                 "-c", str(config), "--standalone",
                 *(self.secured.scram_format_args() if self.secured else [])],
                capture_output=True, text=True, check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting Kafka storage failed: {fmt.stdout}{fmt.stderr}")
        log = open(self.log_file, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            ["java", f"-Xmx{self.heap}", f"-Xms{self.heap}", "-XX:+UseSerialGC",
             # each pause with its wall time: a stalled broker stalls every service at once
             f"-Xlog:gc:file={self.gc_log_file}:time,uptime:filecount=2,filesize=10m",
             "-XX:TieredStopAtLevel=1", "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
             "-cp", classpath, "kafka.Kafka", str(config)],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        log.close()
        self._wait_ready(timeout)
        return self.bootstrap

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise BrokerError(f"Kafka exited during start-up; see {self.log_file}")
            if _accepts(self.port) and _log_says_started(self.log_file):
                return
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"Kafka did not start within {timeout:.0f}s; see {self.log_file}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Kafka shuts down cleanly in ~2 s), SIGKILL if it hangs."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for outage drills; `start()` again recovers on the same data directory."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _log_says_started(log_file: Path) -> bool:
    """Kafka logs this once the broker has registered and serves requests."""
    try:
        with open(log_file, "rb") as fh:
            fh.seek(max(0, log_file.stat().st_size - 200_000))
            tail = fh.read()
    except OSError:
        return False
    marker = b"Kafka Server started"
    # Only count a start after the last (re)launch of the process.
    last_launch = tail.rfind(b"Starting controller")
    return tail.rfind(marker) > max(last_launch, -1) or (last_launch == -1 and marker in tail)
