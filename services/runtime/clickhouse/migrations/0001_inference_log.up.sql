-- One row per inference: a redelivered inference.logged event has the same (model_name, inference_id)
-- and collapses on merge and under FINAL. Prompt and output text expire first: they are the bulk of the
-- bytes, while the numbers behind dashboards stay.
CREATE TABLE IF NOT EXISTS inference_log
(
    event_id UUID,
    occurred_at DateTime64(3, 'UTC'),
    producer LowCardinality(String),
    correlation_id String,
    inference_id String,
    model_name LowCardinality(String),
    adapter_version Nullable(UInt32),
    prompt_name LowCardinality(Nullable(String)),
    prompt_version Nullable(UInt32),
    route LowCardinality(String),
    endpoint LowCardinality(String),
    user_id Nullable(String),
    principal Nullable(String),
    input_messages String TTL toDateTime(occurred_at) + INTERVAL 90 DAY COMMENT 'JSON array of {role, content}',
    input_text String TTL toDateTime(occurred_at) + INTERVAL 90 DAY,
    output_text String TTL toDateTime(occurred_at) + INTERVAL 90 DAY,
    finish_reason LowCardinality(Nullable(String)),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    latency_queue_ms Float64,
    latency_compute_ms Float64,
    latency_total_ms Float64,
    status LowCardinality(String),
    error Nullable(String),
    started_at Nullable(DateTime64(3, 'UTC')),
    metadata Map(String, String),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (model_name, inference_id)
SETTINGS non_replicated_deduplication_window = 1000;
