//! The folder source on temporary folders: documents and Secrets, problems named by file, line
//! and field, duplicates, and the cache that parses only changed files.

use super::*;

fn read(files: &[(&str, &str)]) -> DesiredState {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    FolderSource::new(dir.path()).read().unwrap()
}

const TRUNK: &str = "apiVersion: switchboard.dev/v1alpha1
kind: Trunk
metadata: {name: skyetel}
spec:
  provider: skyetel
  gateways: [{address: sip.skyetel.com}]
  inbound: {allowedSourceCidrs: [52.41.52.34/32]}
";

#[test]
fn reads_multi_document_files_and_secrets() {
    let secret =
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {password: s3cret}\ndata: {other: aGk=}\n";
    let state = read(&[("a/trunk.yaml", &format!("{TRUNK}---\n{secret}")), ("notes.txt", "ignored")]);
    assert_eq!(state.resources.len(), 1);
    assert_eq!(state.resources[0].key.namespace, "default");
    assert_eq!(state.resources[0].origin, "a/trunk.yaml");
    let data = &state.secrets[&("default".to_string(), "creds".to_string())];
    assert_eq!(data["password"], b"s3cret");
    assert_eq!(data["other"], b"hi");
    assert!(state.problems.is_empty(), "{:?}", state.problems);
}

#[test]
fn syntax_errors_name_file_and_line_and_keep_the_file() {
    let state = read(&[("bad.yaml", "kind: Trunk\nmetadata: {name: x\n  spec: [\n"), ("good.yaml", TRUNK)]);
    assert_eq!(state.resources.len(), 1);
    assert_eq!(state.unreadable_origins, vec!["bad.yaml"]);
    assert!(state.problems[0].message.starts_with("bad.yaml:"), "{}", state.problems[0].message);
}

#[test]
fn unknown_kinds_and_fields_are_reported() {
    let state = read(&[
        ("kind.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"),
        ("field.yaml", &TRUNK.replace("provider: skyetel", "provider: skyetel\n  proivder: typo")),
    ]);
    assert!(state.problems.iter().any(|p| p.message.contains("unknown kind \"ConfigMap\"")));
    assert_eq!(state.broken.len(), 1);
    assert!(state.broken[0].message.contains("spec.proivder: unknown field"), "{}", state.broken[0].message);
}

#[test]
fn duplicates_keep_the_first_definition() {
    let state = read(&[("a.yaml", TRUNK), ("b.yaml", TRUNK)]);
    assert_eq!(state.resources.len(), 1);
    assert_eq!(state.resources[0].origin, "a.yaml");
    assert!(state.problems[0].message.contains("also defined in a.yaml"));
}

#[test]
fn cached_reads_follow_edits_and_removals() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), TRUNK).unwrap();
    std::fs::write(dir.path().join("b.yaml"), TRUNK.replace("name: skyetel", "name: other")).unwrap();
    let source = FolderSource::new(dir.path());
    assert_eq!(source.read().unwrap().resources.len(), 2);
    std::fs::write(dir.path().join("b.yaml"), TRUNK.replace("name: skyetel", "name: renamed")).unwrap();
    let names: Vec<String> = source.read().unwrap().resources.into_iter().map(|r| r.key.name).collect();
    assert_eq!(names, vec!["skyetel", "renamed"]);
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    assert_eq!(source.read().unwrap().resources.len(), 1);
    assert_eq!(source.cache.len(), 1, "removed files leave the cache");
}

#[test]
fn the_file_cache_parses_only_changed_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.yaml");
    std::fs::write(&path, "one").unwrap();
    let cache = FileCache::default();
    let parses = std::cell::Cell::new(0);
    let parse = |text: &str| {
        parses.set(parses.get() + 1);
        text.to_string()
    };
    assert_eq!(*cache.get(&path, parse).unwrap(), "one");
    assert_eq!(*cache.get(&path, parse).unwrap(), "one");
    assert_eq!(parses.get(), 1, "unchanged content is not parsed again");
    // Same length, same instant: the metadata may not change, the content check catches it.
    std::fs::write(&path, "two").unwrap();
    assert_eq!(*cache.get(&path, parse).unwrap(), "two");
    assert_eq!(parses.get(), 2);
    // A touch changes the metadata, not the content: no new parse.
    let old = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
    assert_eq!(*cache.get(&path, parse).unwrap(), "two");
    assert_eq!(parses.get(), 2, "a touch alone does not parse again");
    cache.invalidate(&path);
    assert_eq!(*cache.get(&path, parse).unwrap(), "two");
    assert_eq!(parses.get(), 3);
}

#[test]
fn missing_folder_is_an_error() {
    assert!(FolderSource::new("/nonexistent/switchboard").read().is_err());
}
