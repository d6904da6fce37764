"""A one-node Apache Kafka (KRaft, broker and controller in one JVM) on loopback, without Docker.

The jars come from Maven Central through `mvn` (pinned in infra/kafka/pom.xml) into the shared cache, once;
each FLYWHEEL_HOME gets its own config, data and log under `<home>/infra/kafka/`, and `state.json` there
tells services where the broker listens (`FlywheelSettings.resolved_kafka_bootstrap`).

`secure=True` (`flywheel infra up --secure`) starts it with a SASL/SCRAM-SHA-512 client listener and the
StandardAuthorizer: one principal per service (infra/kafka_acls.py), their SCRAM credentials created when
the storage is formatted, their passwords in `credentials.json` (0600) beside the config, and the topics
and ACLs created by the admin principal at every start. Services started without FLYWHEEL_KAFKA_SASL_*
read their own principal's password from that file.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.processes import (
    LOOPBACK,
    InfraStatus,
    free_port,
    is_our_process,
    pick_port,
    port_is_free,
    process_alive,
    read_state,
    tail,
    terminate,
    wait_until,
    write_state,
)
from contracts.publisher import PLAINTEXT, KafkaSecurity
from infra.kafka_acls import ADMIN_PRINCIPAL, PRINCIPAL_NAMES, apply_acls
from services.runtime.errors import InfrastructureError

KAFKA_VERSION = "4.1.1"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
MAIN_CLASS = "kafka.Kafka"
# The package's data folder, read in place: the broker's JVM needs real file paths, not importlib resources.
KAFKA_FILES = Path(__file__).with_name("kafka")

# Auto-creation is off so that a misspelt topic fails loudly instead of quietly becoming a new, empty topic:
# services and tests create their topics explicitly, with the partitions they need.
SERVER_PROPERTIES = """\
# Written by `flywheel infra up` on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={data_dir}
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# A development broker: keep three days or 1 GiB per partition, whichever is hit first.
log.retention.hours=72
log.retention.bytes=1073741824
log.segment.bytes=134217728
"""

# Clients authenticate with SASL/SCRAM-SHA-512 and are authorised by ACLs; no ACL, no access. The
# controller listener cannot use SCRAM (its credentials live in the metadata log the controller
# serves), so it takes SASL/PLAIN with one static user, `controller`, whose password is new at every
# start (broker and controller read it from this one file): nothing reaches the controller
# anonymously, and the broker does as a super user. It listens on loopback only.
# {listener} is SASL_PLAINTEXT, or SASL_SSL with --tls (a CA and broker certificate made for this home).
SECURE_SERVER_PROPERTIES = (
    SERVER_PROPERTIES.replace(
        "listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}\n"
        "advertised.listeners=PLAINTEXT://{host}:{port}\n"
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n",
        "listeners={listener}://{host}:{port},CONTROLLER://{host}:{controller_port}\n"
        "advertised.listeners={listener}://{host}:{port}\n"
        "listener.security.protocol.map={listener}:{listener},CONTROLLER:SASL_PLAINTEXT\n",
    ).replace("inter.broker.listener.name=PLAINTEXT\n", "inter.broker.listener.name={listener}\n")
    + """\
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.{listener_lower}.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="{admin}" password="{admin_password}";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="controller" password="{controller_password}" user_controller="{controller_password}";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{admin};User:controller
allow.everyone.if.no.acl.found=false
"""
)
# PEM files need no keystore tooling: the broker's key and certificate in one file, the CA in another.
TLS_PROPERTIES = """\
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={cafile}
ssl.endpoint.identification.algorithm=https
"""
SCRAM_MECHANISM = "SCRAM-SHA-512"


class LocalKafka:
    """The local broker of one FLYWHEEL_HOME: fetch its jars, start, stop, report."""

    def __init__(
        self,
        home: Path,
        cache: Path,
        port: int | None = None,
        *,
        secure: bool | None = None,
        tls: bool | None = None,
        topic_prefix: str = "",
    ) -> None:
        """`secure`: True or False asks for that mode; None (what `flywheel demo` and the test fixture
        use) reuses a running broker as it is, and starts one secure exactly when this home was made
        secure once (its credentials exist), so a secured home never quietly falls back to plaintext.
        `tls` (with `secure`) serves SASL_SSL with a CA made for this home; None: as this home was made."""
        self.dir = home.resolve() / "infra" / "kafka"
        self.state_file = self.dir / "state.json"
        self.config_file = self.dir / "server.properties"
        self.credentials_file = self.dir / "credentials.json"
        self.tls_dir = self.dir / "tls"
        self.cafile = self.tls_dir / "ca.pem"
        self._requested_secure = secure
        self.secure = secure if secure is not None else self.credentials_file.exists()
        self.tls = self.secure and (tls if tls is not None else self.cafile.exists())
        self.topic_prefix = topic_prefix
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "broker.log"
        self.jvm_log_file = self.dir / "jvm.out"
        self.kafka_dir = cache.expanduser().resolve() / f"kafka-{KAFKA_VERSION}"
        self.libs_dir = self.kafka_dir / "libs"
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    def ensure_jars(self) -> Path:
        """Download the broker's jars into the cache unless a previous run finished doing so; the libs folder."""
        marker = self.kafka_dir / ".complete"
        if marker.exists():
            return self.libs_dir
        java, mvn = shutil.which("java"), shutil.which("mvn")
        if not java or not mvn:
            missing = " and ".join(name for name, path in (("java", java), ("mvn", mvn)) if not path)
            raise InfrastructureError(
                f"{missing} not found: install a JDK 17+ and Maven (apt-get install -y openjdk-17-jre-headless maven)"
            )
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        # Two pytest sessions (or a test run and `flywheel infra up`) may fetch at once into the same cache.
        with (self.kafka_dir.parent / f"kafka-{KAFKA_VERSION}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.exists():
                return self.libs_dir
            print(
                f"fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {self.libs_dir} (about a minute, once)",
                file=sys.stderr,
            )
            result = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(KAFKA_FILES / "pom.xml"),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={self.libs_dir}",
                    "-DincludeScope=runtime",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                output = (result.stdout + result.stderr).strip().splitlines()
                raise InfrastructureError(
                    f"mvn could not fetch the Kafka jars (exit {result.returncode}):\n" + "\n".join(output[-15:])
                )
            marker.touch()
        return self.libs_dir

    def status(self) -> InfraStatus:
        """Whether the recorded broker runs, and where."""
        state = read_state(self.state_file)
        if state is None:
            return InfraStatus("kafka", False, data_dir=self.data_dir, log_file=self.log_file)
        running = self._is_ours(state["pid"])
        return InfraStatus(
            "kafka",
            running,
            pid=state["pid"],
            address=state["bootstrap"],
            data_dir=self.data_dir,
            log_file=self.log_file,
            started_at=state["started_at"],
            note=(
                {"SASL_PLAINTEXT": "SASL/SCRAM with ACLs", "SASL_SSL": "SASL/SCRAM over TLS with ACLs"}.get(
                    state.get("security_protocol", ""), "plaintext, no authentication"
                )
                if running
                else f"stale state: pid {state['pid']} is not running"
            ),
        )

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker, or reuse the one already running for this home; its bootstrap address.

        Blocks while it waits (it runs its own event loop): from async code, call it through asyncio.to_thread.
        """
        state = read_state(self.state_file)
        if state is not None:
            if self._is_ours(state["pid"]):
                if self.port is not None and state["port"] != self.port:
                    raise InfrastructureError(
                        f"a broker already runs on {state['bootstrap']}: `flywheel infra down` first to move it to port {self.port}"
                    )
                running_secure = state.get("security_protocol") in ("SASL_PLAINTEXT", "SASL_SSL")
                if self._requested_secure is not None and self._requested_secure != running_secure:
                    running = "with" if running_secure else "without"
                    raise InfrastructureError(
                        f"a broker already runs on {state['bootstrap']} {running} --secure: `flywheel infra down` first to change its mode"
                    )
                self.secure = running_secure
                self.tls = state.get("security_protocol") == "SASL_SSL"
                self._wait_ready(state["pid"], state["bootstrap"], timeout)
                return state["bootstrap"]
            self.state_file.unlink()
        libs = self.ensure_jars()
        port, controller_port = self._choose_ports()
        bootstrap = f"{LOOPBACK}:{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        formatted = (self.data_dir / "meta.properties").exists()
        if self.secure:
            if formatted and not self.credentials_file.exists():
                raise InfrastructureError(
                    f"the broker's data in {self.data_dir} was formatted without SCRAM credentials, so it cannot start --secure: "
                    "use another FLYWHEEL_HOME, or `flywheel infra down` and remove that directory (its topics are lost)"
                )
            passwords = self._passwords()
            config = SECURE_SERVER_PROPERTIES.format(
                host=LOOPBACK,
                port=port,
                controller_port=controller_port,
                data_dir=self.data_dir,
                admin=ADMIN_PRINCIPAL,
                admin_password=passwords[ADMIN_PRINCIPAL],
                listener=self.protocol,
                listener_lower=self.protocol.lower(),
                controller_password=secrets.token_urlsafe(24),
            )
            if self.tls:
                keystore = self._ensure_certificates()
                config += TLS_PROPERTIES.format(keystore=keystore, cafile=self.cafile)
        else:
            passwords = {}
            config = SERVER_PROPERTIES.format(
                host=LOOPBACK, port=port, controller_port=controller_port, data_dir=self.data_dir
            )
        _write_private(self.config_file, config)  # the secure config holds the admin's password
        if not formatted:
            self._format_storage(libs, passwords)
        with self.jvm_log_file.open("wb") as jvm_out:
            self._process = subprocess.Popen(
                self._java(libs, MAIN_CLASS, str(self.config_file)),
                stdin=subprocess.DEVNULL,
                stdout=jvm_out,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal that ran `flywheel infra up` must not reach the broker.
                start_new_session=True,
            )
        pid = self._process.pid
        write_state(
            self.state_file,
            {
                "pid": pid,
                "bootstrap": bootstrap,
                "port": port,
                "controller_port": controller_port,
                "data_dir": str(self.data_dir),
                "config": str(self.config_file),
                "log_file": str(self.log_file),
                "kafka_version": KAFKA_VERSION,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "security_protocol": self.protocol,
                **(
                    {"sasl_mechanism": SCRAM_MECHANISM, "credentials_file": str(self.credentials_file)}
                    if self.secure
                    else {}
                ),
                **({"ssl_cafile": str(self.cafile)} if self.tls else {}),
            },
        )
        try:
            self._wait_ready(pid, bootstrap, timeout)
            if self.secure:
                asyncio.run(self._provision(bootstrap))
        except BaseException:
            self.stop()
            raise
        return bootstrap

    @property
    def protocol(self) -> str:
        """What clients speak to this broker."""
        return ("SASL_SSL" if self.tls else "SASL_PLAINTEXT") if self.secure else "PLAINTEXT"

    def admin_security(self) -> KafkaSecurity:
        """How the admin principal connects to this broker (plaintext when it is not secure)."""
        if not self.secure:
            return PLAINTEXT
        return self.credentials(ADMIN_PRINCIPAL)

    def credentials(self, principal: str) -> KafkaSecurity:
        """How `principal` (infra/kafka_acls.py) connects to this secure broker."""
        return KafkaSecurity.of(
            protocol=self.protocol,
            sasl_mechanism=SCRAM_MECHANISM,
            sasl_username=principal,
            sasl_password=self._passwords()[principal],
            ssl_cafile=self.cafile if self.tls else None,
        )

    def _ensure_certificates(self) -> Path:
        """A CA and a broker certificate for 127.0.0.1/localhost, made once per home with the openssl CLI;
        the broker's keystore (key and certificate, PEM). Clients trust `cafile` (FLYWHEEL_KAFKA_SSL_CAFILE)."""
        keystore = self.tls_dir / "broker.pem"
        if keystore.exists() and self.cafile.exists():
            return keystore
        openssl = shutil.which("openssl")
        if not openssl:
            raise InfrastructureError("openssl not found: it makes the local CA for --tls (apt-get install -y openssl)")
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        self.tls_dir.chmod(0o700)  # holds the CA's and the broker's private keys
        files = {
            name: str(self.tls_dir / name)
            for name in ("ca.key", "broker.key", "broker.csr", "broker.crt", "broker.ext")
        }
        (self.tls_dir / "broker.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        )
        steps = [
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                files["ca.key"],
                "-out",
                str(self.cafile),
                "-days",
                "825",
                "-subj",
                "/CN=Flywheel local Kafka CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            [
                openssl,
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                files["broker.key"],
                "-out",
                files["broker.csr"],
                "-subj",
                f"/CN={LOOPBACK}",
            ],
            [
                openssl,
                "x509",
                "-req",
                "-in",
                files["broker.csr"],
                "-CA",
                str(self.cafile),
                "-CAkey",
                files["ca.key"],
                "-CAcreateserial",
                "-out",
                files["broker.crt"],
                "-days",
                "825",
                "-extfile",
                files["broker.ext"],
            ],
        ]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise InfrastructureError(
                    f"openssl {step[1]} failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
                )
        _write_private(keystore, Path(files["broker.key"]).read_text() + Path(files["broker.crt"]).read_text())
        return keystore

    def _passwords(self) -> dict[str, str]:
        """Every principal's password: generated once, with the storage they are formatted into."""
        if self.credentials_file.exists():
            return json.loads(self.credentials_file.read_text())["principals"]
        passwords = {name: secrets.token_urlsafe(24) for name in PRINCIPAL_NAMES}
        _write_private(
            self.credentials_file, json.dumps({"mechanism": SCRAM_MECHANISM, "principals": passwords}, indent=2) + "\n"
        )
        return passwords

    async def _provision(self, bootstrap: str) -> None:
        """Topics and ACLs, as the admin: services may neither create topics nor grant themselves rights."""
        from services.runtime.broker import ensure_topics

        admin = self.admin_security()
        await ensure_topics(bootstrap, self.topic_prefix, security=admin)
        await apply_acls(bootstrap, admin, self.topic_prefix)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded broker and forget it; whether one was running."""
        state = read_state(self.state_file)
        if state is None:
            return False
        pid = state["pid"]
        running = self._is_ours(pid)
        if running:
            terminate(pid, timeout)
        if self._process is not None and self._process.pid == pid:
            self._process.wait()  # reap our own child, or it lingers as a zombie until this process exits
            self._process = None
        self.state_file.unlink(missing_ok=True)
        return running

    def _is_ours(self, pid: int) -> bool:
        # A pid recorded days ago may belong to an unrelated process by now: never signal one that is not our broker.
        return is_our_process(pid, MAIN_CLASS, str(self.config_file))

    def _choose_ports(self) -> tuple[int, int]:
        if self.port is None:
            port = pick_port(DEFAULT_PORT)
        elif port_is_free(self.port):
            port = self.port
        else:
            raise InfrastructureError(
                f"port {self.port} is in use: choose another with --port or stop what listens there"
            )
        # The conventional pair 9092/9093 when the broker has 9092; otherwise the controller takes any free port.
        controller_port = (
            pick_port(DEFAULT_CONTROLLER_PORT, avoid={port}) if port == DEFAULT_PORT else free_port(avoid={port})
        )
        return port, controller_port

    def _java(self, libs: Path, main_class: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xmx512m",
            "-cp",
            f"{libs}/*",
            f"-Dlog4j2.configurationFile={KAFKA_FILES / 'log4j2.properties'}",
            f"-Dflywheel.kafka.log={self.log_file}",
            main_class,
            *args,
        ]

    def _format_storage(self, libs: Path, passwords: dict[str, str]) -> None:
        cluster_id = new_cluster_id()
        # SCRAM credentials can only be bootstrapped here (KIP-900): the admin needs one to log in at all.
        scram = [
            arg
            for name, password in passwords.items()
            for arg in ("--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]")
        ]
        # No --standalone: the voter set comes from controller.quorum.voters in the config.
        self._run_tool(libs, "format", "-t", cluster_id, "-c", str(self.config_file), *scram)

    def _run_tool(self, libs: Path, *args: str) -> str:
        result = subprocess.run(
            self._java(libs, "kafka.tools.StorageTool", *args), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            # The arguments may hold SCRAM passwords: the error names the tool, never its command line.
            raise InfrastructureError(
                f"kafka-storage {args[0]} failed (exit {result.returncode}): {(result.stdout + result.stderr).strip()}"
            )
        return result.stdout

    def _wait_ready(self, pid: int, bootstrap: str, timeout: float) -> None:
        port = int(bootstrap.rsplit(":", 1)[1])
        # The TCP check first keeps aiokafka from logging connection errors while the JVM boots.
        ready = wait_until(
            lambda: (
                not process_alive(pid)
                or (not port_is_free(port) and asyncio.run(_broker_answers(bootstrap, self.admin_security())))
            ),
            timeout,
            interval=0.5,
        )
        if not process_alive(pid):
            raise InfrastructureError(
                f"the Kafka broker exited during startup; last lines of {self.log_file}:\n{self._log_tail()}"
            )
        if not ready:
            raise InfrastructureError(
                f"the Kafka broker did not answer on {bootstrap} within {timeout:.0f}s; last lines of {self.log_file}:\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        jvm = self.jvm_log_file.read_text(errors="replace").strip() if self.jvm_log_file.exists() else ""
        return tail(self.log_file) + (f"\n{self.jvm_log_file}:\n{tail(self.jvm_log_file)}" if jvm else "")


async def _broker_answers(bootstrap: str, security: KafkaSecurity) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **security.client_options())
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except KafkaError:
        return False
    finally:
        await admin.close()
    return bool(cluster["brokers"])


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte (no window with wider permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as file:
        file.write(text)


def new_cluster_id() -> str:
    """A Kafka cluster id as `kafka-storage random-uuid` makes it (URL-safe base64 of a UUID), without
    starting a JVM for it: that saves seconds on every fresh broker."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # Kafka avoids ids a command line would read as an option
            return cluster_id
