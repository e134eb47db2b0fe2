//! The store on a temporary data dir: durability across reopening, deletes by prefix,
//! the writer's batching, and the upgrade of a version-1 data dir.
#![allow(clippy::disallowed_methods)] // test tasks end with the test

use super::*;
use crate::manifest::{Format, Manifest};

fn manifest(name: &str) -> Manifest {
    Manifest::parse(&format!("name = \"{name}\"\nimage = \"e:1\""), Format::Toml).unwrap()
}

fn deploy(name: &str) -> (FunctionRecord, RevisionRecord) {
    let m = manifest(name);
    let rev = RevisionRecord {
        id: m.revision_id(),
        manifest: m,
        created_ms: 1,
    };
    let f = FunctionRecord {
        name: name.into(),
        revision: rev.id.clone(),
        created_ms: 1,
        updated_ms: 1,
    };
    (f, rev)
}

fn instance(function: &str, id: &str) -> InstanceRecord {
    InstanceRecord {
        started_ms: 0,
        id: id.into(),
        function: function.into(),
        revision: "r".into(),
        node: "local".into(),
        container_id: "c".into(),
        endpoint: "127.0.0.1:1".into(),
        ready_ms: 1,
        gpus: vec![],
    }
}

/// Opens `dir` again once the previous store's threads have let go of its lock.
async fn reopen(dir: &Path) -> Store {
    for _ in 0..250 {
        if let Ok(s) = Store::open(dir) {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the store did not let go of its lock");
}

#[tokio::test]
async fn deploys_survive_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let gateway_id;
    {
        let store = Store::open(dir.path()).unwrap();
        gateway_id = store.gateway_id().await.unwrap();
        let (f, r) = deploy("echo");
        store.put_deploy(&f, &r).await.unwrap();
    }
    let store = reopen(dir.path()).await;
    assert_eq!(store.gateway_id().await.unwrap(), gateway_id);
    let f = store.function("echo").unwrap().unwrap();
    let r = store.revision("echo", &f.revision).unwrap().unwrap();
    assert_eq!(r.manifest.name, "echo");
}

#[tokio::test]
async fn deleting_a_function_removes_its_revisions_and_instances_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for name in ["echo", "echo2"] {
        let (f, r) = deploy(name);
        store.put_deploy(&f, &r).await.unwrap();
        store
            .put_instance(&instance(name, &format!("i-{name}")))
            .await
            .unwrap();
    }
    assert!(store.delete_function("echo").await.unwrap());
    assert!(store.function("echo").unwrap().is_none());
    assert_eq!(store.functions().await.unwrap().len(), 1);
    let left: Vec<_> = store
        .instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(left, ["i-echo2"]);
    let f2 = store.function("echo2").unwrap().unwrap();
    assert!(store.revision("echo2", &f2.revision).unwrap().is_some());
    store.delete_instance("echo2", "i-echo2").await.unwrap();
    assert!(store.instances().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_shares_flushes_and_every_one_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (_, flushes_before) = store.stats();
    let writes: Vec<_> = (0..500)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.put_instance(&instance("f", &format!("i{i}"))).await })
        })
        .collect();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let (_, flushes_after) = store.stats();
    assert_eq!(store.instances().await.unwrap().len(), 500);
    let flushes = flushes_after - flushes_before;
    assert!(
        flushes < 500,
        "one flush per batch, not per write: {flushes}"
    );
}

#[tokio::test]
async fn writes_not_waited_for_are_on_disk_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let (f, _) = deploy("later");
        store.write_later(vec![Change::Put(
            TreeId::Functions,
            b"later".to_vec(),
            encode(&f),
        )]);
        store.flush().await.unwrap();
    }
    let store = reopen(dir.path()).await;
    assert!(store.function("later").unwrap().is_some());
}

#[test]
fn records_from_a_newer_schema_are_refused_not_misread() {
    let err = decode::<FunctionRecord>(b"k", br#"{"v":99,"data":{}}"#).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99 }));
    let err = decode::<FunctionRecord>(b"k", b"garbage").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }));
    assert!(
        std::error::Error::source(&err).is_some(),
        "the decoder's error is kept"
    );
}

#[tokio::test]
async fn a_version_1_data_dir_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What Ember wrote before `function/instance` keys and node marks.
        let db = sled::Config::new()
            .path(dir.path().join("state"))
            .open()
            .unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("schema_version", &1u32.to_be_bytes()).unwrap();
        let instances = db.open_tree("instances").unwrap();
        instances
            .insert("abc", encode(&instance("echo", "abc")))
            .unwrap();
        let nodes = db.open_tree("nodes").unwrap();
        let v1 = r#"{"v":1,"data":{"name":"gpu1","url":"http://10.0.0.2:8090","labels":{"zone":"a"},"cordoned":true,"draining":false}}"#;
        nodes.insert("gpu1", v1.as_bytes()).unwrap();
        let embedded =
            r#"{"v":1,"data":{"name":"local","url":"embedded","draining":true,"cordoned":true}}"#;
        nodes.insert("local", embedded.as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path()).await;
    let instances = store.instances().await.unwrap();
    assert_eq!(instances.len(), 1);
    store.delete_instance("echo", "abc").await.unwrap();
    assert!(
        store.instances().await.unwrap().is_empty(),
        "keyed echo/abc now"
    );
    let gpu1 = store.node("gpu1").unwrap().unwrap();
    assert_eq!(gpu1.address, NodeAddress::Agent);
    assert_eq!(gpu1.credential, None, "it must join again");
    assert_eq!(gpu1.mark, NodeMark::Cordoned);
    assert_eq!(gpu1.labels["zone"], "a");
    let local = store.node("local").unwrap().unwrap();
    assert_eq!(local.address, NodeAddress::Embedded);
    assert_eq!(local.mark, NodeMark::Draining);
}

#[tokio::test]
async fn keys_are_found_by_the_hash_of_their_secret_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = crate::access::new_secret("ek");
    let key = KeyRecord {
        name: "ci".into(),
        scope: crate::access::Scope::Invoke {
            functions: vec!["echo".into()],
        },
        hash: crate::access::hash_secret(&secret),
        created_ms: 1,
    };
    {
        let store = Store::open(dir.path()).unwrap();
        store.put_key(&key).await.unwrap();
    }
    let store = reopen(dir.path()).await;
    let hash = crate::access::hash_secret(&secret);
    assert_eq!(store.key_by_hash(&hash).unwrap(), Some(key.clone()));
    assert!(store
        .key_by_hash(&crate::access::hash_secret("ek_other"))
        .unwrap()
        .is_none());
    assert_eq!(store.keys().await.unwrap(), [key]);
    assert!(store.delete_key("ci").await.unwrap());
    assert!(store.key_by_hash(&hash).unwrap().is_none());
    assert!(store.keys().await.unwrap().is_empty());
    assert!(!store.delete_key("ci").await.unwrap());
}
