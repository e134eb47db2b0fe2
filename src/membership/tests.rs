//! Membership without agents: liveness on paused time, join tokens and node credentials,
//! removal.

use super::*;
use crate::activator::Limits;
use crate::node::wire::{Heartbeat, JoinRequest};
use crate::scheduler::{Policy, Scheduler};
use crate::store::TokenRecord;
use tokio_util::task::TaskTracker;

/// Membership over an empty scheduler, knowing agent `gpu1` from before a restart.
async fn membership(dir: &std::path::Path) -> Membership {
    let store = Store::open(dir).unwrap();
    store
        .put_node(&NodeRecord {
            name: "gpu1".into(),
            address: NodeAddress::Agent,
            labels: Default::default(),
            mark: NodeMark::None,
            credential: Some(crate::access::hash_secret("en_gpu1")),
        })
        .await
        .unwrap();
    let activator = Activator::new(
        Scheduler::new(Vec::new(), Policy::Spread, 8),
        store,
        TaskTracker::new(),
        CancellationToken::new(),
        Limits::default(),
        crate::history::History::off(),
    );
    let timing = Timing {
        node_timeout: Duration::from_secs(10),
        heartbeat: Duration::from_secs(1),
    };
    let token = Some("long-lived-join-token".into());
    Membership::load(activator, token, "gw".into(), timing)
        .await
        .unwrap()
}

fn join_request(name: &str) -> JoinRequest {
    JoinRequest {
        protocol: 1,
        name: name.into(),
        labels: Default::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_is_lost_only_once_it_has_been_silent_past_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let m = membership(dir.path()).await;
    assert_eq!(
        m.scheduler().state("gpu1"),
        Some(NodeState::Lost),
        "until it dials"
    );
    let gpu1 = m.remote("gpu1").unwrap();
    m.scheduler().set_state("gpu1", NodeState::Ready);
    gpu1.heartbeat(&Heartbeat::default());

    tokio::time::advance(Duration::from_secs(9)).await;
    m.sweep(Instant::now()).await;
    assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Ready));

    gpu1.heartbeat(&Heartbeat::default());
    tokio::time::advance(Duration::from_secs(9)).await;
    m.sweep(Instant::now()).await;
    assert_eq!(
        m.scheduler().state("gpu1"),
        Some(NodeState::Ready),
        "each report restarts the clock"
    );

    tokio::time::advance(Duration::from_secs(2)).await;
    m.sweep(Instant::now()).await;
    assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Lost));
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_node_is_lost_after_the_timeout_too() {
    let dir = tempfile::tempdir().unwrap();
    let m = membership(dir.path()).await;
    m.remote("gpu1").unwrap().heartbeat(&Heartbeat::default());
    m.scheduler().set_state("gpu1", NodeState::Disconnected);
    tokio::time::advance(Duration::from_secs(5)).await;
    m.sweep(Instant::now()).await;
    assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Disconnected));
    tokio::time::advance(Duration::from_secs(6)).await;
    m.sweep(Instant::now()).await;
    assert_eq!(m.scheduler().state("gpu1"), Some(NodeState::Lost));
}

#[tokio::test]
async fn a_join_token_is_traded_for_a_credential_that_alone_opens_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let m = membership(dir.path()).await;
    let made = m.create_token(Duration::from_secs(3600)).await.unwrap();
    assert!(made.token.starts_with("ej_"));
    let joined = m
        .join(Some(&made.token), join_request("gpu2"))
        .await
        .unwrap();
    assert_eq!(joined.gateway_id, "gw");
    assert!(m.check_credential("gpu2", Some(&joined.credential)).is_ok());
    assert!(
        m.check_credential("gpu2", Some(&made.token)).is_err(),
        "not the join token"
    );
    assert!(m.check_credential("gpu2", None).is_err());
    assert!(m
        .check_credential("gpu9", Some(&joined.credential))
        .is_err());
    let record = m.store.node("gpu2").unwrap().unwrap();
    assert_ne!(
        record.credential.as_deref(),
        Some(joined.credential.as_str()),
        "hashed"
    );

    // The token is spent.
    assert!(matches!(
        m.join(Some(&made.token), join_request("gpu3")).await,
        Err(MembershipError::BadToken)
    ));
    // A name a joined node holds is not given to another join, even with a good token;
    // nor is a reserved one, and neither refusal spends the token.
    let other = m.create_token(Duration::from_secs(3600)).await.unwrap();
    assert!(matches!(
        m.join(Some(&other.token), join_request("gpu2")).await,
        Err(MembershipError::NodeExists(_))
    ));
    assert!(matches!(
        m.join(Some(&other.token), join_request("tunnel")).await,
        Err(MembershipError::BadRegistration(_))
    ));
    assert!(m.check_credential("gpu2", Some(&joined.credential)).is_ok());
    // Once removed, the name is free again.
    m.remove("gpu2").await.unwrap();
    assert!(matches!(
        m.check_credential("gpu2", Some(&joined.credential)),
        Err(MembershipError::NodeRemoved(_))
    ));
    // Only the credential it held is told so; others learn nothing of the name.
    for (name, credential) in [("gpu2", "en_guess"), ("never", "en_guess")] {
        assert!(matches!(
            m.check_credential(name, Some(credential)),
            Err(MembershipError::BadCredential(_))
        ));
    }
    let again = m
        .join(Some(&other.token), join_request("gpu2"))
        .await
        .unwrap();
    assert!(m.check_credential("gpu2", Some(&again.credential)).is_ok());
    assert!(matches!(
        m.check_credential("gpu2", Some(&joined.credential)),
        Err(MembershipError::BadCredential(_))
    ));
    // The long-lived token lets any number of nodes join.
    for name in ["gpu4", "gpu5"] {
        m.join(Some("long-lived-join-token"), join_request(name))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn wrong_and_expired_join_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = membership(dir.path()).await;
    for token in [None, Some("nope"), Some("long-lived-join-tokeN")] {
        assert!(matches!(
            m.join(token, join_request("gpu3")).await,
            Err(MembershipError::BadToken)
        ));
    }
    let expired = "ej_expired";
    m.store
        .put_token(&TokenRecord {
            hash: crate::access::hash_secret(expired),
            created_ms: 1,
            expires_ms: 2,
        })
        .await
        .unwrap();
    assert!(matches!(
        m.join(Some(expired), join_request("gpu3")).await,
        Err(MembershipError::BadToken)
    ));
    assert!(
        m.store
            .token(&crate::access::hash_secret(expired))
            .unwrap()
            .is_none(),
        "an expired token is removed"
    );
    assert!(m.create_token(Duration::ZERO).await.is_err());
}

#[tokio::test]
async fn a_removed_node_loses_its_credential_and_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let m = membership(dir.path()).await;
    assert!(m.check_credential("gpu1", Some("en_gpu1")).is_ok());
    m.remove("gpu1").await.unwrap();
    assert!(m.check_credential("gpu1", Some("en_gpu1")).is_err());
    assert!(m.scheduler().state("gpu1").is_none());
    assert!(matches!(
        m.remove("gpu1").await,
        Err(MembershipError::UnknownNode(_))
    ));
}
