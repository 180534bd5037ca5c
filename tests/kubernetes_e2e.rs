//! End-to-end suite against a real Kubernetes API server, named by the kubeconfig in
//! `SWITCHBOARD_TEST_KUBECONFIG`: the one `scripts/cluster up` starts (kube-apiserver + etcd built
//! from Go modules, see tests/cluster) or any disposable cluster (kind, k3s, ...). Its tests are
//! `#[ignore]`d, so a plain `cargo test` reports them as ignored; `scripts/test` starts the
//! cluster once and runs them with `--ignored`.
//!
//! What it shows, each against the real server: the CRDs install with every CEL rule; each
//! invalid variant of the kube-cel table is refused by the server naming the field `switchboard
//! validate` names; `examples/` applied with kubectl reaches `Ready` with a real `switchboard
//! node` and the operator (running with the chart's ServiceAccount token, so its RBAC is what is
//! tested) on one Postgres; printer columns; `Synced` counting the node; an edit reaching the
//! node; rows removed before the finalizer goes; a rotated Secret; no secret value in events,
//! status or the operator's log; Flux's kstatus and Argo CD's Lua health checks over the objects
//! read back (tests/cluster/health); Lease failover between two replicas after SIGKILL.
//! kubectl is `SWITCHBOARD_TEST_KUBECTL`, else the one `scripts/cluster tool kubectl` installs.
//! Postgres comes from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! each test works in a database and namespace of its own and drops them at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

#[path = "../operator/tests/support/invalid_variants.rs"]
mod invalid_variants;

const MANAGER: &str = "switchboard-e2e";
/// Where the chart's ServiceAccount and leader-election Role live.
const RELEASE_NAMESPACE: &str = "switchboard-system";
const SECRET_VALUE: &str = "your_did_password";
const ROTATED_VALUE: &str = "rotated-e2e-Zq81wX";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The kubeconfig of the cluster under test. The suite is `#[ignore]`d, so a run that asks for it
/// (`--ignored`) without a cluster is a failure, not a silent pass.
fn kubeconfig_path() -> PathBuf {
    std::env::var_os("SWITCHBOARD_TEST_KUBECONFIG").map(PathBuf::from).expect(
        "SWITCHBOARD_TEST_KUBECONFIG is not set: start a cluster with `eval \"$(scripts/cluster up)\"` and set it to $KUBECONFIG, or point it at a disposable kind/k3s cluster",
    )
}

/// kubectl or helm: `SWITCHBOARD_TEST_KUBECTL` / `SWITCHBOARD_TEST_HELM`, else the ones
/// `scripts/cluster tool` installs (scripts/k8s-tools).
fn tool(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("SWITCHBOARD_TEST_{}", name.to_uppercase())) {
        return path.into();
    }
    let out = Command::new(root().join("scripts/cluster")).args(["tool", name]).output().expect("scripts/cluster");
    assert!(out.status.success(), "scripts/cluster tool {name}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn kubectl_path() -> PathBuf {
    tool("kubectl")
}

/// Runs kubectl against the cluster under test (admin kubeconfig).
fn kubectl(args: &[&str]) -> Output {
    Command::new(kubectl_path())
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(Stdio::null())
        .output()
        .expect("running kubectl")
}

/// kubectl that must succeed; its stdout.
fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template` of charts/switchboard into the release namespace; the rendered YAML.
fn helm_template(args: &[&str]) -> String {
    let out = Command::new(tool("helm"))
        .arg("template")
        .args(args)
        .args(["--namespace", RELEASE_NAMESPACE])
        .arg(root().join("charts/switchboard"))
        .output()
        .expect("running helm");
    assert!(out.status.success(), "helm template {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn write_yaml(path: &Path, objects: &[Value]) {
    let text: String = objects.iter().map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap())).collect();
    std::fs::write(path, text).unwrap();
}

fn resource(object: &Value) -> (ApiResource, bool) {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), object["apiVersion"].as_str().unwrap().to_string()),
    };
    let kind = object["kind"].as_str().unwrap();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, kind));
    let cluster_scoped =
        matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition");
    (resource, cluster_scoped)
}

fn api_for(client: &Client, object: &Value) -> Api<DynamicObject> {
    let (resource, cluster_scoped) = resource(object);
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if !cluster_scoped => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    }
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

/// Server-side apply of one object.
async fn apply(client: &Client, object: &Value) -> Result<DynamicObject, kube::Error> {
    api_for(client, object).patch(name_of(object), &PatchParams::apply(MANAGER).force(), &Patch::Apply(object)).await
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_showing(what, timeout, None, check).await
}

/// [`wait_for`], showing the log of the process it waits on when it times out.
async fn wait_for_showing<F, Fut>(what: &str, timeout: Duration, log: Option<&Path>, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() >= deadline {
            let log = log.and_then(|path| std::fs::read_to_string(path).ok()).unwrap_or_default();
            panic!("timed out after {timeout:?} waiting for {what}\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition(object: &DynamicObject, type_: &str) -> Option<(String, String)> {
    object.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        (c["status"].as_str().unwrap_or_default().to_string(), c["reason"].as_str().unwrap_or_default().to_string())
    })
}

/// A child process killed when the test ends, whatever happens, and the file that holds its
/// log (shown when it does not exit in time).
struct Process(Child, Option<PathBuf>);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), signal).unwrap();
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let log = self.1.as_ref().and_then(|path| std::fs::read_to_string(path).ok()).unwrap_or_default();
                panic!("the process did not exit within {within:?}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What every test needs: the admin client, CRDs and the chart's RBAC installed, a database and
/// a namespace of its own, and a kubeconfig holding the operator ServiceAccount's token.
struct Setup {
    admin: Client,
    server_url: String,
    ns: String,
    suffix: String,
    server: PgPool,
    db_name: String,
    db_url: String,
    pool: PgPool,
    dir: tempfile::TempDir,
    operator_kubeconfig: PathBuf,
}

static CRDS: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// `kubectl apply` of `crds/` (once per run); the server compiles every CEL rule and checks its
/// cost budget when the CRD is created, so an accepted, Established CRD carries all of them.
async fn install_crds() {
    CRDS.get_or_init(|| async {
        let crds = root().join("crds");
        kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            MANAGER,
            "-f",
            crds.to_str().unwrap(),
        ]);
        kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", "-f", crds.to_str().unwrap()]);
        for file in yaml_files(&crds) {
            let local = &documents(&file)[0];
            let name = name_of(local);
            let stored: Value = serde_json::from_str(&kubectl_ok(&["get", "crd", name, "-o", "json"])).unwrap();
            let rules = |crd: &Value| {
                let mut count = 0;
                count_rules(&crd["spec"]["versions"], &mut count);
                count
            };
            let (local_rules, stored_rules) = (rules(local), rules(&stored));
            assert!(local_rules > 0, "{name} has no CEL rules");
            assert_eq!(stored_rules, local_rules, "{name}: the server kept {stored_rules} of {local_rules} CEL rules");
            println!("kubernetes_e2e: {name}: Established with {stored_rules} CEL rules");
        }
        // The release namespace of the chart's RBAC (each test renders its own release).
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}});
        let file = std::env::temp_dir().join(format!("switchboard-e2e-ns-{}.yaml", std::process::id()));
        write_yaml(&file, &[namespace]);
        kubectl_ok(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(file);
    })
    .await;
}

fn count_rules(value: &Value, count: &mut usize) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                *count += rules.len();
            }
            map.values().for_each(|v| count_rules(v, count));
        }
        Value::Array(items) => items.iter().for_each(|v| count_rules(v, count)),
        _ => {}
    }
}

impl Setup {
    async fn new(label: &str) -> Self {
        let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("reading SWITCHBOARD_TEST_KUBECONFIG");
        let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default()).await.unwrap();
        let admin = Client::try_from(config.clone()).unwrap();
        install_crds().await;

        let database_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let suffix = format!("{label}-{:x}", (std::process::id() as u64) << 20 ^ nanos as u64);
        let db_name = format!("switchboard_e2e_{}", suffix.replace('-', "_"));
        let server = PgPool::connect(&database_url).await.expect("cannot reach Postgres (DATABASE_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&server).await.unwrap();
        let mut db_url = url::Url::parse(&database_url).unwrap();
        db_url.set_path(&db_name);
        let db_url = db_url.to_string();
        let pool = PgPool::connect(&db_url).await.unwrap();

        let ns = format!("sb-e2e-{suffix}");
        let dir = tempfile::tempdir().unwrap();

        // The chart's operator RBAC (ServiceAccount, ClusterRoles, the leader-election Role, the
        // REST API's writer Role in the test namespace), rendered by helm as a release of this
        // test's own, so parallel tests do not share a lease name or a Role.
        let service_account = format!("sb-e2e-{suffix}");
        let rendered = helm_template(&[
            &format!("sb-{suffix}"),
            "--show-only",
            "templates/operator-rbac.yaml",
            "--set",
            &format!("operator.serviceAccount.name={service_account}"),
            "--set",
            &format!("operator.leaderElection.leaseName=sb-e2e-{suffix}"),
            "--set",
            &format!("api.namespace={ns}"),
        ]);
        let rbac = dir.path().join("rbac.yaml");
        std::fs::write(&rbac, rendered).unwrap();
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        namespaces
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap())
            .await
            .unwrap();
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", rbac.to_str().unwrap()]);

        // A kubeconfig with the operator ServiceAccount's token: the operator gets exactly the
        // chart's RBAC, so a verb missing there fails this suite.
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), RELEASE_NAMESPACE);
        let token = accounts
            .create_token_request(
                &service_account,
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec { expiration_seconds: Some(3600), ..TokenRequestSpec::default() },
                    ..TokenRequest::default()
                },
            )
            .await
            .expect("creating a token for the operator ServiceAccount")
            .status
            .unwrap()
            .token;
        let mut operator_kubeconfig = kubeconfig.clone();
        let context_name = kubeconfig.current_context.clone().unwrap();
        let user_name = "switchboard-operator-e2e".to_string();
        for context in operator_kubeconfig.contexts.iter_mut() {
            if context.name == context_name
                && let Some(ctx) = context.context.as_mut()
            {
                ctx.user = Some(user_name.clone());
            }
        }
        operator_kubeconfig.auth_infos = vec![kube::config::NamedAuthInfo {
            name: user_name,
            auth_info: Some(kube::config::AuthInfo { token: Some(token.into()), ..Default::default() }),
            other: Default::default(),
        }];
        let operator_kubeconfig_path = dir.path().join("operator.kubeconfig");
        std::fs::write(&operator_kubeconfig_path, serde_yaml::to_string(&operator_kubeconfig).unwrap()).unwrap();
        Setup {
            admin,
            server_url: config.cluster_url.to_string(),
            ns,
            suffix,
            server,
            db_name,
            db_url,
            pool,
            dir,
            operator_kubeconfig: operator_kubeconfig_path,
        }
    }

    /// `switchboard operator` with the ServiceAccount's token, watching the test namespace, its
    /// log (stdout and stderr) in `log`.
    fn operator(&self, identity: &str, log: &Path, extra: &[&str]) -> Process {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["operator", "--namespace", &self.ns, "--lease-namespace", RELEASE_NAMESPACE])
            .args(["--lease-name", &format!("sb-e2e-{}", self.suffix), "--identity", identity])
            .args(["--metrics-address", &format!("127.0.0.1:{}", free_port()), "--node-poll-seconds", "1"])
            .args(extra)
            .env("KUBECONFIG", &self.operator_kubeconfig)
            .env("DATABASE_URL", &self.db_url)
            .env_remove("POD_NAMESPACE")
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("starting switchboard operator");
        Process(child, Some(log.to_path_buf()))
    }

    /// Leaves the cluster as it was: objects left over lose their finalizers (the operator may
    /// be gone), so that the namespace can go on any cluster; the Lease goes too.
    async fn teardown(self) {
        for kind in ["Trunk", "PhoneNumber", "RoutingRule"] {
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.admin.clone(),
                &self.ns,
                &ApiResource::from_gvk(&GroupVersionKind::gvk("switchboard.dev", "v1alpha1", kind)),
            );
            for object in api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
                let name = object.metadata.name.unwrap_or_default();
                let unfinalized = json!({"metadata": {"finalizers": null}});
                let _ = api.patch(&name, &PatchParams::default(), &Patch::Merge(&unfinalized)).await;
            }
        }
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), RELEASE_NAMESPACE);
        let _ = leases.delete(&format!("sb-e2e-{}", self.suffix), &DeleteParams::default()).await;
        let rbac = self.dir.path().join("rbac.yaml");
        let _ = kubectl(&["delete", "--ignore-not-found", "--wait=false", "-f", rbac.to_str().unwrap()]);
        let namespaces: Api<Namespace> = Api::all(self.admin.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name)))
            .execute(&self.server)
            .await;
        drop(self.dir);
    }
}

/// The examples as the suite applies them: in the test namespace, and with every gateway and
/// registrar on loopback (a port nothing answers on), so the node sends nothing off this machine.
fn examples_for(ns: &str) -> Vec<Value> {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut out = Vec::new();
    for file in yaml_files(&root().join("examples")) {
        for mut object in documents(&file) {
            object["metadata"]["namespace"] = json!(ns);
            if object["kind"] == "Trunk" {
                for (i, gateway) in object["spec"]["gateways"].as_array_mut().unwrap().iter_mut().enumerate() {
                    gateway["address"] = json!(format!("127.0.0.{}", i + 1));
                    gateway["port"] = json!(silent);
                }
                if object["spec"]["registrar"].is_object() {
                    object["spec"]["registrar"] = json!({"address": "127.0.0.1", "port": silent});
                }
            }
            out.push(object);
        }
    }
    out
}

/// The main path: CRDs, the kube-cel table, examples with a node and the operator, columns,
/// Synced, an edit, a rotated Secret, health rules, deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test starts one (scripts/cluster) and runs this with --ignored"]
async fn operator_on_a_real_cluster() {
    let setup = Setup::new("main").await;
    let (admin, ns, pool) = (&setup.admin, setup.ns.as_str(), &setup.pool);
    let examples = examples_for(ns);
    let switchboard: Vec<&Value> = examples.iter().filter(|o| o["kind"] != "Secret").collect();

    // The kube-cel table: the server refuses each variant, naming the field that
    // `switchboard validate` names for the same manifests.
    for (case, variant, field) in invalid_variants::invalid_variants(&examples) {
        let folder = setup.dir.path().join(format!("variant-{}", case.replace(' ', "-")));
        std::fs::create_dir_all(&folder).unwrap();
        let mut manifests: Vec<Value> = examples
            .iter()
            .filter(|o| !(o["kind"] == variant["kind"] && name_of(o) == name_of(&variant)))
            .cloned()
            .collect();
        manifests.push(variant.clone());
        write_yaml(&folder.join("all.yaml"), &manifests);
        let validated = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["validate", folder.to_str().unwrap()])
            .output()
            .unwrap();
        let validate_said =
            format!("{}{}", String::from_utf8_lossy(&validated.stdout), String::from_utf8_lossy(&validated.stderr));
        assert!(!validated.status.success(), "{case}: switchboard validate accepted it");
        assert!(validate_said.contains(field), "{case}: switchboard validate did not name {field}: {validate_said}");
        let file = folder.join("variant.yaml");
        write_yaml(&file, std::slice::from_ref(&variant));
        let applied = kubectl(&["apply", "--server-side", "--field-manager", MANAGER, "-f", file.to_str().unwrap()]);
        let server_said = String::from_utf8_lossy(&applied.stderr).to_string();
        assert!(!applied.status.success(), "{case}: the API server accepted it");
        assert!(server_said.contains(field), "{case}: the API server did not name {field}: {server_said}");
        println!("kubernetes_e2e: refused ({case}): {}", server_said.trim());
    }

    // The operator, then the examples with kubectl.
    let operator_log = setup.dir.path().join("operator.log");
    let mut operator = setup.operator("e2e-main", &operator_log, &[]);
    let examples_file = setup.dir.path().join("examples.yaml");
    write_yaml(&examples_file, &examples);
    kubectl_ok(&["apply", "--server-side", "--field-manager", MANAGER, "-f", examples_file.to_str().unwrap()]);
    let kinds = "trunks.switchboard.dev,phonenumbers.switchboard.dev,routingrules.switchboard.dev";
    wait_for_showing("the operator's first pass", Duration::from_secs(60), Some(&operator_log), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM trunks").fetch_one(pool).await.is_ok_and(|n| n == 2)
    })
    .await;

    // A real SIP node on the same Postgres (after the operator migrated it), on loopback.
    let node_log = setup.dir.path().join("node.log");
    let node_log_file = std::fs::File::create(&node_log).unwrap();
    let rtp = 42000 + (std::process::id() % 100) as u16 * 20;
    let _node = Process(
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["node", "--node-id", &format!("e2e-node-{}", setup.suffix)])
            .arg("--state-dir")
            .arg(setup.dir.path().join("node-state"))
            .env("SWITCHBOARD_WEBHOOK_SECRET", "e2e-test-webhook-secret-0123456789")
            .args(["--sip-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--rtp-ports", &format!("{rtp}-{}", rtp + 19)])
            .args(["--heartbeat-interval-ms", "200", "--config-poll-interval-ms", "200"])
            .env("DATABASE_URL", &setup.db_url)
            .stdin(Stdio::null())
            .stdout(node_log_file.try_clone().unwrap())
            .stderr(node_log_file)
            .spawn()
            .expect("starting switchboard node"),
        Some(node_log.clone()),
    );

    kubectl_ok(&["wait", "-n", ns, "--for=condition=Ready", "--timeout=90s", kinds, "--all"]);
    println!("kubernetes_e2e: kubectl wait --for=condition=Ready: all {} objects", switchboard.len());
    wait_for("Synced counting the one live node on every object", Duration::from_secs(60), || async {
        let mut all = true;
        for object in &switchboard {
            let current = api_for(admin, object).get(name_of(object)).await.unwrap();
            all &= condition(&current, "Synced").is_some_and(|(s, _)| s == "True")
                && current.data["status"]["nodes"] == json!({"applied": 1, "total": 1})
                && current.data["status"]["observedGeneration"] == json!(current.metadata.generation)
                && current.metadata.finalizers.iter().flatten().any(|f| f == "switchboard.dev/cleanup");
        }
        all
    })
    .await;
    let wide = kubectl_ok(&["get", "-n", ns, "trunks,phonenumbers,routingrules", "-o", "wide"]);
    println!("kubernetes_e2e: kubectl get -o wide:\n{wide}");
    let row = |name: &str| {
        wide.lines()
            .find(|l| l.split_whitespace().any(|w| w.ends_with(name)))
            .unwrap_or_else(|| panic!("no row for {name}:\n{wide}"))
            .to_string()
    };
    let columns = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    // Trunk: NAME PROVIDER READY REGISTERED ACTIVE REASON AGE.
    let skyetel = columns(&row("skyetel-example"));
    assert_eq!(&skyetel[1..3], ["skyetel", "True"], "{wide}");
    assert!(skyetel.contains(&"Reconciled".to_string()), "{wide}");
    assert!(skyetel[4].parse::<u32>().is_ok(), "ACTIVE is a number: {wide}");
    // PhoneNumber: NAME NUMBER TRUNK READY REASON AGE.
    let main_line = columns(&row("main-line"));
    assert_eq!(main_line[2], "skyetel-example", "{wide}");
    assert!(main_line[1].starts_with('+') && main_line[3] == "True" && main_line[4] == "Reconciled", "{wide}");
    // RoutingRule: NAME DIRECTION PRIORITY READY REASON AGE.
    let outbound = columns(&row("outbound-us"));
    assert_eq!(outbound[1], "outbound", "{wide}");
    assert!(outbound[2].parse::<i64>().is_ok() && outbound[3] == "True" && outbound[4] == "Reconciled", "{wide}");

    // Flux's kstatus and Argo CD's Lua health checks over the objects read back from the server.
    health_checks(&setup, "Current", "Healthy", &[]);

    // An edited Trunk reaches the node: the node logs the new configuration generation.
    let generation_before: i64 =
        sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(pool).await.unwrap();
    let mut skyetel = (*switchboard.iter().find(|o| name_of(o) == "skyetel-example").unwrap()).clone();
    skyetel["spec"]["limits"]["maxConcurrentCalls"] = json!(250);
    apply(admin, &skyetel).await.unwrap();
    wait_for("the edit stored, observed and applied by the node", Duration::from_secs(60), || async {
        let stored: Option<i32> = sqlx::query_scalar(
            "SELECT max_concurrent_calls FROM trunks WHERE namespace = $1 AND name = 'skyetel-example'",
        )
        .bind(ns)
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten();
        let generation: i64 = sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(pool).await.unwrap();
        let node_said = std::fs::read_to_string(&node_log).unwrap_or_default();
        let observed = api_for(admin, &skyetel)
            .get("skyetel-example")
            .await
            .is_ok_and(|o| o.data["status"]["observedGeneration"] == json!(2));
        stored == Some(250)
            && observed
            && generation > generation_before
            && node_said.contains(&format!("applied config generation {generation}:"))
    })
    .await;
    println!("kubernetes_e2e: the edited trunk reached the node (it logged the new generation)");

    // Health rules off the happy path. A spec CEL lets through but the operator refuses (a
    // gateway listed twice) must be Failed for Flux and Degraded for Argo CD; an edit the
    // operator has not observed yet (it is stopped with SIGSTOP meanwhile) InProgress/Progressing.
    let mut refused = skyetel.clone();
    refused["metadata"]["name"] = json!("dup-gateway");
    refused["spec"]["gateways"][1] = refused["spec"]["gateways"][0].clone();
    apply(admin, &refused).await.unwrap();
    wait_for("InvalidSpec on dup-gateway", Duration::from_secs(60), || async {
        api_for(admin, &refused)
            .get("dup-gateway")
            .await
            .is_ok_and(|o| condition(&o, "Ready") == Some(("False".into(), "InvalidSpec".into())))
    })
    .await;
    operator.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut didforsale = (*switchboard.iter().find(|o| name_of(o) == "didforsale-example").unwrap()).clone();
    didforsale["spec"]["limits"]["maxConcurrentCalls"] = json!(60);
    apply(admin, &didforsale).await.unwrap();
    health_checks(
        &setup,
        "Current",
        "Healthy",
        &[("dup-gateway", "Failed", "Degraded"), ("didforsale-example", "InProgress", "Progressing")],
    );
    operator.signal(nix::sys::signal::Signal::SIGCONT);
    api_for(admin, &refused).delete("dup-gateway", &DeleteParams::default()).await.unwrap();

    // A rotated Secret: the stored credential follows.
    let secret = examples.iter().find(|o| o["kind"] == "Secret").unwrap();
    let stored_password = || async {
        sqlx::query_scalar::<_, String>("SELECT password FROM credentials WHERE namespace = $1")
            .bind(ns)
            .fetch_optional(pool)
            .await
            .unwrap()
    };
    assert_eq!(stored_password().await.as_deref(), Some(SECRET_VALUE));
    kubectl_ok(&[
        "patch",
        "secret",
        "-n",
        ns,
        name_of(secret),
        "--type=merge",
        "-p",
        &json!({"stringData": {"password": ROTATED_VALUE}}).to_string(),
    ]);
    wait_for("the rotated password stored", Duration::from_secs(60), || async {
        stored_password().await.as_deref() == Some(ROTATED_VALUE)
    })
    .await;
    println!("kubernetes_e2e: the rotated Secret reached the credentials table");

    // Events were posted; no Secret value in them, in any status or in the operator's log.
    let events: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("events.k8s.io", "v1", "Event")),
    );
    let listed = events.list(&ListParams::default()).await.unwrap();
    assert!(listed.items.iter().any(|e| e.data["reason"] == "Reconciled"), "no Reconciled event");
    let objects = kubectl_ok(&["get", "-n", ns, kinds, "-o", "json"]);
    let log = std::fs::read_to_string(&operator_log).unwrap();
    for value in [SECRET_VALUE, ROTATED_VALUE] {
        for event in &listed.items {
            assert!(!serde_json::to_string(&event.data).unwrap().contains(value), "a Secret value in an event");
        }
        assert!(!objects.contains(value), "a Secret value in an object or its status");
        assert!(!log.contains(value), "a Secret value in the operator's log");
    }

    // The API server's CEL rules refuse what they can; the operator reports the rest.
    let mut dangling = (*switchboard.iter().find(|o| o["kind"] == "PhoneNumber").unwrap()).clone();
    dangling["metadata"]["name"] = json!("dangling");
    dangling["spec"]["number"] = json!("+15550000002");
    dangling["spec"]["trunkRef"] = json!("no-such-trunk");
    apply(admin, &dangling).await.unwrap();
    let numbers = api_for(admin, &dangling);
    wait_for("TrunkNotFound on the dangling number", Duration::from_secs(60), || async {
        numbers
            .get("dangling")
            .await
            .is_ok_and(|o| condition(&o, "Ready") == Some(("False".into(), "TrunkNotFound".into())))
    })
    .await;
    numbers.delete("dangling", &DeleteParams::default()).await.unwrap();

    // Deletion: a finalizer of the test's own holds the object after the operator is done, so
    // the rows are seen gone while the object still exists and the operator's finalizer has gone.
    let rule = (*switchboard.iter().find(|o| name_of(o) == "outbound-us").unwrap()).clone();
    let rules = api_for(admin, &rule);
    rules
        .patch(
            "outbound-us",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["switchboard.dev/cleanup", "e2e.switchboard.dev/hold"]}})),
        )
        .await
        .unwrap();
    rules.delete("outbound-us", &DeleteParams::default()).await.unwrap();
    let row_count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM routing_rules WHERE namespace = $1 AND name = 'outbound-us'")
            .bind(ns)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    wait_for("the operator's finalizer released", Duration::from_secs(60), || async {
        rules
            .get("outbound-us")
            .await
            .is_ok_and(|o| o.metadata.finalizers.unwrap_or_default() == ["e2e.switchboard.dev/hold".to_string()])
    })
    .await;
    assert_eq!(row_count().await, 0, "the finalizer went before the rows");
    rules
        .patch("outbound-us", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    wait_for("outbound-us gone", Duration::from_secs(30), || async {
        rules.get_opt("outbound-us").await.unwrap().is_none()
    })
    .await;
    println!("kubernetes_e2e: deletion: rows removed, then the finalizer released, then the object gone");

    // Everything else.
    kubectl_ok(&["delete", "-n", ns, kinds, "--all", "--wait=true", "--timeout=60s"]);
    for table in ["trunks", "phone_numbers", "routing_rules", "credentials"] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE namespace = $1")))
                .bind(ns)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(rows, 0, "rows left in {table}");
    }

    // SIGTERM: a clean exit.
    operator.signal(nix::sys::signal::Signal::SIGTERM);
    let terminated = Instant::now();
    let status = operator.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "operator exit status {status}");
    let overran: Vec<String> = std::fs::read_to_string(&operator_log)
        .unwrap()
        .lines()
        .filter(|line| line.contains("did not stop within"))
        .map(str::to_owned)
        .collect();
    println!("kubernetes_e2e: the operator exited {:?} after SIGTERM {overran:?}", terminated.elapsed());
    println!("kubernetes_e2e: passed against {}", setup.server_url);
    setup.teardown().await;
}

/// Runs the Go health tests of tests/cluster (Flux's kstatus, Argo CD's Lua checks from
/// charts/switchboard/files/argocd) over the test namespace's objects; `kstatus` and `argocd` are
/// the results every object must have, except those named in `except` (name, kstatus, argocd).
fn health_checks(setup: &Setup, kstatus: &str, argocd: &str, except: &[(&str, &str, &str)]) {
    let expect: Vec<String> = except.iter().map(|(n, k, a)| format!("{n}={k}/{a}")).collect();
    let out = Command::new("go")
        .args(["test", "-count=1", "-v", "-run", "TestHealth", "./health/"])
        .current_dir(root().join("tests/cluster"))
        .env("SWITCHBOARD_HEALTH_KUBECONFIG", kubeconfig_path())
        .env("SWITCHBOARD_HEALTH_NAMESPACE", &setup.ns)
        .env("SWITCHBOARD_HEALTH_DEFAULT", format!("{kstatus}/{argocd}"))
        .env("SWITCHBOARD_HEALTH_EXPECT", expect.join(","))
        .env("SWITCHBOARD_HEALTH_LUA", root().join("charts/switchboard/files/argocd"))
        .output()
        .expect("running go test (the Go toolchain)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("kubernetes_e2e: health rules:\n{said}");
    assert!(out.status.success(), "the health rules disagree:\n{said}");
}

/// Two operator replicas on one Lease: one leads; after SIGKILL of the leader the other leads
/// within the lease duration, and the two never lead at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test starts one (scripts/cluster) and runs this with --ignored"]
async fn lease_failover_after_sigkill() {
    let setup = Setup::new("lease").await;
    let leases: Api<Lease> = Api::namespaced(setup.admin.clone(), RELEASE_NAMESPACE);
    let lease_name = format!("sb-e2e-{}", setup.suffix);
    let holder =
        || async { leases.get_opt(&lease_name).await.unwrap().and_then(|l| l.spec).and_then(|s| s.holder_identity) };
    let log_a = setup.dir.path().join("a.log");
    let log_b = setup.dir.path().join("b.log");
    let mut a = setup.operator("replica-a", &log_a, &[]);
    wait_for("replica-a to lead", Duration::from_secs(60), || async { holder().await.as_deref() == Some("replica-a") })
        .await;
    let mut b = setup.operator("replica-b", &log_b, &[]);
    // b stands by while a renews (a few renewals).
    let standby_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < standby_until {
        assert_eq!(holder().await.as_deref(), Some("replica-a"));
        assert!(!std::fs::read_to_string(&log_b).unwrap().contains("became the leader"), "two leaders");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lease = leases.get(&lease_name).await.unwrap().spec.unwrap();
    let duration = Duration::from_secs(lease.lease_duration_seconds.unwrap() as u64);
    a.signal(nix::sys::signal::Signal::SIGKILL);
    a.wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    wait_for("replica-b to lead", duration + Duration::from_secs(10), || async {
        holder().await.as_deref() == Some("replica-b")
    })
    .await;
    let took = killed.elapsed();
    println!("kubernetes_e2e: replica-b leads {took:?} after SIGKILL of replica-a (lease duration {duration:?})");
    // The standby sees a renewal up to one retry period (2 s) after it happened and checks
    // again every retry period, so it leads within the lease duration plus two retry periods of
    // the kill (the last renewal was at most that long before it).
    let bound = duration + Duration::from_secs(2 * 2 + 1);
    assert!(took <= bound, "failover took {took:?}, lease duration {duration:?}, bound {bound:?}");
    assert!(!std::fs::read_to_string(&log_a).unwrap().contains("lost"), "replica-a lost the lease before the kill");
    let lease = leases.get(&lease_name).await.unwrap().spec.unwrap();
    assert_eq!(lease.lease_transitions, Some(1));
    b.signal(nix::sys::signal::Signal::SIGTERM);
    // (It releases the Lease and stops its watches first: generous for a loaded machine.)
    let terminated = Instant::now();
    assert!(b.wait_exit(Duration::from_secs(60)).await.success());
    let log = std::fs::read_to_string(&log_b).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let shutdown = lines[lines.len().saturating_sub(8)..].join("\n");
    println!("kubernetes_e2e: replica-b exited {:?} after SIGTERM:\n{shutdown}", terminated.elapsed());
    // A part cut off at the grace limit (src/operator.rs stop_within) says so in these lines.
    setup.teardown().await;
}

/// One HTTP request with curl (the suite has no HTTP client dependency): (status, body).
fn http(method: &str, url: &str, token: &str, body: Option<&Value>) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "-X", method, "-H", &format!("Authorization: Bearer {token}"), "-w", "\n%{http_code}", url]);
    if let Some(body) = body {
        command.args(["-H", "Content-Type: application/json", "--data-binary", &body.to_string()]);
    }
    let out = command.output().expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The REST API in Kubernetes mode, with the chart's ServiceAccount (operator and API writer
/// roles): POST/PUT/DELETE /api/trunks are server-side applies by `switchboard-api`; a Trunk
/// applied by Argo CD or Flux answers 409 and stays as it is; a password Secret the API did not
/// create is not overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test starts one (scripts/cluster) and runs this with --ignored"]
async fn rest_api_in_kubernetes_mode() {
    let setup = Setup::new("api").await;
    let ns = setup.ns.as_str();
    let secret_file = setup.dir.path().join("jwt-secret");
    std::fs::write(&secret_file, "e2e-jwt-secret-0123456789abcdefghijklmnopqrstuvwxyz").unwrap();
    let token = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--subject", "e2e", "--jwt-secret-file", secret_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(token.status.success(), "switchboard token: {}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let port = free_port();
    let log = setup.dir.path().join("operator.log");
    let _operator = setup.operator(
        "e2e-api",
        &log,
        &[
            "--api-listen",
            &format!("127.0.0.1:{port}"),
            "--api-namespace",
            ns,
            "--jwt-secret-file",
            secret_file.to_str().unwrap(),
        ],
    );
    let base = format!("http://127.0.0.1:{port}/api/trunks");
    wait_for("the REST API", Duration::from_secs(60), || async { http("GET", &base, &token, None).0 == 200 }).await;
    let get = |kind: &str, name: &str| -> Option<Value> {
        let out = kubectl(&["get", "-n", ns, kind, name, "-o", "json", "--show-managed-fields"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    };
    let managers = |object: &Value| -> Vec<String> {
        object["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("{}/{}", m["manager"].as_str().unwrap_or(""), m["operation"].as_str().unwrap_or("")))
            .collect()
    };

    // POST: a Trunk and its password Secret, both applied by switchboard-api.
    let create = json!({
        "trunk_id": "api_trunk", "provider": "skyetel", "proxy_address": "127.0.0.1", "auth_method": "digest",
        "username": "u", "realm": "example.test", "password": "api-password-Yt7", "allowed_ips": ["192.0.2.0/24"]
    });
    let (code, body) = http("POST", &base, &token, Some(&create));
    assert_eq!(code, 201, "POST /api/trunks: {body}");
    let trunk = get("trunk", "api-trunk").expect("the Trunk exists");
    assert!(managers(&trunk).contains(&"switchboard-api/Apply".to_string()), "{:?}", managers(&trunk));
    let secret = get("secret", "api-trunk-credentials").expect("the Secret exists");
    assert_eq!(secret["metadata"]["labels"]["app.kubernetes.io/managed-by"], "switchboard-api");
    assert!(managers(&secret).contains(&"switchboard-api/Apply".to_string()), "{:?}", managers(&secret));

    // PUT: a change, by the same field manager.
    let (code, body) = http("PUT", &format!("{base}/api_trunk"), &token, Some(&json!({"max_concurrent_calls": 7})));
    assert_eq!(code, 200, "PUT: {body}");
    let trunk = get("trunk", "api-trunk").unwrap();
    assert_eq!(trunk["spec"]["limits"]["maxConcurrentCalls"], 7, "{trunk}");
    assert_eq!(trunk["metadata"]["generation"], 2);

    // Trunks applied by Argo CD's and Flux's field managers: 409, unchanged.
    let examples = examples_for(ns);
    for (name, manager) in [("argo-trunk", "argocd-controller"), ("flux-trunk", "kustomize-controller")] {
        let mut object = examples.iter().find(|o| name_of(o) == "skyetel-example").unwrap().clone();
        object["metadata"]["name"] = json!(name);
        let file = setup.dir.path().join(format!("{name}.yaml"));
        write_yaml(&file, &[object]);
        kubectl_ok(&["apply", "--server-side", "--field-manager", manager, "-f", file.to_str().unwrap()]);
        let before = get("trunk", name).unwrap();
        let (code, body) = http(
            "PUT",
            &format!("{base}/{}", name.replace('-', "_")),
            &token,
            Some(&json!({"max_concurrent_calls": 3})),
        );
        assert_eq!(code, 409, "PUT on a {manager} Trunk: {body}");
        assert!(body.contains("managed_by_gitops"), "{body}");
        let (code, body) = http("DELETE", &format!("{base}/{}", name.replace('-', "_")), &token, None);
        assert_eq!(code, 409, "DELETE on a {manager} Trunk: {body}");
        let after = get("trunk", name).expect("still there");
        // (The operator writes its finalizer and status meanwhile: spec and generation tell.)
        assert_eq!(after["spec"], before["spec"], "{manager}: the spec changed");
        assert_eq!(after["metadata"]["generation"], before["metadata"]["generation"], "{manager}: changed");
        assert!(after["metadata"]["deletionTimestamp"].is_null(), "{manager}: deleted");
        assert!(!managers(&after).iter().any(|m| m.starts_with("switchboard-api/")), "{manager}: the API wrote it");
        println!("kubernetes_e2e: REST API: {manager}'s Trunk refused with 409 and unchanged");
    }

    // A password Secret someone else made is not overwritten.
    kubectl_ok(&["create", "secret", "generic", "-n", ns, "mine-credentials", "--from-literal=password=theirs"]);
    let mut foreign = create.clone();
    foreign["trunk_id"] = json!("mine");
    let (code, body) = http("POST", &base, &token, Some(&foreign));
    assert_eq!(code, 409, "POST over a foreign Secret: {body}");
    assert!(body.contains("secret_not_created_by_api"), "{body}");
    let secret = get("secret", "mine-credentials").unwrap();
    assert_eq!(secret["data"]["password"], "dGhlaXJz", "the foreign Secret was changed");
    assert!(get("trunk", "mine").is_none());

    // DELETE: the Trunk goes (the operator releases its finalizer).
    let (code, body) = http("DELETE", &format!("{base}/api_trunk"), &token, None);
    assert_eq!(code, 204, "DELETE: {body}");
    wait_for("api-trunk gone", Duration::from_secs(60), || async { get("trunk", "api-trunk").is_none() }).await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("api-password-Yt7"), "the password in the operator's log");
    println!("kubernetes_e2e: REST API: POST, PUT, DELETE as server-side applies by switchboard-api");
    setup.teardown().await;
}
