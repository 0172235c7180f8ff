-- What `doctor` has checked, for its incremental runs (SPEC 16). One row per source:
-- every row of that table with an id up to checked_id (sessions: created up to
-- checked_at) was seen by a clean run. Written only after a clean run, and only up to
-- what no transaction still in flight at the start of that run can add to.
CREATE TABLE IF NOT EXISTS doctor_watermarks (
    source      text        NOT NULL,
    checked_id  bigint,
    checked_at  timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    full_run    boolean     NOT NULL DEFAULT false,
    CONSTRAINT doctor_watermarks_pkey PRIMARY KEY (source)
);
