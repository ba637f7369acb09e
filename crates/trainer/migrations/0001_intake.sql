-- Label intake. Portable SQL: the same text runs on SQLite and PostgreSQL (integers are
-- BIGINT, times are milliseconds since the epoch, flags are nullable times).

-- Enrolled devices, by the identity key `octd provision` created.
CREATE TABLE devices (
    key_id      TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    device      TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    revoked_at  BIGINT
);
-- One active key per device; a revoked device may be enrolled again with a new key.
CREATE UNIQUE INDEX devices_active ON devices (site, device) WHERE revoked_at IS NULL;

-- Nonces seen within the clock-skew window: a replayed request is refused.
CREATE TABLE nonces (
    key_id  TEXT NOT NULL,
    nonce   TEXT NOT NULL,
    seen_at BIGINT NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX nonces_seen ON nonces (seen_at);

-- De-identified images by content hash; the bytes are in the object store.
CREATE TABLE images (
    sha256      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    width       BIGINT NOT NULL,
    height      BIGINT NOT NULL,
    frames      BIGINT NOT NULL,
    site        TEXT NOT NULL,
    device      TEXT NOT NULL,
    received_at BIGINT NOT NULL
);

-- Every revision of every confirmed label; the highest revision of a scan counts.
CREATE TABLE labels (
    site          TEXT NOT NULL,
    device        TEXT NOT NULL,
    scan_id       TEXT NOT NULL,
    revision      BIGINT NOT NULL,
    label         TEXT NOT NULL,
    predicted     TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    model_name    TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256  TEXT NOT NULL,
    reviewer      TEXT NOT NULL,
    reviewed_at   TEXT NOT NULL,
    laterality    TEXT NOT NULL,
    patient       TEXT NOT NULL,
    image_sha256  TEXT NOT NULL REFERENCES images (sha256),
    body_sha256   TEXT NOT NULL,
    received_at   BIGINT NOT NULL,
    PRIMARY KEY (site, device, scan_id, revision)
);
CREATE INDEX labels_received ON labels (received_at);

-- The fixed, patient-disjoint split: a patient is assigned once, at its first label.
CREATE TABLE patients (
    site        TEXT NOT NULL,
    device      TEXT NOT NULL,
    patient     TEXT NOT NULL,
    split       TEXT NOT NULL,
    assigned_at BIGINT NOT NULL,
    PRIMARY KEY (site, device, patient)
);

-- Service-wide settings shared by every replica (the key of the patient split).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
