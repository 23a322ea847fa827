-- Buildpacks uploaded to the blobstore by an operator (`paddock buildpacks add`):
-- a name the deployer resolves (`BUILDPACK_URL=paddock:NAME`, or a bare NAME in
-- `.buildpacks`) to the blob that holds the buildpack's tar.gz. Only paddock-api
-- reads or writes it; the blobstore's GC keeps every blob named here
-- (`blob.referenced`).
CREATE TABLE api_buildpacks (
    name       text PRIMARY KEY CHECK (name ~ '^[a-z0-9-]{1,40}$'),
    blob       text NOT NULL,
    -- Where the buildpack came from (informational), e.g. its git URL.
    url        text,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

