-- A reviewer's pairwise choice (services/feedback/review.py, a `pairs` queue): the feedback is on the
-- answer chosen and names the answer it was preferred to, or on the first answer shown and names the one
-- it tied with. Preference datasets read them as `pairwise` pairs. Empty for every other feedback.
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS preferred_over Nullable(String) AFTER scores;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS tied_with Nullable(String) AFTER preferred_over;
