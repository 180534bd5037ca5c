// Command switchboard-test-cluster runs a real Kubernetes control plane for Switchboard's
// end-to-end tests in one process: an embedded etcd and kube-apiserver (k8s.io/kubernetes, the
// release named in go.mod), both on loopback with ports chosen at start. It makes a fresh CA,
// serving and admin certificates and a ServiceAccount signing key, authorizes with RBAC, and
// writes an admin kubeconfig (client certificate in group system:masters). There are no nodes,
// kubelets or controllers: the tests need the API (CRDs, CEL, RBAC, Leases, Events, tokens),
// not pods.
//
// SIGTERM or SIGINT stops the API server, then etcd, then removes the state directory, so
// nothing is left behind. Usage:
//
//	switchboard-test-cluster --dir DIR [--kubeconfig PATH] [--port N]
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "switchboard-test-cluster: %v\n", err)
		os.Exit(1)
	}
}

// freePort asks the kernel for a free loopback port. Another process could take it before we
// bind it again; at start-up on a test machine that race is rare and fails loudly.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func run() error {
	dir := flag.String("dir", "", "state directory (made fresh; removed on exit)")
	kubeconfig := flag.String("kubeconfig", "", "where to write the admin kubeconfig (default DIR/admin.kubeconfig)")
	port := flag.Int("port", 0, "the API server's port on 127.0.0.1 (default: a free one)")
	verbosity := flag.Int("v", 0, "kube-apiserver log verbosity")
	flag.Parse()
	if *dir == "" {
		return errors.New("--dir is required")
	}
	if entries, err := os.ReadDir(*dir); err == nil && len(entries) > 0 {
		return fmt.Errorf("%s is not empty: is a cluster already running there?", *dir)
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	// Whatever happens from here on, the state goes with the process.
	defer os.RemoveAll(*dir)
	if *kubeconfig == "" {
		*kubeconfig = filepath.Join(*dir, "admin.kubeconfig")
	} else {
		defer os.Remove(*kubeconfig)
	}

	// The command installs the SIGTERM/SIGINT handler as it is made (a second signal exits
	// at once), so it is made first: a signal during etcd's start already stops the run.
	cmd := app.NewAPIServerCommand()

	p, err := makePKI(*dir)
	if err != nil {
		return fmt.Errorf("making certificates: %w", err)
	}
	etcd, err := startEtcd(filepath.Join(*dir, "etcd"))
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		<-etcd.Server.StopNotify()
	}()

	if *port == 0 {
		if *port, err = freePort(); err != nil {
			return err
		}
	}
	server := "https://127.0.0.1:" + strconv.Itoa(*port)
	if err := writeKubeconfig(*kubeconfig, server, p); err != nil {
		return fmt.Errorf("writing the kubeconfig: %w", err)
	}
	fmt.Fprintf(os.Stderr, "switchboard-test-cluster: API server %s, etcd %s, kubeconfig %s\n",
		server, etcd.Clients[0].Addr(), *kubeconfig)

	cmd.SetArgs([]string{
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(*port),
		"--etcd-servers=http://" + etcd.Clients[0].Addr().String(),
		"--tls-cert-file=" + p.ServingCert,
		"--tls-private-key-file=" + p.ServingKey,
		"--client-ca-file=" + p.CACert,
		"--service-account-key-file=" + p.SAPub,
		"--service-account-signing-key-file=" + p.SAKey,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--api-audiences=https://kubernetes.default.svc",
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/24",
		// No Endpoints for the `kubernetes` Service: they may not name a loopback address,
		// and nothing here reaches the API through the Service.
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + filepath.Join(*dir, "certs"),
		"--profiling=false",
		"--v=" + strconv.Itoa(*verbosity),
	})
	// The command's context is cancelled by SIGTERM; the server then shuts down and Execute
	// returns, after which the deferred calls stop etcd and remove the state.
	err = cmd.ExecuteContext(cmd.Context())
	fmt.Fprintln(os.Stderr, "switchboard-test-cluster: API server stopped; stopping etcd")
	return err
}

func startEtcd(dir string) (*embed.Etcd, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, err
	}
	cfg := embed.NewConfig()
	cfg.Name = "switchboard-test"
	cfg.Dir = dir
	client := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
	peer := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "error"
	// A throwaway test store: losing it on a power cut costs nothing, and fsync per write
	// would make every test slower.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, errors.New("etcd was not ready within 60 s")
	}
}

func writeKubeconfig(path, server string, p *pki) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["switchboard-test"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: p.caPEM}
	cfg.AuthInfos["switchboard-admin"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: p.adminCertPEM,
		ClientKeyData:         p.adminKeyPEM,
	}
	cfg.Contexts["switchboard-test"] = &clientcmdapi.Context{Cluster: "switchboard-test", AuthInfo: "switchboard-admin", Namespace: "default"}
	cfg.CurrentContext = "switchboard-test"
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return clientcmd.WriteToFile(*cfg, path)
}
