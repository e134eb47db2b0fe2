//! Control plane: deploy many functions, list them, restart the gateway on the same data
//! dir until it serves, and check every function is back. Starts no containers.

use std::time::Instant;

use crate::common::{self, Gateway};
use crate::probe::rss_kib;
use crate::report::{row, Row};
use crate::Size;

pub async fn run(size: &Size, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    let deploy = deploy_many(&gw, size.functions).await;
    rows.push(row(
        "control plane",
        &format!("deploy {} functions", size.functions),
        deploy,
        None,
        "ms",
    ));
    rows.push(row(
        "control plane",
        "deploy, per function",
        deploy / size.functions as f64,
        None,
        "ms",
    ));
    list(&gw, size.functions, rows).await;
    rows.push(row(
        "control plane",
        "gateway RSS",
        rss_kib(gw.pid().unwrap(), "VmRSS:") / 1024.0,
        None,
        "MiB",
    ));
    gw.kill();
    let t = Instant::now();
    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    rows.push(row(
        "control plane",
        "restart until serving",
        t.elapsed().as_secs_f64() * 1e3,
        None,
        "ms",
    ));
    let list = gw.get_json("/api/v1/functions").await;
    assert_eq!(list["functions"].as_array().unwrap().len(), size.functions);
}

/// Deploys `n` echo functions one after another; returns the milliseconds it took.
async fn deploy_many(gw: &Gateway, n: usize) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let name = format!("f{i}");
        let r = gw
            .deploy(
                &name,
                &format!("name = \"{name}\"\nimage = \"{}\"\n", common::echo_image()),
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text());
    }
    t.elapsed().as_secs_f64() * 1e3
}

/// Times listing the functions and checks all `n` are there.
async fn list(gw: &Gateway, n: usize, rows: &mut Vec<Row>) {
    let t = Instant::now();
    let list = gw.get_json("/api/v1/functions").await;
    rows.push(row(
        "control plane",
        "list",
        t.elapsed().as_secs_f64() * 1e3,
        None,
        "ms",
    ));
    assert_eq!(list["functions"].as_array().unwrap().len(), n);
}
