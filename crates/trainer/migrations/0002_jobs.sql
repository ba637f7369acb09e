-- Training jobs. One runs at a time across every replica: the `job_lock` setting names it.
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    state           TEXT NOT NULL,    -- running | trained | failed
    trigger         TEXT NOT NULL,    -- the policy's decision (JSON), or {"trigger": "manual"}
    labels_at_start BIGINT NOT NULL,  -- labels that counted when it started (the count trigger's base)
    exported        BIGINT NOT NULL,  -- training images handed to the job
    singan          BIGINT NOT NULL,  -- 1: SinGAN on
    architecture    TEXT NOT NULL,
    version         TEXT NOT NULL,    -- the candidate's version
    started_at      BIGINT NOT NULL,
    heartbeat_at    BIGINT NOT NULL,
    finished_at     BIGINT,
    outcome         TEXT NOT NULL
);
CREATE INDEX jobs_started ON jobs (started_at);
