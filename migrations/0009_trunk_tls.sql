-- A trunk's own TLS material, resolved by the operator from Kubernetes Secrets (or local-mode
-- Secret files): the client certificate and key it presents on outbound TLS connections
-- (tls.clientCertSecretRef, authMethod certificate) and the CA its gateways' certificates must
-- chain to (tls.caSecretRef). One row per trunk that has either; like credentials, readable by
-- nodes only.

CREATE TABLE trunk_tls (
    namespace          TEXT NOT NULL,
    trunk_name         TEXT NOT NULL,
    client_cert_pem    TEXT,
    client_key_pem     TEXT,
    ca_pem             TEXT,
    client_secret_name TEXT,
    ca_secret_name     TEXT,
    config_generation  BIGINT NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, trunk_name),
    CHECK ((client_cert_pem IS NULL) = (client_key_pem IS NULL))
);
