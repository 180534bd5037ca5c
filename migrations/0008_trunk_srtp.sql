-- A trunk's media.srtp: whether its call legs use SRTP with SDES keys (RFC 4568). Existing
-- trunks keep plain RTP.

ALTER TABLE trunks ADD COLUMN srtp TEXT NOT NULL DEFAULT 'disabled' CHECK (srtp IN ('required', 'optional', 'disabled'));
