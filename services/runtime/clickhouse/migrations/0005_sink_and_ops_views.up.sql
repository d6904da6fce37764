-- The feedback sink's event-id index, and the ops consoles over ClickHouse (README: "Ops consoles over
-- ClickHouse"). Every view reads the tables deduplicated (FINAL), so a redelivered event never counts
-- twice, merged or not.

-- The feedback sink asks, before each insert, which of a batch's event ids are stored already (so a
-- redelivered or republished event is not inserted twice, even before merges). The tables are ordered by
-- model/inference, not by event_id: a bloom filter lets that lookup skip the granules that cannot hold
-- the ids. Parts written before this migration have no index and are read in full until they merge.
ALTER TABLE inference_log ADD INDEX IF NOT EXISTS idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1;
ALTER TABLE feedback ADD INDEX IF NOT EXISTS idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1;


-- Prices behind the cost estimate, per model; the latest row per model wins. Unpriced models cost 0.
CREATE TABLE IF NOT EXISTS model_price
(
    model_name LowCardinality(String),
    usd_per_1k_input_tokens Float64,
    usd_per_1k_output_tokens Float64,
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY model_name
SETTINGS non_replicated_deduplication_window = 1000;

-- Feedback with the inference it is about. Feedback can arrive before its inference is stored: it is
-- kept, shows here with inference_stored = 0, and joins by itself once the inference lands.
CREATE VIEW IF NOT EXISTS feedback_with_inference AS
SELECT
    f.feedback_id AS feedback_id,
    f.inference_id AS inference_id,
    f.occurred_at AS feedback_at,
    f.thumbs AS thumbs,
    f.rating AS rating,
    f.comment AS comment,
    f.correction AS correction,
    f.tags AS tags,
    f.source AS source,
    f.actor AS actor,
    i.inference_id != '' AS inference_stored,
    i.occurred_at AS inference_at,
    i.model_name AS model_name,
    i.adapter_version AS adapter_version,
    i.prompt_name AS prompt_name,
    i.prompt_version AS prompt_version,
    i.route AS route,
    i.input_text AS input_text,
    i.output_text AS output_text
FROM (SELECT * FROM feedback FINAL) AS f
LEFT JOIN (SELECT * FROM inference_log FINAL) AS i ON f.inference_id = i.inference_id;

-- Feedback whose inference is not stored (yet), with how long it has waited: a few seconds is normal
-- (separate topics), hours mean the app never logged that inference or logged it under another id.
CREATE VIEW IF NOT EXISTS feedback_awaiting_inference AS
SELECT
    feedback_id,
    inference_id,
    occurred_at,
    dateDiff('second', occurred_at, now64(3)) AS waiting_s,
    source,
    actor
FROM feedback FINAL
WHERE inference_id NOT IN (SELECT inference_id FROM inference_log);

-- Per model, adapter version, prompt version and time bucket: traffic, errors, latency, tokens, cost
-- and the feedback signals. Parameterised by the bucket width in seconds:
--   SELECT * FROM inference_metrics(bucket_s = 3600) WHERE bucket >= now() - INTERVAL 1 DAY
CREATE VIEW IF NOT EXISTS inference_metrics AS
SELECT
    toDateTime(toStartOfInterval(toDateTime(i.occurred_at, 'UTC'), toIntervalSecond({bucket_s:UInt32})), 'UTC') AS bucket,
    i.model_name AS model_name,
    i.adapter_version AS adapter_version,
    i.prompt_name AS prompt_name,
    i.prompt_version AS prompt_version,
    count() AS requests,
    countIf(i.status = 'error') / count() AS error_rate,
    quantile(0.5)(i.latency_total_ms) AS latency_p50_ms,
    quantile(0.95)(i.latency_total_ms) AS latency_p95_ms,
    quantile(0.99)(i.latency_total_ms) AS latency_p99_ms,
    sum(i.prompt_tokens) AS tokens_in,
    sum(i.completion_tokens) AS tokens_out,
    sum(i.prompt_tokens / 1000 * p.input_price + i.completion_tokens / 1000 * p.output_price) AS cost_usd,
    countIf(fb.feedback_count > 0) / count() AS feedback_coverage,
    sum(fb.thumbs_down) / nullIf(sum(fb.thumbs_given), 0) AS thumbs_down_rate,
    sum(fb.rating_sum) / nullIf(sum(fb.ratings_given), 0) AS mean_rating
FROM (SELECT * FROM inference_log FINAL) AS i
LEFT JOIN
(
    SELECT
        inference_id,
        count() AS feedback_count,
        countIf(thumbs = 'down') AS thumbs_down,
        countIf(thumbs IS NOT NULL) AS thumbs_given,
        sum(ifNull(rating, 0)) AS rating_sum,
        count(rating) AS ratings_given
    FROM feedback FINAL
    GROUP BY inference_id
) AS fb ON i.inference_id = fb.inference_id
LEFT JOIN
(
    SELECT
        model_name,
        argMax(usd_per_1k_input_tokens, updated_at) AS input_price,
        argMax(usd_per_1k_output_tokens, updated_at) AS output_price
    FROM model_price
    GROUP BY model_name
) AS p ON i.model_name = p.model_name
GROUP BY bucket, model_name, adapter_version, prompt_name, prompt_version;
