//! `ember deploy --dry-run PATH`: the manifest checked here, as the gateway would check it,
//! and a summary of what deploying it would make, without deploying or building anything.
//!
//! It goes through the deploy's own [`prepare`] (the same parsing and validation, the same
//! build-context hash and image tag, the same JSON sent), so the revision id it prints is
//! the one a deploy gets. It needs no gateway; what only the gateway knows is left to the
//! deploy and said so: whether the image is on the nodes, whether a node can meet `[gpu]`
//! and has the volumes, and whether the secrets are set.

use std::fmt::Write as _;
use std::path::Path;

use super::deploy::{prepare, Prepared};
use crate::manifest::Manifest;

/// What only a deploy checks, printed after every dry run.
pub const NOT_CHECKED: &str = "not checked without a gateway: whether the image is on the nodes, \
     whether a node can meet [gpu] and has the read-only volumes (`ember deploy` warns of \
     these), and whether the secrets named are set (`ember deploy` refuses without them)";

/// Checks the manifest at `path` and prints the summary; an invalid manifest is an error
/// naming each field.
pub fn dry_run(path: &Path) -> anyhow::Result<()> {
    let prepared = prepare(path)?;
    print!("{}", summary(&prepared));
    println!("{NOT_CHECKED}");
    Ok(())
}

/// The summary of a prepared manifest: its revision id first, then a line per section.
pub fn summary(prepared: &Prepared) -> String {
    let m = &prepared.manifest;
    let mut out = format!(
        "{} is valid; nothing was deployed\n",
        prepared.file.display()
    );
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "  {key:<10} {value}");
    };
    line("name", m.name.clone());
    line("revision", m.revision_id());
    let image = m.image.clone().unwrap_or_default();
    line(
        "image",
        match &prepared.build {
            Some(b) => format!(
                "{image}, built from {} ({}) when the nodes lack it",
                b.context.display(),
                b.dockerfile
            ),
            None => image,
        },
    );
    line("port", m.port.to_string());
    line("resources", resources(m));
    if !m.volumes.is_empty() {
        line("volumes", volumes(m));
    }
    let secrets: Vec<String> = m
        .secret_refs()
        .map(|(var, secret)| format!("{var} from secret `{secret}`"))
        .collect();
    if !secrets.is_empty() {
        line("secrets", secrets.join(", "));
    }
    line("scale", scale(m));
    line(
        "queue",
        format!(
            "{} waiting at most, for {}",
            m.queue.capacity,
            humantime::format_duration(m.queue.timeout)
        ),
    );
    line(
        "request",
        format!(
            "timeout {}, max body {}",
            humantime::format_duration(m.request.timeout),
            m.request.max_body
        ),
    );
    line("gpu", gpu(m));
    line(
        "access",
        if m.access.private {
            "private (invoke keys)".into()
        } else {
            "public".into()
        },
    );
    if let Some(o) = &m.openai {
        let models: Vec<String> = o
            .models
            .pairs()
            .into_iter()
            .map(|(id, name)| {
                if id == name {
                    id.to_string()
                } else {
                    format!("{id} (as {name})")
                }
            })
            .collect();
        let routing = match o.routing {
            crate::manifest::Routing::Prefix => format!(
                "prefix routing (first {} bytes, load bound {}x the mean)",
                o.prefix_bytes, o.load_factor
            ),
            crate::manifest::Routing::LeastLoaded => "least-loaded routing".into(),
        };
        line(
            "openai",
            format!("/v1 models {}; {routing}", models.join(", ")),
        );
    }
    if let Some(c) = &m.comfyui {
        line(
            "comfyui",
            format!(
                "/comfy/{}/ (one prompt per instance); history, outputs and uploads kept {} within {}",
                m.name,
                humantime::format_duration(c.keep),
                c.keep_bytes
            ),
        );
    }
    out
}

fn resources(m: &Manifest) -> String {
    let r = &m.resources;
    let mut out = format!(
        "{} cpus, {} memory, {} /dev/shm, {} processes",
        r.cpus,
        r.memory,
        r.shm(),
        r.pids()
    );
    for (name, l) in &r.ulimits {
        let v = |n: i64| {
            if n == -1 {
                "unlimited".to_string()
            } else {
                n.to_string()
            }
        };
        if l.soft == l.hard {
            let _ = write!(out, ", {name} {}", v(l.soft));
        } else {
            let _ = write!(out, ", {name} {}/{}", v(l.soft), v(l.hard));
        }
    }
    out
}

fn volumes(m: &Manifest) -> String {
    m.volumes
        .iter()
        .map(|v| {
            let mode = if v.read_only { "ro" } else { "rw" };
            format!("{} at {} ({mode})", v.source, v.target)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn scale(m: &Manifest) -> String {
    let s = &m.scale;
    format!(
        "{} to {} instances, concurrency {}, idle {} then {:?}, keep-alive {:?}",
        s.min,
        s.max,
        s.concurrency,
        humantime::format_duration(s.idle_timeout),
        s.on_idle,
        s.keep_alive
    )
    .to_lowercase()
}

fn gpu(m: &Manifest) -> String {
    let Some(g) = &m.gpu else {
        return "none".into();
    };
    let mut out = format!("{} × {}", g.count, g.sharing);
    if let Some(profile) = &g.mig_profile {
        let _ = write!(out, " {profile}");
    }
    if let Some(memory) = g.memory {
        let _ = write!(out, ", {memory} each");
    }
    if !g.models.is_empty() {
        let _ = write!(out, ", models {}", g.models.join(" or "));
    }
    if let Some(min) = g.min_memory {
        let _ = write!(out, ", at least {min} on the GPU");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, manifest: &str) {
        std::fs::write(dir.join("ember.toml"), manifest).unwrap();
    }

    #[test]
    fn a_dry_run_prints_the_revision_a_deploy_would_send() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "name = \"render\"\nimage = \"studio/render:1\"\n[gpu]\nsharing = \"shared\"\nmemory = \"20GiB\"\nmodels = [\"A100\"]\n",
        );
        let prepared = prepare(dir.path()).unwrap();
        let text = summary(&prepared);
        let sent = serde_json::to_string(&prepared.manifest).unwrap();
        let id = Manifest::parse(&sent, crate::manifest::Format::Json)
            .unwrap()
            .revision_id();
        assert!(text.contains(&format!("  revision   {id}\n")), "{text}");
        assert!(text.contains("  image      studio/render:1\n"), "{text}");
        assert!(
            text.contains("  gpu        1 × shared, 20.0 GiB each, models A100\n"),
            "{text}"
        );
        assert!(
            text.contains("  scale      0 to 4 instances, concurrency 50, idle 5m then stop"),
            "{text}"
        );
    }

    #[test]
    fn a_built_image_is_named_after_its_context_as_a_deploy_names_it() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "name = \"local\"\nbuild = \".\"\n");
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let tar =
            super::super::build_context_tar(dir.path(), Some(Path::new("ember.toml"))).unwrap();
        let prepared = prepare(&dir.path().join("ember.toml")).unwrap();
        let image = prepared.manifest.image.clone().unwrap();
        assert!(image.starts_with("ember/local:"), "{image}");
        use sha2::Digest;
        let hash: String = sha2::Sha256::digest(&tar)[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(image, format!("ember/local:{hash}"));
        assert!(summary(&prepared).contains("built from"));
    }

    #[test]
    fn an_invalid_manifest_names_every_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "name = \"Bad_Name\"\nimage = \"x:1\"\n[scale]\nmax = 0\n",
        );
        let e = prepare(dir.path()).err().unwrap().to_string();
        assert!(e.contains("is not a valid manifest:"), "{e}");
        assert!(e.contains("\n  name: "), "{e}");
        assert!(e.contains("\n  scale.max: "), "{e}");
    }

    #[test]
    fn a_build_without_its_dockerfile_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "name = \"nofile\"\nbuild = \".\"\n");
        let e = prepare(dir.path()).err().unwrap().to_string();
        assert!(e.contains("has no Dockerfile"), "{e}");
    }
}
