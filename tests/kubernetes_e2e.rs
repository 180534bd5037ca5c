//! End-to-end suite against a real Kubernetes API server, named by the kubeconfig in
//! `SWITCHBOARD_TEST_KUBECONFIG`: the one `scripts/cluster up` starts (kube-apiserver + etcd built
//! from Go modules, see tests/cluster) or any disposable cluster (kind, k3s, ...). Its tests are
//! `#[ignore]`d, so a plain `cargo test` reports them as ignored; `scripts/test` starts the
//! cluster once and runs them with `--ignored`.
//!
//! What it does: installs the CRDs and the operator's RBAC from `crds/` and `charts/`, runs the
//! `switchboard operator` binary on this machine with the operator ServiceAccount's own token (so
//! that the RBAC is what is tested, not the admin's rights), applies `examples/` into a fresh
//! namespace, waits for Ready=True, checks the Postgres rows, checks that the API server's CEL
//! rules refuse an invalid spec and that a dangling reference is reported, edits a trunk and sees
//! the generation move, deletes everything and sees the rows go, and stops the operator with
//! SIGTERM. Postgres comes from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! the suite works in a database of its own and drops it at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

const MANAGER: &str = "switchboard-e2e";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

/// `kubectl apply --server-side` of one object.
async fn apply(client: &Client, object: &Value) -> Result<DynamicObject, kube::Error> {
    let name = object["metadata"]["name"].as_str().unwrap();
    api_for(client, object).patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object)).await
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn condition(object: &DynamicObject, type_: &str) -> Option<(String, String)> {
    object.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        (c["status"].as_str().unwrap_or_default().to_string(), c["reason"].as_str().unwrap_or_default().to_string())
    })
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kubeconfig of the cluster under test. The suite is `#[ignore]`d, so a run that asks for it
/// (`--ignored`) without a cluster is a failure, not a silent pass.
fn kubeconfig_path() -> std::ffi::OsString {
    std::env::var_os("SWITCHBOARD_TEST_KUBECONFIG").expect(
        "SWITCHBOARD_TEST_KUBECONFIG is not set: start a cluster with `eval \"$(scripts/cluster up)\"` and set it to $KUBECONFIG, or point it at a disposable kind/k3s cluster",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test starts one (scripts/cluster) and runs this with --ignored"]
async fn operator_on_a_real_cluster() {
    let kubeconfig_path = kubeconfig_path();
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());

    // Admin client from the kubeconfig.
    let kubeconfig = Kubeconfig::read_from(&kubeconfig_path).expect("reading SWITCHBOARD_TEST_KUBECONFIG");
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default()).await.unwrap();
    let admin = Client::try_from(config.clone()).unwrap();

    // A database of our own.
    let suffix = format!("{:x}", std::process::id() as u64 * 7919 + Instant::now().elapsed().subsec_nanos() as u64);
    let db_name = format!("switchboard_e2e_{suffix}");
    let server = PgPool::connect(&database_url).await.expect("cannot reach Postgres (DATABASE_URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&server).await.unwrap();
    let mut db_url = url::Url::parse(&database_url).unwrap();
    db_url.set_path(&db_name);
    let db_url = db_url.to_string();

    // CRDs, namespace, RBAC (not the Deployment: the operator runs here).
    for file in yaml_files(&root().join("crds")) {
        for object in documents(&file) {
            apply(&admin, &object).await.expect("installing a CRD");
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in ["trunks.switchboard.dev", "phonenumbers.switchboard.dev", "routingrules.switchboard.dev"] {
        wait_for(&format!("CRD {name} established"), Duration::from_secs(60), || async {
            crds.get(name)
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await;
    }
    let chart = root().join("charts/switchboard-operator");
    for file in ["00-namespace.yaml", "10-rbac.yaml"] {
        for object in documents(&chart.join(file)) {
            apply(&admin, &object).await.unwrap_or_else(|e| panic!("applying {file}: {e}"));
        }
    }

    // A kubeconfig with the operator ServiceAccount's token: the operator gets exactly its RBAC.
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "switchboard-system");
    let token = accounts
        .create_token_request(
            "switchboard-operator",
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
    let dir = tempfile::tempdir().unwrap();
    let operator_kubeconfig_path = dir.path().join("kubeconfig");
    std::fs::write(&operator_kubeconfig_path, serde_yaml::to_string(&operator_kubeconfig).unwrap()).unwrap();

    // A fresh namespace for the examples.
    let ns = format!("switchboard-e2e-{suffix}");
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap())
        .await
        .unwrap();

    // The operator binary, watching that namespace, with its own lease.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let operator = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["operator", "--namespace", &ns, "--lease-namespace", "switchboard-system"])
        .args(["--lease-name", &format!("switchboard-e2e-{suffix}")])
        .args(["--metrics-address", &format!("127.0.0.1:{port}"), "--node-poll-seconds", "1"])
        .env("KUBECONFIG", &operator_kubeconfig_path)
        .env("DATABASE_URL", &db_url)
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting switchboard operator");
    let mut operator = Operator(operator);
    let pool = PgPool::connect(&db_url).await.unwrap();

    // The examples, in the test namespace.
    let mut applied = Vec::new();
    for file in yaml_files(&root().join("examples")) {
        for mut object in documents(&file) {
            object["metadata"]["namespace"] = json!(ns);
            apply(&admin, &object).await.unwrap_or_else(|e| panic!("applying {}: {e}", file.display()));
            applied.push(object);
        }
    }
    let switchboard: Vec<&Value> = applied.iter().filter(|o| o["kind"] != "Secret").collect();
    wait_for("every example Ready=True", Duration::from_secs(120), || async {
        let mut all = true;
        for object in &switchboard {
            let current = api_for(&admin, object).get(object["metadata"]["name"].as_str().unwrap()).await;
            all &= current.is_ok_and(|o| {
                condition(&o, "Ready") == Some(("True".into(), "Reconciled".into()))
                    && o.data["status"]["observedGeneration"] == json!(o.metadata.generation)
                    && o.metadata.finalizers.iter().flatten().any(|f| f == "switchboard.dev/cleanup")
            });
        }
        all
    })
    .await;
    let count = |table: &'static str| {
        let pool = pool.clone();
        let ns = ns.clone();
        async move {
            let sql = match table {
                "trunks" => "SELECT count(*) FROM trunks WHERE namespace = $1",
                "phone_numbers" => "SELECT count(*) FROM phone_numbers WHERE namespace = $1",
                "routing_rules" => "SELECT count(*) FROM routing_rules WHERE namespace = $1",
                "credentials" => "SELECT count(*) FROM credentials WHERE namespace = $1",
                _ => unreachable!(),
            };
            sqlx::query_scalar::<_, i64>(sql).bind(ns).fetch_one(&pool).await.unwrap()
        }
    };
    assert_eq!(
        (count("trunks").await, count("phone_numbers").await, count("routing_rules").await, count("credentials").await),
        (2, 2, 2, 1)
    );

    // Events were posted, and no Secret value is in them or in any status.
    let events: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("events.k8s.io", "v1", "Event")),
    );
    let listed = events.list(&ListParams::default()).await.unwrap();
    assert!(listed.items.iter().any(|e| e.data["reason"] == "Reconciled"), "no Reconciled event");
    for event in &listed.items {
        assert!(!serde_json::to_string(&event.data).unwrap().contains("your_did_password"));
    }

    // The API server's CEL rules refuse what they can; the operator reports the rest.
    let mut invalid = switchboard.iter().find(|o| o["kind"] == "PhoneNumber").unwrap().to_owned().clone();
    invalid["metadata"]["name"] = json!("both-targets");
    invalid["spec"]["number"] = json!("+15550000001");
    invalid["spec"]["destination"] = json!({"type": "reject"});
    let refused = apply(&admin, &invalid).await.expect_err("CEL refuses routingRuleRef with destination");
    assert!(refused.to_string().contains("not both"), "{refused}");
    let mut dangling = switchboard.iter().find(|o| o["kind"] == "PhoneNumber").unwrap().to_owned().clone();
    dangling["metadata"]["name"] = json!("dangling");
    dangling["spec"]["number"] = json!("+15550000002");
    dangling["spec"]["trunkRef"] = json!("no-such-trunk");
    apply(&admin, &dangling).await.unwrap();
    let numbers = api_for(&admin, &dangling);
    wait_for("TrunkNotFound on the dangling number", Duration::from_secs(60), || async {
        numbers
            .get("dangling")
            .await
            .is_ok_and(|o| condition(&o, "Ready") == Some(("False".into(), "TrunkNotFound".into())))
    })
    .await;
    numbers.delete("dangling", &DeleteParams::default()).await.unwrap();

    // Edit a trunk: a new configuration generation, the new value, observedGeneration 2.
    let generation_before: i64 =
        sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(&pool).await.unwrap();
    let mut skyetel =
        switchboard.iter().find(|o| o["metadata"]["name"] == "skyetel-example").unwrap().to_owned().clone();
    skyetel["spec"]["limits"]["maxConcurrentCalls"] = json!(250);
    apply(&admin, &skyetel).await.unwrap();
    wait_for("the edit stored and observed", Duration::from_secs(60), || async {
        let stored: Option<i32> = sqlx::query_scalar(
            "SELECT max_concurrent_calls FROM trunks WHERE namespace = $1 AND name = 'skyetel-example'",
        )
        .bind(&ns)
        .fetch_optional(&pool)
        .await
        .unwrap()
        .flatten();
        let observed = api_for(&admin, &skyetel)
            .get("skyetel-example")
            .await
            .is_ok_and(|o| o.data["status"]["observedGeneration"] == json!(2));
        stored == Some(250) && observed
    })
    .await;
    let generation_after: i64 =
        sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(&pool).await.unwrap();
    assert!(generation_after > generation_before, "the configuration generation moved");

    // Metrics: one gauge per resource condition.
    let metrics = reqwest_like_get(port, "/metrics").await;
    assert!(metrics.contains("switchboard_resource_condition{"), "{metrics}");

    // Delete everything: the rows go, then the objects.
    for object in &switchboard {
        api_for(&admin, object)
            .delete(object["metadata"]["name"].as_str().unwrap(), &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for("every object gone", Duration::from_secs(120), || async {
        let mut gone = true;
        for object in &switchboard {
            gone &=
                api_for(&admin, object).get_opt(object["metadata"]["name"].as_str().unwrap()).await.unwrap().is_none();
        }
        gone
    })
    .await;
    assert_eq!(
        (count("trunks").await, count("phone_numbers").await, count("routing_rules").await, count("credentials").await),
        (0, 0, 0, 0)
    );

    // SIGTERM: a clean exit.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(operator.0.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = operator.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the operator did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "operator exit status {status}");

    // Clean up.
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    pool.close().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")))
        .execute(&server)
        .await;
    println!("kubernetes_e2e: passed against {}", config.cluster_url);
}

/// A plain HTTP/1.0 GET (no HTTP client dependency for one request).
async fn reqwest_like_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
