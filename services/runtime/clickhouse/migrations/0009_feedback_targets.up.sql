-- Feedback on a span, a trace or a session, not only on an inference (feedback.received's trace_id, span_id
-- and session_id), and the views that join it. A row names one target: inference_id, or '' there and
-- trace_id with span_id (a span), trace_id alone (a trace) or session_id (a session).
--
-- The table is ordered by (inference_id, feedback_id), so the rows with inference_id = '' are one range of
-- the primary key: the views below read them with `inference_id = ''`, which skips every granule of
-- inference feedback, instead of needing an index of their own.

ALTER TABLE feedback ADD COLUMN IF NOT EXISTS trace_id Nullable(String) AFTER inference_id;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS span_id Nullable(String) AFTER trace_id;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS session_id Nullable(String) AFTER span_id;

-- As in 0008, with the feedback given on the trace itself or on any of its spans counted beside the
-- feedback on the inferences of the trace (one a span names, or one the gateway logged with the trace's
-- id). Each feedback row has one target, so none counts twice.
--
-- And one model call counted once. An app's client span of an LLM call (OpenInference's, say) and the
-- span of the server that answered it (Flywheel's gateway, under it in the same trace) are two llm spans
-- of one call, both with its token usage: summed, a trace's tokens came out doubled. So llm_span_count
-- counts the innermost llm spans (those no other llm span is under); tokens of an llm span whose llm
-- child reports tokens are left to the child; a cost of an llm span whose llm parent reports a cost is
-- left to the parent (clients price calls; servers rarely do).
CREATE OR REPLACE VIEW trace_summary AS
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
    length(arrayFilter(call -> NOT has(s.llm_parents, call.1), s.llm_spans)) AS llm_span_count,
    s.other_tokens_in + arraySum(arrayMap(call -> if(has(s.token_reporting_parents, call.1), 0, call.2), s.llm_spans)) AS prompt_tokens,
    s.other_tokens_out + arraySum(arrayMap(call -> if(has(s.token_reporting_parents, call.1), 0, call.3), s.llm_spans)) AS completion_tokens,
    if(
        s.reported_costs = 0,
        NULL,
        s.other_cost + arraySum(arrayMap(call -> if(has(s.costed_llm_spans, call.5), 0, ifNull(call.4, 0)), s.llm_spans))
    ) AS cost_usd,
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
        groupArrayIf((span_id, prompt_tokens, completion_tokens, cost_usd, ifNull(parent_span_id, '')), kind = 'llm') AS llm_spans,
        groupArrayIf(assumeNotNull(parent_span_id), kind = 'llm' AND parent_span_id IS NOT NULL) AS llm_parents,
        groupArrayIf(
            assumeNotNull(parent_span_id), kind = 'llm' AND parent_span_id IS NOT NULL AND prompt_tokens + completion_tokens > 0
        ) AS token_reporting_parents,
        groupArrayIf(span_id, kind = 'llm' AND cost_usd > 0) AS costed_llm_spans,
        sumIf(prompt_tokens, kind != 'llm') AS other_tokens_in,
        sumIf(completion_tokens, kind != 'llm') AS other_tokens_out,
        sumIf(ifNull(cost_usd, 0), kind != 'llm') AS other_cost,
        count(cost_usd) AS reported_costs,
        countIf(status = 'error') AS error_spans
    FROM span FINAL
    GROUP BY trace_id
) AS s
LEFT JOIN
(
    SELECT
        trace_id,
        count() AS feedback_count,
        countIf(thumbs = 'up') AS thumbs_up,
        countIf(thumbs = 'down') AS thumbs_down,
        avg(rating) AS mean_rating
    FROM
    (
        SELECT t.trace_id AS trace_id, f.thumbs AS thumbs, f.rating AS rating
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
        INNER JOIN (SELECT inference_id, thumbs, rating FROM feedback FINAL WHERE inference_id != '') AS f
            ON t.inference_id = f.inference_id
        UNION ALL
        SELECT assumeNotNull(trace_id) AS trace_id, thumbs, rating
        FROM feedback FINAL
        WHERE inference_id = '' AND trace_id IS NOT NULL
    )
    GROUP BY trace_id
) AS fb ON s.trace_id = fb.trace_id;

-- As in 0008, and feedback on the session as a whole: feedback_count and thumbs_down count everything
-- given within the session (on it, its traces, their spans and inferences), the session_ columns what was
-- given on the session itself.
CREATE OR REPLACE VIEW session_summary AS
SELECT
    t.session_id AS session_id,
    t.traces AS traces,
    t.turns AS turns,
    t.services AS services,
    t.first_at AS first_at,
    t.last_at AS last_at,
    t.duration_ms AS duration_ms,
    t.span_count AS span_count,
    t.prompt_tokens AS prompt_tokens,
    t.completion_tokens AS completion_tokens,
    t.cost_usd AS cost_usd,
    t.error_spans AS error_spans,
    t.errored_traces AS errored_traces,
    t.trace_feedback + sf.session_feedback AS feedback_count,
    t.trace_thumbs_down + sf.session_thumbs_down AS thumbs_down,
    sf.session_feedback AS session_feedback,
    sf.session_thumbs_up AS session_thumbs_up,
    sf.session_thumbs_down AS session_thumbs_down,
    sf.session_mean_rating AS session_mean_rating
FROM
(
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
        sum(feedback_count) AS trace_feedback,
        sum(thumbs_down) AS trace_thumbs_down
    FROM (SELECT * FROM trace_summary WHERE session_id IS NOT NULL)
    GROUP BY session_id
) AS t
LEFT JOIN
(
    SELECT
        assumeNotNull(session_id) AS session_id,
        count() AS session_feedback,
        countIf(thumbs = 'up') AS session_thumbs_up,
        countIf(thumbs = 'down') AS session_thumbs_down,
        avg(rating) AS session_mean_rating
    FROM feedback FINAL
    WHERE inference_id = '' AND session_id IS NOT NULL
    GROUP BY session_id
) AS sf ON t.session_id = sf.session_id;

-- As in 0005, about inference feedback only: feedback on a span, trace or session has no inference to
-- join, and would otherwise be listed as waiting for one forever.
CREATE OR REPLACE VIEW feedback_with_inference AS
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
FROM (SELECT * FROM feedback FINAL WHERE inference_id != '') AS f
LEFT JOIN (SELECT * FROM inference_log FINAL) AS i ON f.inference_id = i.inference_id;

CREATE OR REPLACE VIEW feedback_awaiting_inference AS
SELECT
    feedback_id,
    inference_id,
    occurred_at,
    dateDiff('second', occurred_at, now64(3)) AS waiting_s,
    source,
    actor
FROM feedback FINAL
WHERE inference_id != '' AND inference_id NOT IN (SELECT inference_id FROM inference_log);
