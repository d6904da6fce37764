"""Who may do what on Kafka: one principal per service, the apps' principal, the joint principal of a
one-process `flywheel up`, and the admin. Written once, here: `flywheel infra up --secure`, the
docker-compose init step (`flywheel infra acls`), the docs and the tests all read this table.

A service's row is what its code does (services/<name>/app.py, handlers, publishers): it produces
its own topics, reads what it consumes in its consumer group (or, for serving's followers, outside
any group), and writes the dead letters of what it consumes in a group (services/runtime/consumer.py).
Nothing but the admin may create topics or change ACLs.

Idempotent producers need no cluster-wide IdempotentWrite since Kafka 2.8 (KIP-679: Write on any
topic suffices), so none is granted; no service uses transactions, so no TransactionalId is granted.

ACLs are created with Kafka's CreateAcls request (protocol API 30) through aiokafka's client:
aiokafka 0.14's admin client has no create_acls, and Kafka's own `kafka-acls` tool is not among the
jars infra/kafka/pom.xml fetches (and one JVM per call would cost seconds each).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import IntEnum

from contracts.publisher import KafkaSecurity
from contracts.topics import EVENT_TYPES, dlq_for, topic_for
from services.runtime.errors import InfrastructureError
from services.runtime.settings import PROCESS_PRINCIPAL

ADMIN_PRINCIPAL = "admin"
APP_PRINCIPAL = "app"

# Events that join a principal's rights the moment contracts define them. span.logged is defined: the
# OTLP intake (feedback), the gateway (serving) and apps publish it, and so do the monitor, the trainer,
# the evaluator and the registry for the spans of a retraining (services/runtime/spans.py).
SPAN_LOGGED = "span.logged"


def _when_defined(*event_types: str) -> tuple[str, ...]:
    return tuple(event_type for event_type in event_types if event_type in EVENT_TYPES)


@dataclass(frozen=True)
class Principal:
    """One Kafka identity and what it may do; event types, not topic names (the prefix comes later)."""

    name: str
    produces: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()  # read in consumer group `group`; their `.dlq` topics are written
    follows: tuple[str, ...] = ()  # read outside any consumer group (every replica reads everything)
    group: str | None = None
    why: str = ""


SERVICE_PRINCIPALS: tuple[Principal, ...] = (
    Principal(
        "registry",
        produces=(
            "model.registered",
            "adapter.registered",
            "prompt.published",
            "dataset.published",
            "stage.changed",
            *_when_defined(SPAN_LOGGED),
        ),
        consumes=("training.completed", "evaluation.completed"),
        group="registry",
        why="owns versions and stages; its outbox relays the state events",
    ),
    Principal(
        "trainer",
        produces=(
            "training.requested",
            "training.started",
            "training.progress",
            "training.completed",
            "training.failed",
            *_when_defined(SPAN_LOGGED),
        ),
        consumes=("training.requested", "model.registered", "dataset.published", "adapter.registered"),
        group="trainer",
        why="its door accepts training requests (published, then consumed); a job reports its progress",
    ),
    Principal(
        "evaluator",
        produces=("evaluation.requested", "evaluation.completed", *_when_defined(SPAN_LOGGED)),
        consumes=(
            "model.registered",
            "dataset.published",
            "stage.changed",
            "prompt.published",
            "adapter.registered",
            "evaluation.requested",
        ),
        group="evaluator",
        why="its door and a new adapter request evaluations; the gate's verdict is evaluation.completed",
    ),
    Principal(
        "serving",
        produces=("inference.logged", "deployment.completed", *_when_defined(SPAN_LOGGED)),
        follows=("adapter.registered", "stage.changed", "prompt.published", "deployment.requested"),
        why="every replica reads the registry's state in full (no group, no dead letters)",
    ),
    Principal(
        "feedback",
        produces=("feedback.received", "feedback.reviewed", *_when_defined(SPAN_LOGGED)),
        consumes=("inference.logged", "feedback.received", "feedback.reviewed", *_when_defined(SPAN_LOGGED)),
        group="feedback",
        why="its door takes feedback (and OTLP traces), reviewers' as feedback.reviewed, which it alone writes; its sink stores what arrives",
    ),
    Principal(
        "monitor",
        produces=("alert.raised", "training.requested", *_when_defined(SPAN_LOGGED)),
        consumes=("stage.changed",),
        group="monitor",
        why="raises alerts and requests retraining; watches canaries",
    ),
)

# An app that runs its own LLM reports what happened, and nothing that changes the platform: not
# feedback.reviewed either, whose corrections steer automatic retraining.
APP = Principal(
    APP_PRINCIPAL,
    produces=("inference.logged", "feedback.received", *_when_defined(SPAN_LOGGED)),
    why="apps publishing their own inferences and feedback",
)


def _joint(name: str, principals: tuple[Principal, ...]) -> tuple[Principal, ...]:
    """What several services may do together, as the one principal of a process that runs them all:
    one broker connection has one identity. Consumer groups keep their service names."""
    return tuple(
        Principal(name, produces=p.produces, consumes=p.consumes, follows=p.follows, group=p.group, why=f"as {p.name}")
        for p in principals
    )


PROCESS = _joint(PROCESS_PRINCIPAL, SERVICE_PRINCIPALS)

# Every principal that gets SCRAM credentials; the admin is a super user (super.users), with no ACLs.
PRINCIPAL_NAMES: tuple[str, ...] = (
    ADMIN_PRINCIPAL,
    *(p.name for p in SERVICE_PRINCIPALS),
    APP_PRINCIPAL,
    PROCESS_PRINCIPAL,
)


def principals() -> tuple[Principal, ...]:
    """Every row that grants rights (the admin's come from super.users)."""
    return (*SERVICE_PRINCIPALS, APP, *PROCESS)


def service_principal(name: str) -> Principal:
    for principal in SERVICE_PRINCIPALS:
        if principal.name == name:
            return principal
    raise KeyError(f"no Kafka principal for service {name!r}")


# Kafka's wire values (org.apache.kafka.common.resource.ResourceType, acl.AclOperation, ...).
class ResourceType(IntEnum):
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4


class Operation(IntEnum):
    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8


PATTERN_LITERAL = 3
PERMISSION_ALLOW = 3


@dataclass(frozen=True, order=True)
class AclBinding:
    principal: str  # "User:<name>"
    resource_type: ResourceType
    resource_name: str
    operation: Operation
    host: str = field(default="*")

    def __str__(self) -> str:
        return f"{self.principal} {self.operation.name} {self.resource_type.name}:{self.resource_name}"


def acl_bindings(prefix: str = "") -> list[AclBinding]:
    """Every ALLOW ACL the table grants, for topics named with `prefix`. WRITE and READ imply DESCRIBE."""
    bindings: set[AclBinding] = set()
    for principal in principals():
        user = f"User:{principal.name}"
        for event_type in principal.produces:
            bindings.add(AclBinding(user, ResourceType.TOPIC, topic_for(event_type, prefix), Operation.WRITE))
        for event_type in principal.consumes:
            topic = topic_for(event_type, prefix)
            bindings.add(AclBinding(user, ResourceType.TOPIC, topic, Operation.READ))
            bindings.add(AclBinding(user, ResourceType.TOPIC, dlq_for(topic), Operation.WRITE))
        for event_type in principal.follows:
            bindings.add(AclBinding(user, ResourceType.TOPIC, topic_for(event_type, prefix), Operation.READ))
        if principal.group is not None and principal.consumes:
            bindings.add(AclBinding(user, ResourceType.GROUP, principal.group, Operation.READ))
    return sorted(bindings)


def may_produce(principal: str, topic: str, prefix: str = "") -> bool:
    """Whether the table lets `principal` write `topic` (the admin: always)."""
    if principal == ADMIN_PRINCIPAL:
        return True
    user = f"User:{principal}"
    return any(
        b.principal == user
        and b.resource_type is ResourceType.TOPIC
        and b.resource_name == topic
        and b.operation is Operation.WRITE
        for b in acl_bindings(prefix)
    )


def table_markdown() -> str:
    """The table as docs print it (SECURITY.md, docs/operations.md)."""
    lines = ["| principal | produces | consumes (group) | reads outside a group |", "|---|---|---|---|"]
    for principal in (*SERVICE_PRINCIPALS, APP):
        group = f" (group `{principal.group}`, writes their `.dlq`)" if principal.consumes else ""
        lines.append(
            f"| `{principal.name}` | {', '.join(principal.produces) or '-'} | {', '.join(principal.consumes) or '-'}{group} | {', '.join(principal.follows) or '-'} |"
        )
    lines.append(
        f"| `{PROCESS_PRINCIPAL}` | everything the six services may do together (one-process `flywheel up`/`demo`) | | |"
    )
    lines.append(
        f"| `{ADMIN_PRINCIPAL}` | super user: creates topics and ACLs, may publish commands such as deployment.requested | | |"
    )
    return "\n".join(lines)


async def apply_acls(bootstrap: str, admin: KafkaSecurity, prefix: str = "", timeout_s: float = 30.0) -> int:
    """Create every ACL of the table on the broker at `bootstrap` as the admin; how many were sent.
    Creating an ACL that exists already is a no-op on the broker, so this runs at every start."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.admin import CreateAclsRequest

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **admin.client_options()
    )
    await client.bootstrap()
    try:
        # ACL changes go to any broker, which forwards them to the controller (KRaft).
        node_id = next(iter(client.cluster.brokers())).nodeId
        bindings = acl_bindings(prefix)

        async def create(binding: AclBinding) -> None:
            request = CreateAclsRequest(
                binding.resource_type,
                binding.resource_name,
                PATTERN_LITERAL,
                binding.principal,
                binding.host,
                binding.operation,
                PERMISSION_ALLOW,
            )
            response = await client.send(node_id, request)
            for error_code, error_message in response.creation_responses:
                if error_code != 0:
                    raise InfrastructureError(f"Kafka refused the ACL {binding} (error {error_code}: {error_message})")

        await asyncio.gather(*(create(binding) for binding in bindings))
        return len(bindings)
    finally:
        await client.close()
