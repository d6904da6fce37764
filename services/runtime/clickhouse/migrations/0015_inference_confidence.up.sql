-- How sure the model was of each answer (services/runtime/inference.py): the mean and the lowest
-- log-probability of its tokens. Review queues put the least confident answers first; NULL for calls
-- that generated nothing (errors, cache replays) and for calls logged before this column existed.
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS mean_token_logprob Nullable(Float32) AFTER guard_policy;
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS min_token_logprob Nullable(Float32) AFTER mean_token_logprob;
