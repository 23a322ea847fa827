-- How a release's process types are to be scheduled, from app.json's
-- `formation.TYPE.stop_after_disconnect` (seconds): {"worker":
-- {"stop_after_disconnect": 30}}. The scheduler passes it to the runners with
-- every start; a config change or a rollback keeps the copied release's.
ALTER TABLE api_releases ADD COLUMN scheduling jsonb NOT NULL DEFAULT '{}'::jsonb;
