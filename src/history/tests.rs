use super::usage::{sum, By};
use super::*;

fn invocation(id: u64, instance: &str, from: u64, to: u64, cold: bool) -> InvocationRecord {
    InvocationRecord {
        id: format_id(id),
        kind: "request".into(),
        function: "f".into(),
        revision: "r".into(),
        instance: Some(instance.into()),
        node: Some("n".into()),
        gpus: vec!["GPU-1".into(), "GPU-2".into()],
        client: None,
        method: "POST".into(),
        path: "/".into(),
        status: 200,
        error: None,
        cold,
        queued_at_us: from,
        started_at_us: Some(from),
        finished_at_us: to,
        bytes_in: 0,
        bytes_out: 0,
    }
}

#[test]
fn ids_sort_by_arrival_and_read_back() {
    let a = mint();
    let b = mint();
    assert!(b > a);
    assert_eq!(parse_id(&format_id(a)), Some(a));
    assert_eq!(parse_id("xyz"), None);
    assert!(id_at(now_us() / 1000 + 1) > b);
}

#[test]
fn busy_time_is_the_union_of_overlapping_requests_and_paused_time_is_apart() {
    let s = 1_000_000;
    let alloc = AllocationRecord {
        instance: "i".into(),
        function: "f".into(),
        node: "n".into(),
        gpus: vec!["GPU-1".into(), "GPU-2".into()],
        started_at_us: 0,
        ended_at_us: 10 * s,
        paused: vec![(8 * s, 9 * s)],
    };
    // Two overlapping requests (1-3 s and 2-4 s) and one apart (5-6 s): busy 4 s.
    let calls = [
        invocation(1, "i", s, 3 * s, true),
        invocation(2, "i", 2 * s, 4 * s, false),
        invocation(3, "i", 5 * s, 6 * s, false),
    ];
    let u = sum(
        std::slice::from_ref(&alloc),
        &calls,
        0,
        20 * s,
        By::Function,
    );
    let f = &u.rows[0];
    assert_eq!(f.key, "f");
    assert_eq!(f.gpu_seconds_allocated, 20.0, "10 s on two slots");
    assert_eq!(f.gpu_seconds_paused, 2.0);
    assert_eq!(f.gpu_seconds_busy, 8.0);
    assert_eq!(f.busy_ratio, Some(0.4));
    assert_eq!(
        (f.invocations, f.cold_invocations, f.cold_starts),
        (3, 1, 1)
    );
    // A window cuts the spans: 2.5-5.5 s holds 1.5 + 0.5 s of busy time, one arrival
    // (at 5 s) and no start.
    let u = sum(
        std::slice::from_ref(&alloc),
        &calls,
        2_500_000,
        5_500_000,
        By::Function,
    );
    assert_eq!(u.rows[0].instance_busy_seconds, 2.0);
    assert_eq!(u.rows[0].invocations, 1);
    assert_eq!(u.rows[0].cold_starts, 0);
    // By GPU: one row per slot, a CPU instance under `-` with no GPU time, and the total
    // counting each instance and request once.
    let cpu = AllocationRecord {
        instance: "c".into(),
        function: "g".into(),
        gpus: Vec::new(),
        ..alloc.clone()
    };
    let u = sum(&[alloc, cpu], &calls, 0, 20 * s, By::Gpu);
    let keys: Vec<&str> = u.rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["-", "GPU-1", "GPU-2"]);
    assert_eq!(
        u.rows[0].gpu_seconds_allocated, 0.0,
        "CPU time is no GPU time"
    );
    assert_eq!(u.rows[0].instance_seconds, 10.0);
    assert_eq!(u.rows[2].gpu_seconds_allocated, 10.0);
    assert_eq!(u.total.invocations, 3);
    assert_eq!(u.total.gpu_seconds_allocated, 20.0);
    assert_eq!(
        u.total.instance_seconds, 20.0,
        "two instances of 10 s, once each"
    );
    assert_eq!(u.total.gpu_seconds_busy, 8.0);
}

#[test]
fn a_query_names_the_field_it_cannot_read() {
    let bad = |p: query::Params| query::Query::parse(&p).unwrap_err().field;
    let p = |f: fn(&mut query::Params)| {
        let mut p = query::Params::default();
        f(&mut p);
        p
    };
    assert_eq!(bad(p(|p| p.since = Some("yesterday".into()))), "since");
    assert_eq!(bad(p(|p| p.limit = Some("0".into()))), "limit");
    assert_eq!(bad(p(|p| p.limit = Some("5000".into()))), "limit");
    assert_eq!(bad(p(|p| p.cursor = Some("nope".into()))), "cursor");
    assert_eq!(bad(p(|p| p.status = Some("7xx".into()))), "status");
    assert_eq!(bad(p(|p| p.status = Some("99".into()))), "status");
    for ok in ["503", "5xx", "error", "queue_timeout"] {
        let q = query::Params {
            status: Some(ok.into()),
            ..Default::default()
        };
        assert!(query::Query::parse(&q).is_ok(), "{ok}");
    }
}

#[tokio::test]
async fn records_are_batched_paged_newest_first_and_trimmed_to_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let retention = Retention {
        max: 10,
        max_age: Duration::from_secs(3600),
    };
    let history = History::start(store.clone(), retention);
    let now = now_us();
    let mut ids = Vec::new();
    // Five batches of five.
    for i in 0..25u64 {
        let id = mint();
        ids.push(id);
        let mut r = invocation(id, "i", now, now + 1, i % 2 == 0);
        r.status = if i == 7 { 503 } else { 200 };
        history.invocation(id, None, r);
        if i % 5 == 4 {
            history.flush().await;
        }
    }
    let page = |params: query::Params| {
        let store = store.clone();
        async move {
            query::Query::parse(&params)
                .unwrap()
                .run(&store)
                .await
                .unwrap()
        }
    };
    let mut p = query::Params {
        limit: Some("10".into()),
        ..Default::default()
    };
    let first = page(p.clone()).await;
    assert_eq!(first.invocations.len(), 10);
    assert_eq!(first.invocations[0].id, format_id(ids[24]), "newest first");
    p.cursor = first.next_cursor.clone();
    let second = page(p.clone()).await;
    assert_eq!(second.invocations[0].id, format_id(ids[14]));
    let failed = page(query::Params {
        status: Some("5xx".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(failed.invocations.len(), 1);
    assert_eq!(failed.invocations[0].id, format_id(ids[7]));
    assert_eq!(store.invocation_count().await.unwrap(), 25);
    // Over the cap the oldest batches go.
    let trimmed = trim(&store, Some(25), retention).await;
    assert_eq!(trimmed, Some(10));
    let all = page(query::Params::default()).await;
    assert_eq!(all.invocations.len(), 10);
    assert_eq!(
        all.invocations[9].id,
        format_id(ids[15]),
        "the oldest were removed"
    );
}

#[test]
fn hex_ids_are_what_the_formatter_would_write() {
    for id in [0, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef, mint()] {
        assert_eq!(format_id(id), format!("{id:016x}"));
    }
}
