-- Traces of multi-step pipelines: the spans of span.logged, the trace an inference belongs to, and a
-- summary per trace and per session. Like the other ops views, the views read FINAL, so neither a
-- redelivered event nor a span the app's exporter sent twice counts twice.

-- An inference's place in a trace, when the caller sent a traceparent or the gateway opened one.
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS trace_id Nullable(String) AFTER metadata;
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS span_id Nullable(String) AFTER trace_id;
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS session_id Nullable(String) AFTER span_id;

-- One row per (trace_id, span_id): the sink stores each event once (by event_id), and an OTLP exporter
-- that retries a whole request sends the same spans under new event ids, which collapse on merge and
-- under FINAL. Input and output expire first, as in inference_log; timings, tokens, cost and status stay.
CREATE TABLE IF NOT EXISTS span
(
    event_id UUID,
    occurred_at DateTime64(3, 'UTC'),
    producer LowCardinality(String),
    correlation_id String,
    trace_id String,
    span_id String,
    parent_span_id Nullable(String) COMMENT 'NULL for a trace''s root',
    session_id Nullable(String),
    name String,
    kind LowCardinality(String) COMMENT 'llm, retrieval, tool, chain, agent, embedding, reranker, guardrail, evaluator or unknown',
    service_name LowCardinality(Nullable(String)),
    started_at DateTime64(6, 'UTC'),
    ended_at DateTime64(6, 'UTC'),
    duration_ms Float64 DEFAULT (toUnixTimestamp64Micro(ended_at) - toUnixTimestamp64Micro(started_at)) / 1000,
    status LowCardinality(String) COMMENT 'unset, ok or error',
    error Nullable(String),
    model_name LowCardinality(Nullable(String)),
    adapter_version Nullable(UInt32),
    inference_id Nullable(String),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    cost_usd Nullable(Float64),
    input_text String TTL toDateTime(occurred_at) + INTERVAL 90 DAY,
    output_text String TTL toDateTime(occurred_at) + INTERVAL 90 DAY,
    truncated Bool COMMENT 'input or output was cut at intake',
    user_id Nullable(String),
    principal Nullable(String),
    attributes Map(String, String),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    -- The sink's already-stored check looks spans up by event id; sessions are read by session id.
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_session_id session_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (trace_id, span_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- One row per trace. The root is the span without a parent; while it is not stored (spans of one trace
-- arrive in any order, and an app may export only part of a trace) the earliest span stands in for it
-- and root_spans is 0. Feedback counts when it is about an inference of the trace: one a span names
-- (inference_id), or one the gateway logged with the trace's id.
CREATE VIEW IF NOT EXISTS trace_summary AS
SELECT
    s.trace_id AS trace_id,
    s.root_name AS root_name,
    s.root_service AS service_name,
    s.trace_session AS session_id,
    s.first_start AS started_at,
    s.last_end AS ended_at,
    (toUnixTimestamp64Micro(s.last_end) - toUnixTimestamp64Micro(s.first_start)) / 1000 AS duration_ms,
    s.root_spans AS root_spans,
    s.span_count AS span_count,
    s.llm_span_count AS llm_span_count,
    s.tokens_in AS prompt_tokens,
    s.tokens_out AS completion_tokens,
    s.reported_cost AS cost_usd,
    s.error_spans AS error_spans,
    s.error_spans > 0 AS errored,
    fb.feedback_count AS feedback_count,
    fb.thumbs_up AS thumbs_up,
    fb.thumbs_down AS thumbs_down,
    fb.mean_rating AS mean_rating
FROM
(
    SELECT
        trace_id,
        if(countIf(parent_span_id IS NULL) > 0, argMinIf(name, started_at, parent_span_id IS NULL), argMin(name, started_at)) AS root_name,
        if(countIf(parent_span_id IS NULL) > 0, argMinIf(service_name, started_at, parent_span_id IS NULL), argMin(service_name, started_at)) AS root_service,
        min(session_id) AS trace_session,
        min(started_at) AS first_start,
        max(ended_at) AS last_end,
        countIf(parent_span_id IS NULL) AS root_spans,
        count() AS span_count,
        countIf(kind = 'llm') AS llm_span_count,
        sum(prompt_tokens) AS tokens_in,
        sum(completion_tokens) AS tokens_out,
        sum(cost_usd) AS reported_cost,
        countIf(status = 'error') AS error_spans
    FROM span FINAL
    GROUP BY trace_id
) AS s
LEFT JOIN
(
    SELECT
        t.trace_id AS trace_id,
        count() AS feedback_count,
        countIf(f.thumbs = 'up') AS thumbs_up,
        countIf(f.thumbs = 'down') AS thumbs_down,
        avg(f.rating) AS mean_rating
    FROM
    (
        -- DISTINCT folds copies of a row as FINAL would, without merging every part on read.
        SELECT DISTINCT trace_id, inference_id
        FROM
        (
            SELECT trace_id, assumeNotNull(inference_id) AS inference_id FROM span WHERE inference_id IS NOT NULL
            UNION ALL
            SELECT assumeNotNull(trace_id) AS trace_id, inference_id FROM inference_log WHERE trace_id IS NOT NULL
        )
    ) AS t
    INNER JOIN (SELECT inference_id, thumbs, rating FROM feedback FINAL) AS f ON t.inference_id = f.inference_id
    GROUP BY t.trace_id
) AS fb ON s.trace_id = fb.trace_id;

-- One row per session: its traces, its turns (root spans: one per exchange of a conversation), when
-- it began and last moved, and its traces' sums.
CREATE VIEW IF NOT EXISTS session_summary AS
SELECT
    assumeNotNull(session_id) AS session_id,
    count() AS traces,
    sum(root_spans) AS turns,
    arraySort(groupUniqArray(service_name)) AS services,
    min(started_at) AS first_at,
    max(ended_at) AS last_at,
    (toUnixTimestamp64Micro(max(ended_at)) - toUnixTimestamp64Micro(min(started_at))) / 1000 AS duration_ms,
    sum(span_count) AS span_count,
    sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens,
    sum(cost_usd) AS cost_usd,
    sum(error_spans) AS error_spans,
    countIf(errored) AS errored_traces,
    sum(feedback_count) AS feedback_count,
    sum(thumbs_down) AS thumbs_down
FROM (SELECT * FROM trace_summary WHERE session_id IS NOT NULL)
GROUP BY session_id;
