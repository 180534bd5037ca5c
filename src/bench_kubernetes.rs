//! `switchboard bench --kubernetes`: the operator's figures through a real Kubernetes API server
//! (the cluster of `KUBECONFIG`, e.g. `eval "$(scripts/cluster up)"`).
//!
//! The same generated resources as the folder bench (10,000 PhoneNumbers, 50 Trunks, 100
//! RoutingRules by default) are server-side applied into a fresh namespace while `switchboard
//! operator` (a child process, watching that namespace) and one `switchboard node` run on the
//! bench's database. Printed: the time from the first apply until every object is Ready with its
//! generation observed; the operator's API writes during an idle minute with a full resync in it
//! (goal 0); the operator's RSS; and for N edits of a Trunk, edit → node applied p50/p99.
//! Figures are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::bench::{BenchArgs, generate, wait_applied};
use crate::process::stop_child;

const MANAGER: &str = "switchboard-bench";
/// The operator's full resync of its passes (operator/src/kubernetes/mod.rs: pass_resync).
const RESYNC: Duration = Duration::from_secs(60);

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("switchboard.dev", "v1alpha1", kind))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The generated manifests, in `namespace`.
fn manifests(files: &[PathBuf], dir: &Path, namespace: &str) -> anyhow::Result<Vec<Value>> {
    let mut paths = vec![dir.join("trunks.yaml"), dir.join("rules.yaml")];
    paths.extend(files.iter().cloned());
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let mut value = Value::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            value["metadata"]["namespace"] = json!(namespace);
            out.push(value);
        }
    }
    Ok(out)
}

/// A plain HTTP/1.0 GET on loopback.
async fn get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// Sum of `switchboard_operator_api_writes_total` over its labels.
async fn api_writes(port: u16) -> anyhow::Result<f64> {
    let metrics = get(port, "/metrics").await.context("reading the operator's /metrics")?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("switchboard_operator_api_writes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Objects of `kind` not yet Ready with their generation observed.
async fn not_ready(client: &Client, namespace: &str, kind: &str) -> anyhow::Result<usize> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource(kind));
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|o| {
            let status = &o.data["status"];
            let ready = status["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
            !(ready && status["observedGeneration"] == json!(o.metadata.generation))
        })
        .count())
}

pub async fn measure(args: &BenchArgs, url: &str) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("no Kubernetes cluster (KUBECONFIG): try scripts/cluster up")?;
    let version = client.apiserver_version().await?;
    println!("Kubernetes API server {}", version.git_version);
    let folder = tempfile::tempdir()?;
    let files = generate(folder.path(), args)?;
    let namespace = format!("switchboard-bench-{}", std::process::id());
    let objects = manifests(&files, folder.path(), &namespace)?;
    println!("{} trunks, {} rules, {} numbers into namespace {namespace}", args.trunks, args.rules, args.numbers);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces.create(&Default::default(), &serde_json::from_value(json!({"metadata": {"name": namespace}}))?).await?;

    let port = free_port()?;
    let log = std::env::temp_dir().join(format!("switchboard-bench-k8s-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log)?;
    let mut operator = Command::new(std::env::current_exe()?)
        .args(["operator", "--namespace", &namespace, "--no-leader-election", "--node-poll-seconds", "1"])
        .args(["--metrics-address", &format!("127.0.0.1:{port}"), "--database-url", url])
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file.try_clone()?)
        .kill_on_drop(true)
        .spawn()
        .context("starting `switchboard operator`")?;
    let mut node: Option<Child> = None;
    let outcome = async {
        // The node starts once the operator has migrated the database (its /readyz).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !get(port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
        {
            if Instant::now() > deadline {
                bail!("the operator was not ready within 60 s (log {})", log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node = Some(
            Command::new(std::env::current_exe()?)
                .args(["node", "--database-url", url, "--node-id", "bench-node"])
                .args(["--sip-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file.try_clone()?)
                .kill_on_drop(true)
                .spawn()
                .context("starting `switchboard node`")?,
        );
        run(args, &client, &namespace, &objects, url, port, operator.id()).await
    }
    .await;
    // The objects are deleted while the operator runs (it removes the rows and releases its
    // finalizers), then the namespace (a cluster without a namespace controller keeps it
    // Terminating; it is empty by then).
    let deadline = Instant::now() + Duration::from_secs(600);
    for kind in ["PhoneNumber", "RoutingRule", "Trunk"] {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource(kind));
        let _ = api.delete_collection(&DeleteParams::default(), &ListParams::default()).await;
        while Instant::now() < deadline
            && api.list(&ListParams::default().limit(1)).await.is_ok_and(|l| !l.items.is_empty())
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let _ = namespaces.delete(&namespace, &DeleteParams::default()).await;
    if let Some(mut node) = node {
        stop_child(&mut node, Signal::SIGTERM, Duration::from_secs(10)).await;
    }
    stop_child(&mut operator, Signal::SIGTERM, Duration::from_secs(10)).await;
    if outcome.is_ok() {
        let _ = std::fs::remove_file(&log);
    } else {
        eprintln!("operator and node log: {}", log.display());
    }
    outcome
}

async fn run(
    args: &BenchArgs,
    client: &Client,
    namespace: &str,
    objects: &[Value],
    url: &str,
    port: u16,
    operator_pid: Option<u32>,
) -> anyhow::Result<()> {
    let pool = switchboard_model::db::connect(url, 2).await?;
    let started = Instant::now();
    futures::stream::iter(objects.iter().map(|object| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource(object["kind"].as_str().unwrap_or_default()));
        async move {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object)).await.map(|_| ())
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<()>>()
    .await
    .context("applying the generated objects")?;
    let applied = started.elapsed();
    let deadline = started + Duration::from_secs(900);
    loop {
        let mut waiting = 0;
        for kind in ["Trunk", "RoutingRule", "PhoneNumber"] {
            waiting += not_ready(client, namespace, kind).await?;
        }
        if waiting == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{waiting} objects not Ready after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{} objects server-side applied in {:.1} s; all Ready (generation observed) {:.1} s after the first apply",
        objects.len(),
        applied.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // An idle stretch with one full resync in it: the writes it makes (goal 0).
    let generation: i64 = sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(&pool).await?;
    wait_applied(&pool, generation, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = api_writes(port).await?;
    tokio::time::sleep(RESYNC + Duration::from_secs(5)).await;
    let after = api_writes(port).await?;
    println!(
        "operator API writes during {} s idle (one full resync): {}",
        (RESYNC + Duration::from_secs(5)).as_secs(),
        after - before
    );
    match operator_pid.and_then(rss) {
        Some((now, peak)) => {
            println!("operator RSS: {:.1} MB (peak {:.1} MB)", now as f64 / 1024.0, peak as f64 / 1024.0)
        }
        None => println!("operator RSS: could not be read from /proc"),
    }

    // Edited Trunk → node applied, through the API server and the operator.
    let trunks: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource("Trunk"));
    let mut latencies = Vec::with_capacity(args.edits);
    for edit in 0..args.edits {
        let name = format!("trunk-{}", edit % args.trunks);
        let current: i64 = sqlx::query_scalar("SELECT generation FROM config_state").fetch_one(&pool).await?;
        let patch = json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "Trunk",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"limits": {"maxConcurrentCalls": 1000 + edit}}
        });
        let started = Instant::now();
        trunks.patch(&name, &PatchParams::apply("switchboard-bench-edit").force(), &Patch::Apply(&patch)).await?;
        wait_applied(&pool, current + 1, Duration::from_secs(30))
            .await
            .with_context(|| format!("edit {} was not applied by the node", edit + 1))?;
        latencies.push(started.elapsed());
    }
    if !latencies.is_empty() {
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
        println!(
            "edited Trunk → node applied through the API server ({} edits): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            pick(0.50).as_secs_f64() * 1000.0,
            pick(0.99).as_secs_f64() * 1000.0,
            latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        );
    }
    pool.close().await;
    Ok(())
}
