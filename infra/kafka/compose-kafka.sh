#!/bin/sh
# The Kafka container of docker-compose.yml, secured: SASL/SCRAM-SHA-512 on the client listeners, the
# StandardAuthorizer with no access without an ACL, one principal per service (infra/kafka_acls.py).
#
# Written out here rather than through the image's KAFKA_* variables because SCRAM credentials can only
# be bootstrapped when the storage is formatted (KIP-900: `kafka-storage format --add-scram`), which the
# image's own start script does not offer. The ACLs are granted afterwards by the `kafka-acls` one-shot
# (`flywheel infra acls`) as the admin. Passwords come from the environment and never reach the log.
set -eu

config=/tmp/flywheel-server.properties
admin_client=/tmp/flywheel-admin.properties
umask 077  # both files hold the admin's password

# The controller listens on loopback only, with SASL/PLAIN and one static user, `controller`, whose
# password is new at every start (SCRAM credentials live in the metadata the controller serves, so it
# cannot check them itself): nothing reaches it anonymously, and the broker does as a super user.
controller_password=$(cat /proc/sys/kernel/random/uuid)
cat > "$config" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@localhost:9093
controller.listener.names=CONTROLLER
listeners=INTERNAL://:9092,CONTROLLER://localhost:9093,HOST://:9094
advertised.listeners=INTERNAL://kafka:9092,HOST://localhost:9094
listener.security.protocol.map=INTERNAL:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT,HOST:SASL_PLAINTEXT
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.internal.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="${KAFKA_ADMIN_PASSWORD}";
listener.name.host.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="controller" password="${controller_password}" user_controller="${controller_password}";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin;User:controller
allow.everyone.if.no.acl.found=false
log.dirs=${KAFKA_LOG_DIRS}
num.partitions=1
auto.create.topics.enable=${KAFKA_AUTO_CREATE_TOPICS_ENABLE}
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
EOF

cat > "$admin_client" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="${KAFKA_ADMIN_PASSWORD}";
EOF

# Credentials are added only when the volume is formatted for the first time (--ignore-formatted keeps
# an existing one as it is): to change a password later, use kafka-configs.sh --alter as the admin.
# Passwords must be URL-safe (no quote, comma, bracket or space): they sit in SCRAM and JAAS syntax.
scram() { printf '%s\n' "--add-scram" "SCRAM-SHA-512=[name=$1,password=$2]"; }
IFS='
'
set -- \
  $(scram admin "$KAFKA_ADMIN_PASSWORD") \
  $(scram registry "$KAFKA_REGISTRY_PASSWORD") \
  $(scram trainer "$KAFKA_TRAINER_PASSWORD") \
  $(scram evaluator "$KAFKA_EVALUATOR_PASSWORD") \
  $(scram serving "$KAFKA_SERVING_PASSWORD") \
  $(scram feedback "$KAFKA_FEEDBACK_PASSWORD") \
  $(scram monitor "$KAFKA_MONITOR_PASSWORD") \
  $(scram app "$KAFKA_APP_PASSWORD") \
  $(scram flywheel "$KAFKA_FLYWHEEL_PASSWORD")
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted -t "$CLUSTER_ID" -c "$config" "$@" > /dev/null
exec /opt/kafka/bin/kafka-server-start.sh "$config"
