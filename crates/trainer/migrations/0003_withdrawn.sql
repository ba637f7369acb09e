-- A revision by which the reviewer took their verdict back: the scan has no label from it on.
ALTER TABLE labels ADD COLUMN withdrawn BIGINT NOT NULL DEFAULT 0;
