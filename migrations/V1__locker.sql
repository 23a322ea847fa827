-- Named leases with TTL, held by the locker daemon.
CREATE TABLE locks (
    name        text PRIMARY KEY,
    owner       text NOT NULL,
    token       bigint NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz NOT NULL
);

-- The fencing counter: one row, bumped inside every granting transaction, so every
-- grant of any lock gets a larger token than every grant before it (a sequence may
-- be cached and is not transactional, so it is not used).
CREATE TABLE lock_fencing (
    id    integer PRIMARY KEY CHECK (id = 1),
    value bigint NOT NULL
);
INSERT INTO lock_fencing (id, value) VALUES (1, 0);
