-- The api's tables: people, their keys, apps and everything an app has.
-- Only paddock-api reads or writes them; other daemons use its cluster-key kinds.

CREATE TABLE api_users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    admin       boolean NOT NULL DEFAULT false,
    disabled    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Protocol keys. The secret is never stored: it is HKDF(user_key_secret, key_id).
-- curve_public is the user's CURVE client key, admitted by the api's rpc socket.
CREATE TABLE api_keys (
    key_id       text PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES api_users ON DELETE CASCADE,
    curve_public text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- SSH public keys for git push, unique across users by their SHA256 fingerprint.
CREATE TABLE api_ssh_keys (
    fingerprint text PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES api_users ON DELETE CASCADE,
    algorithm   text NOT NULL,
    public_key  text NOT NULL,
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_ssh_keys_user ON api_ssh_keys (user_id);

-- next_release is the per-app release counter: bumped in the transaction that
-- inserts the release, under the app row's lock, so versions have no gaps.
-- config is the app's config now (the latest release's snapshot).
CREATE TABLE api_apps (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    owner_id        bigint NOT NULL REFERENCES api_users,
    config          jsonb NOT NULL DEFAULT '{}',
    next_release    integer NOT NULL DEFAULT 1,
    current_release integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_access (
    app_id  bigint NOT NULL REFERENCES api_apps ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES api_users ON DELETE CASCADE,
    role    text NOT NULL CHECK (role IN ('owner', 'collaborator')),
    PRIMARY KEY (app_id, user_id)
);
CREATE INDEX api_access_user ON api_access (user_id);

CREATE TABLE api_releases (
    app_id         bigint NOT NULL REFERENCES api_apps ON DELETE CASCADE,
    version        integer NOT NULL,
    slug           text,
    process_types  jsonb NOT NULL DEFAULT '{}',
    config         jsonb NOT NULL DEFAULT '{}',
    healthchecks   jsonb NOT NULL DEFAULT '{}',
    description    text NOT NULL,
    created_by     text NOT NULL,
    status         text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    status_message text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, version)
);

CREATE TABLE api_formation (
    app_id       bigint NOT NULL REFERENCES api_apps ON DELETE CASCADE,
    process_type text NOT NULL,
    quantity     integer NOT NULL,
    memory_mb    integer NOT NULL,
    pids         integer NOT NULL,
    PRIMARY KEY (app_id, process_type)
);

CREATE TABLE api_domains (
    domain     text PRIMARY KEY,
    app_id     bigint NOT NULL REFERENCES api_apps ON DELETE CASCADE,
    is_default boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_domains_app ON api_domains (app_id);

-- Kept when an app or user goes: the log outlives what it describes. No values of
-- config vars or secrets ever go into detail. An app's log is found by app_id (no
-- foreign key: the rows outlive the app), never by name: a destroyed app's name
-- may be taken again, and its new owner must not read the old app's log.
CREATE TABLE api_audit (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    key_id  text NOT NULL,
    kind    text NOT NULL,
    app     text,
    app_id  bigint,
    detail  jsonb NOT NULL DEFAULT '{}',
    -- The id of the message that made the change: a resend of it after the api
    -- restarted (its replay cache gone) is refused instead of acted on twice.
    request_id text
);
CREATE UNIQUE INDEX api_audit_request ON api_audit (key_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX api_audit_app ON api_audit (app_id, id);
CREATE INDEX api_audit_actor ON api_audit (actor, id);
