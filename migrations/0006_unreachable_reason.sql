-- Why a node finds a trunk's gateway unreachable, beside the OPTIONS keepalive's yes/no: over
-- TLS a refused handshake says more than silence (an untrusted or expired certificate, a name
-- the certificate does not carry). The operator puts it into the trunk's Reachable=False
-- message. NULL when reachable or when the node has no reason beyond "no answer".

ALTER TABLE registrations ADD COLUMN unreachable_reason TEXT;
