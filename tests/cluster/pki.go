package main

// The test cluster's keys and certificates: one CA that signs the API server's serving
// certificate and the admin's client certificate (and that the API server trusts for client
// certificates), and the key pair that signs and verifies ServiceAccount tokens. All are made
// fresh at every start and live only in the cluster's state directory.

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki holds the paths of the files the API server and the kubeconfig need.
type pki struct {
	CACert, ServingCert, ServingKey, AdminCert, AdminKey, SAKey, SAPub string
	caPEM, adminCertPEM, adminKeyPEM                                   []byte
}

// A certificate with its key, kept in memory while the PKI is made.
type issued struct {
	cert *x509.Certificate
	key  crypto.Signer
	der  []byte
}

func newKey() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }

func serial() (*big.Int, error) { return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126)) }

// sign makes a certificate from template, signed by parent (self-signed when parent is nil).
func sign(template *x509.Certificate, parent *issued) (*issued, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	if template.SerialNumber, err = serial(); err != nil {
		return nil, err
	}
	now := time.Now()
	template.NotBefore = now.Add(-time.Hour)
	template.NotAfter = now.Add(7 * 24 * time.Hour)
	signerCert, signerKey := template, crypto.Signer(key)
	if parent != nil {
		signerCert, signerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, signerCert, key.Public(), signerKey)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &issued{cert: cert, key: key, der: der}, nil
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func write(path string, data []byte) error { return os.WriteFile(path, data, 0o600) }

// makePKI writes the CA, the serving pair, the admin client pair (group system:masters) and the
// ServiceAccount key pair into dir.
func makePKI(dir string) (*pki, error) {
	p := &pki{
		CACert:      filepath.Join(dir, "ca.crt"),
		ServingCert: filepath.Join(dir, "apiserver.crt"),
		ServingKey:  filepath.Join(dir, "apiserver.key"),
		AdminCert:   filepath.Join(dir, "admin.crt"),
		AdminKey:    filepath.Join(dir, "admin.key"),
		SAKey:       filepath.Join(dir, "sa.key"),
		SAPub:       filepath.Join(dir, "sa.pub"),
	}
	ca, err := sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "switchboard-test-cluster-ca"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}, nil)
	if err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}
	serving, err := sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}, ca)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	admin, err := sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "switchboard-admin", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca)
	if err != nil {
		return nil, fmt.Errorf("admin certificate: %w", err)
	}
	saKey, err := newKey()
	if err != nil {
		return nil, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, err
	}
	p.caPEM = certPEM(ca.der)
	p.adminCertPEM = certPEM(admin.der)
	servingKey, err := keyPEM(serving.key)
	if err != nil {
		return nil, err
	}
	if p.adminKeyPEM, err = keyPEM(admin.key); err != nil {
		return nil, err
	}
	saKeyPEM, err := keyPEM(saKey)
	if err != nil {
		return nil, err
	}
	for path, data := range map[string][]byte{
		p.CACert:      p.caPEM,
		p.ServingCert: certPEM(serving.der),
		p.ServingKey:  servingKey,
		p.AdminCert:   p.adminCertPEM,
		p.AdminKey:    p.adminKeyPEM,
		p.SAKey:       saKeyPEM,
		p.SAPub:       pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPubDER}),
	} {
		if err := write(path, data); err != nil {
			return nil, err
		}
	}
	return p, nil
}
