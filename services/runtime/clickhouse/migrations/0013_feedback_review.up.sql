-- A reviewer's feedback given in a review queue (services/feedback/review.py): the queue and item it was
-- given on, the rubric version it was scored on (`name:vN`) and the score of each rubric dimension, so
-- reviews can be read beside every other piece of feedback. Empty for feedback given anywhere else.
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS queue LowCardinality(Nullable(String)) AFTER actor;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS item_id Nullable(String) AFTER queue;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS rubric LowCardinality(Nullable(String)) AFTER item_id;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS scores Map(LowCardinality(String), String) AFTER rubric;
