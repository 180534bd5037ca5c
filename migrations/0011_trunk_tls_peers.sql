-- Who may call in over mutual TLS on a certificate-auth trunk: tls.peerNames (DNS or sip: URI
-- subject alternative names, or the subject CN of a certificate without either; the chain must
-- reach the trunk's CA) and tls.peerFingerprints (SHA-256 of certificates pinned as they are,
-- colon hex). Existing trunks name no peers: their inbound calls stay admitted as before.

ALTER TABLE trunks
    ADD COLUMN tls_peer_names TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN tls_peer_fingerprints TEXT[] NOT NULL DEFAULT '{}';
