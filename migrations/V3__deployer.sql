-- Builds, owned by the deployer: one row per build.start, its outcome and its
-- whole log (appended in batches while it runs).
CREATE TABLE deployer_builds (
    id          text PRIMARY KEY,
    app         text NOT NULL,
    commit      text NOT NULL,
    source      text NOT NULL,
    ref         text NOT NULL DEFAULT '',
    pusher      text NOT NULL DEFAULT '',
    node        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    -- The step running now, or the one that failed.
    step        text,
    error       jsonb,
    release     jsonb,
    durations   jsonb NOT NULL DEFAULT '{}',
    log         text NOT NULL DEFAULT '',
    log_lines   integer NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE INDEX deployer_builds_app ON deployer_builds (app, started_at DESC);
-- At most one running build per app, whichever deployer runs it.
CREATE UNIQUE INDEX deployer_builds_one_running ON deployer_builds (app) WHERE status = 'running';
