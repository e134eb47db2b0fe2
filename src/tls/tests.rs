//! The gateway's own CA and the ways clients trust it, over in-memory TLS handshakes.
#![allow(clippy::disallowed_methods)] // the test server task ends with the test

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs one handshake of a client trusting as `trust` against `server`; returns the
/// client's error, if any.
async fn handshake(server: &ServerIdentity, trust: &Trust, name: &str) -> Result<(), String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
    let serving = tokio::spawn(async move {
        if let Ok(mut tls) = acceptor.accept(server_io).await {
            let mut byte = [0u8; 1];
            if tls.read_exact(&mut byte).await.is_ok() {
                let _ = tls.write_all(&byte).await;
            }
        }
    });
    let config = trust.client_config(&[]).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(name.to_string()).unwrap();
    let result = async {
        let mut tls = connector
            .connect(name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut echo = [0u8; 1];
        tls.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    serving.abort();
    result
}

fn identity(dir: &Path) -> ServerIdentity {
    ServerIdentity::self_signed(dir, &["localhost".into(), "127.0.0.1".into()]).unwrap()
}

#[test]
fn the_self_signed_ca_is_made_once_and_keeps_its_pin() {
    let dir = tempfile::tempdir().unwrap();
    let first = identity(dir.path());
    let second = identity(dir.path());
    assert_eq!(
        first.pin, second.pin,
        "the CA key is kept, so the pin is too"
    );
    assert!(parse_pin(&first.pin).is_ok(), "{}", first.pin);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let other = identity(tempfile::tempdir().unwrap().path());
    assert_ne!(first.pin, other.pin, "another data dir, another CA");
}

#[tokio::test]
async fn a_client_with_the_right_pin_or_the_ca_file_connects() {
    let dir = tempfile::tempdir().unwrap();
    let server = identity(dir.path());
    handshake(&server, &Trust::Pin(server.pin.clone()), "localhost")
        .await
        .unwrap();
    handshake(&server, &Trust::Pin(server.pin.clone()), "127.0.0.1")
        .await
        .unwrap();
    let file = Trust::CaFile(dir.path().join(CA_CERT_FILE));
    handshake(&server, &file, "localhost").await.unwrap();
}

#[tokio::test]
async fn a_wrong_pin_a_wrong_name_or_public_roots_refuse_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = identity(dir.path());
    let stranger = identity(tempfile::tempdir().unwrap().path());
    let err = handshake(&server, &Trust::Pin(stranger.pin.clone()), "localhost")
        .await
        .unwrap_err();
    assert!(err.contains("does not match --ca-pin"), "{err}");
    let err = handshake(&server, &Trust::Pin(server.pin.clone()), "gateway.example")
        .await
        .unwrap_err();
    assert!(err.to_lowercase().contains("not valid for name"), "{err}");
    assert!(handshake(&server, &Trust::PublicRoots, "localhost")
        .await
        .is_err());
}

#[test]
fn pins_are_sha256_and_64_hex_digits() {
    let good = format!("sha256:{}", "aB".repeat(32));
    assert_eq!(
        parse_pin(&good).unwrap(),
        format!("sha256:{}", "ab".repeat(32))
    );
    for bad in [
        "",
        "sha256:",
        "md5:00",
        &format!("sha256:{}", "g".repeat(64)),
    ] {
        assert!(parse_pin(bad).is_err(), "{bad}");
    }
}

#[test]
fn pem_files_that_hold_nothing_usable_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = ServerIdentity::from_pem_files(&empty, &empty)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("empty.pem"), "{err}");
}
